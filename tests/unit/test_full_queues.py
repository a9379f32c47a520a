"""The broker's lines about clients whose send queue is full."""

from __future__ import annotations

import logging

import pytest

from ventilator import notices as n
from ventilator._full_queues import REPEAT_QUIET_S, FullQueues

PEER = b"\x00peer"


def spell(queues: FullQueues, began_at: float, lasted_s: float) -> None:
    """The client stops reading at `began_at` and reads again `lasted_s` later."""
    queues.met(PEER, began_at)
    queues.lost(n.ClientLost("slow", 1, n.Departure.UNREACHABLE, peer=PEER))
    queues.sent(PEER, began_at + lasted_s)


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]


def test_a_spell_is_said_when_it_starts_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="ventilator.broker")

    spell(FullQueues(1000), began_at=10.0, lasted_s=0.3)

    lines = said(caplog)
    assert len(lines) == 2
    assert "stopped reading client=slow" in lines[0]
    assert "reads again client=slow after 0.3s" in lines[1]


def test_a_slow_reader_that_stops_again_soon_is_not_said_again_until_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A client draining a deep queue slowly stops and reads again many times
    # a second: a CI run logged two such pairs where the test expected one.
    caplog.set_level(logging.DEBUG, logger="ventilator.broker")
    queues = FullQueues(1000)

    spell(queues, began_at=10.0, lasted_s=0.3)
    for started in (11.0, 12.0, 13.0):
        spell(queues, began_at=started, lasted_s=0.2)
    assert len(said(caplog)) == 2

    spell(queues, began_at=10.3 + REPEAT_QUIET_S + 1, lasted_s=0.2)

    lines = said(caplog)
    assert len(lines) == 4
    assert "stopped reading client=slow" in lines[2]
    assert "stopped reading 3 times more, briefly" in lines[2]


def test_a_spell_in_the_quiet_that_lasts_past_it_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A reader that stalls for good right after a short spell must not go
    # unsaid: it is told once its spell outlasts the quiet.
    caplog.set_level(logging.DEBUG, logger="ventilator.broker")
    queues = FullQueues(1000)
    spell(queues, began_at=10.0, lasted_s=0.3)
    lost = n.ClientLost("slow", 1, n.Departure.UNREACHABLE, peer=PEER)

    queues.met(PEER, 11.0)
    queues.lost(lost)
    assert len(said(caplog)) == 2

    queues.met(PEER, 10.3 + REPEAT_QUIET_S + 1)
    queues.lost(lost)

    lines = said(caplog)
    assert len(lines) == 3
    assert "stopped reading client=slow" in lines[2]

"""How a client or a worker judges its broker's silence (`_timing.BrokerSilence`)."""

from __future__ import annotations

from ventilator._timing import BrokerSilence


def test_a_silence_is_due_as_it_reaches_the_limit_not_at_a_later_beat() -> None:
    # Judged at heartbeats, a silence of 3 intervals (1 s beats) was noticed
    # 3 to 4 s after the broker's last word; the loop now wakes at gone_at.
    silence = BrokerSilence(now=100.0)

    assert silence.gone_at(3.0) == 103.0
    assert not silence.presumed_gone(102.999, 3.0)
    assert silence.presumed_gone(103.0, 3.0)


def test_a_stall_of_this_process_is_not_counted_as_the_broker_s_silence() -> None:
    silence = BrokerSilence(now=100.0)

    silence.forgive(stalled_s=5.0, now=106.0)

    assert silence.gone_at(3.0) == 108.0  # the 1 s heard of, then 2 s more
    assert not silence.presumed_gone(106.0, 3.0)


def test_a_stall_never_puts_the_last_word_in_the_future() -> None:
    silence = BrokerSilence(now=100.0)

    silence.forgive(stalled_s=50.0, now=101.0)

    assert silence.seen_at == 101.0

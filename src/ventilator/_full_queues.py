"""Client connections that stopped reading, as the broker's log tells them.

A client that stops reading (paused, slow, or flooding without reading) fills
its send queue at the broker; each send that meets the full queue fails, and
the scheduler takes back what it sent, once per send. A line per failed send
made hundreds of "client unreachable" lines in 20 s for one client, none of
them saying it came back, and it was never unreachable, only slow. Here the
shell keeps, per connection, the episode of its full queue: said once when it
starts, and once when a send goes through again. A slow reader draining a
deep queue stops and reads again many times a second: the spells that start
soon after one was said are told at DEBUG, and counted on the next line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import notices as n
from ._words import counted, times

__all__ = ["FullQueues"]

# The broker's shell owns these lines: operators know them as the broker's.
log = logging.getLogger("ventilator.broker")

# A connection whose queue stayed full this long after its last failed send is
# forgotten here: it left, or fell silent, which the scheduler says itself.
FORGET_AFTER_S = 300.0
# Spells of a connection that begin within this long of the end of the last
# one said are said at DEBUG only.
REPEAT_QUIET_S = 60.0


@dataclass(slots=True)
class _Episode:
    began_at: float
    last_at: float
    sends: int = 0
    recipient: str | None = None  # once its start was told
    said: bool = False  # told at INFO, not within the quiet after another


@dataclass(slots=True)
class _Quiet:
    """After a spell said of a connection: until when the next ones are not,
    and how many were not."""

    until: float
    unsaid: int = 0


class FullQueues:
    """The connections whose send queue at the broker is full, and the log
    lines of each episode."""

    def __init__(self, queue_messages: int) -> None:
        self._queue_messages = queue_messages
        self._episodes: dict[bytes, _Episode] = {}
        self._quiet: dict[bytes, _Quiet] = {}

    def met(self, peer: bytes, now: float) -> None:
        """A send to `peer` failed: its queue is full."""
        episode = self._episodes.get(peer)
        if episode is None:
            episode = self._episodes[peer] = _Episode(now, now)
        episode.last_at = now
        episode.sends += 1

    def lost(self, notice: n.ClientLost) -> bool:
        """Say the loss of a client whose queue is full, once an episode.
        False if the notice is not about a full queue (the caller says it)."""
        episode = self._episodes.get(notice.peer)
        if episode is None or notice.how is not n.Departure.UNREACHABLE:
            return False
        first_notice = episode.recipient is None
        episode.recipient = notice.recipient
        if episode.said:
            log.debug("client still not reading client=%s", notice.recipient)
            return True
        # A spell soon after the last one said is told once it outlasts that
        # quiet, if it does: a reader that stalls for good is still said.
        quiet = self._quiet.get(notice.peer)
        if quiet is not None and episode.last_at < quiet.until:
            if first_notice:
                log.debug("client stopped reading again client=%s", notice.recipient)
            return True

        self._quiet.pop(notice.peer, None)
        episode.said = True
        log.info(
            "client stopped reading client=%s: its queue at the broker is full "
            "(%s); what it was sent and did not acknowledge (%s) goes again "
            "when it next speaks, and this is said again when it reads%s",
            notice.recipient,
            counted(self._queue_messages, "message"),
            counted(notice.held, "result"),
            _short_spells(quiet),
        )
        return True

    def sent(self, peer: bytes, now: float) -> None:
        """A send to `peer` went through: its episode, if any, is over."""
        episode = self._episodes.pop(peer, None)
        if episode is None or episode.recipient is None:
            return
        if not episode.said:
            quiet = self._quiet.get(peer)
            if quiet is not None:
                quiet.unsaid += 1
            log.debug("client reads again client=%s", episode.recipient)
            return

        self._quiet[peer] = _Quiet(now + REPEAT_QUIET_S)
        log.info(
            "client reads again client=%s after %.1fs; %s met its full queue meanwhile",
            episode.recipient,
            now - episode.began_at,
            counted(episode.sends, "send"),
        )

    def forget_old(self, now: float) -> None:
        """Forget connections that met no full queue for `FORGET_AFTER_S`."""
        self._episodes = {
            peer: episode
            for peer, episode in self._episodes.items()
            if now - episode.last_at <= FORGET_AFTER_S
        }
        self._quiet = {
            peer: quiet
            for peer, quiet in self._quiet.items()
            if now - quiet.until <= FORGET_AFTER_S
        }


def _short_spells(quiet: _Quiet | None) -> str:
    if quiet is None or not quiet.unsaid:
        return ""
    return (
        f" (it also stopped reading {times(quiet.unsaid)} more, briefly, since "
        "this was last said)"
    )

"""Accepted tasks whose submitters have not been told yet, per connection.

A result implies acceptance, so the broker holds an ACCEPTED back for up to
`ACCEPT_GRACE_S` after the SUBMIT it answers: a quick task's client hears one
message instead of two. The scheduler notes what it accepted (`accepted`),
crosses off what a result told the submitter (`told_by`), and at the end of a
loop turn sends what is due (`send_due`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from . import protocol as p

__all__ = ["ACCEPT_GRACE_S", "Unannounced"]

# How long an ACCEPTED may wait for its task's result to make it needless: a
# result implies acceptance, so a quick task's client hears one message instead
# of two. Short enough that a sink task's future or a closing client barely
# notice the wait.
ACCEPT_GRACE_S = 0.005


class Unannounced:
    """Per submitting connection, when the first of its untold acceptances was
    made, and their task ids in the order they were accepted."""

    __slots__ = ("_by_peer",)

    def __init__(self) -> None:
        self._by_peer: dict[bytes, tuple[float, dict[int, None]]] = {}

    def accepted(self, peer: bytes, task_ids: Mapping[int, None], now: float) -> None:
        """Note tasks of `peer` accepted at `now`: a non-empty batch, their
        ids as keys in the order they were accepted."""
        self._by_peer.setdefault(peer, (now, {}))[1].update(task_ids)

    def told_by(self, peer: bytes, results: Iterable[p.ResultEntry]) -> None:
        """Cross off the tasks whose `results` go to `peer`, which submitted
        them: their results tell it they were accepted."""
        unannounced = self._by_peer.get(peer)
        if unannounced is None:
            return
        task_ids = unannounced[1]
        for entry in results:
            if not entry.origin:  # the recipient's own task, not a sink's
                task_ids.pop(entry.task_id, None)
        if not task_ids:
            del self._by_peer[peer]

    def send_due(
        self, now: float | None, to_clients: list[tuple[bytes, p.Command]]
    ) -> None:
        """Add to `to_clients` the ACCEPTED due by `now`, each with its peer;
        without `now`, every one (a broker's last turn)."""
        for peer, (accepted_at, task_ids) in list(self._by_peer.items()):
            if now is None or now >= accepted_at + ACCEPT_GRACE_S:
                del self._by_peer[peer]
                to_clients.append((peer, p.Accepted(list(task_ids))))

    def due_at(self) -> float:
        """When the oldest untold acceptance is due (inf if none is)."""
        if not self._by_peer:
            return math.inf
        return min(at for at, _ in self._by_peer.values()) + ACCEPT_GRACE_S

    def none_empty(self) -> bool:
        """Whether every connection waiting for an ACCEPTED has tasks in it (for
        the invariant checks)."""
        return all(task_ids for _, task_ids in self._by_peer.values())

"""The results a receiving end (client or sink) handed on lately, by key.

The broker sends a result again when it cannot know whether the first copy
arrived: after a reconnection, or a send that failed. The receiving end hands
each one on once, acknowledges the copies so that the broker forgets them, and
acknowledges again, after a reconnection, what the old connection may have
dropped (a socket closed with linger 0 loses the ACKs still in it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

# Keys remembered. The broker sends again only results not acknowledged, of
# which it keeps at most its delivery window in flight (20,000 by default) per
# client or sink; this covers that window with room to spare, for a few MB.
RECENT_RESULTS = 32_768

ResultKey = tuple[str, int]  # (origin, task_id), as in an ACK


class RecentResults:
    """A bounded memory of result keys, forgetting the oldest first."""

    def __init__(self, limit: int = RECENT_RESULTS) -> None:
        self._limit = limit
        # An OrderedDict, not a dict: a plain dict iterated from its head after
        # many deletions there walks their empty slots, and evicting the oldest
        # cost 7.5 µs a result at 32,768 keys, against 0.3 µs.
        self._keys: OrderedDict[ResultKey, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[ResultKey]:
        return iter(self._keys)

    def add(self, key: ResultKey) -> None:
        self._keys[key] = None
        if len(self._keys) > self._limit:
            self._keys.popitem(last=False)

    def chunks(self, size: int) -> Iterator[list[ResultKey]]:
        """The keys remembered, oldest first, `size` at most per list."""
        keys = list(self._keys)
        for start in range(0, len(keys), size):
            yield keys[start : start + size]

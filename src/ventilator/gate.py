"""The broker's gate: pyzmq's ZAP handler, asked about every handshake.

With CURVE it lets a key in only on the socket of its role (a client key on
the workers' socket is refused), asking a `security.KeyStore`. It also runs
without CURVE, for its other job: refusing connections past the broker's peer
limit. Refusals are logged from the gate's thread, dwindling per key
(`KeyRefusals`).

Apart from `security` because only a broker uses it: pyzmq's
`ThreadAuthenticator` brings asyncio, which clients and workers need not load.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from .logs import RateLimit, Routines
from .security import (
    CLIENT,
    DOMAINS,
    ROLES_OF_DOMAIN,
    WORKER,
    Identity,
    KeyStore,
    fingerprint,
)

__all__ = ["Gate", "KeyRefusals", "PeerCount"]

log = logging.getLogger(__name__)


class PeerCount:
    """Open connections of a broker. The broker's loop counts accepted and
    closed connections from socket monitor events; the ZAP thread counts the
    handshakes it is asked about. Each counter has one writer.

    Every connection is accepted before its handshake asks ZAP, so both
    `accepted` and `handshakes` are lower bounds of the connections accepted
    so far, whichever lags: their larger one, less those seen closed, bounds
    the open connections without waiting for the loop to catch up (a close not
    yet seen only makes a newcomer wait and retry).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.accepted = 0
        self.closed = 0
        self.handshakes = 0

    @property
    def open(self) -> int:
        return max(self.accepted, self.handshakes) - self.closed

    def admit(self) -> bool:
        """Count a handshake; whether it fits under the limit."""
        self.handshakes += 1
        return self.open <= self.limit


class Gate(ThreadAuthenticator):
    """The ZAP handler: a key is let in only on the socket of its role, and no
    connection once the broker has `limit` peers."""

    def __init__(
        self,
        context: zmq.Context[Any],
        keys: KeyStore | None,
        peers: PeerCount,
    ) -> None:
        super().__init__(context, log=logging.getLogger(f"{__name__}.zap"))
        self.keys = keys
        self.peers = peers
        self._refusals = KeyRefusals()
        # The address of the request being handled, for `callback`'s refusal
        # line: pyzmq hands the callback only the domain and the key, and
        # handles one request at a time, on this thread.
        self._address = ""

    def start(self) -> None:
        super().start()
        if self.keys is not None:
            for name in DOMAINS.values():
                self.configure_curve_callback(name, self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode("utf-8", "replace") if len(msg) >= 6 else ""
        if len(msg) >= 6 and not self.peers.admit():
            self._refusals.refused(
                time.monotonic(),
                None,
                "connection refused: the broker has %d peers (max_peers) address=%s",
                self.peers.limit,
                self._address,
            )
            self._send_zap_reply(msg[1], b"300", b"too many peers")
            return
        await super().handle_zap_message(msg)

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """pyzmq's credentials-provider hook: is this key allowed here?"""
        assert self.keys is not None  # only configured with a key store
        roles = ROLES_OF_DOMAIN.get(domain, ())
        key = z85_key.decode("ascii")
        if any(self.keys.identity(role, key) is not None for role in roles):
            return True
        elsewhere = (self.keys.identity(role, key) for role in (CLIENT, WORKER))
        known = next((identity for identity in elsewhere if identity), None)
        self._refuse(key, "+".join(roles) or domain, known)
        return False

    def _refuse(self, key: str, socket: str, known: Identity | None) -> None:
        """Log a refused key with what finds its peer: the address it came
        from and, for a key of the other role (`known`: a worker's key given
        to a client, say), the name its certificate has there."""
        self._refusals.refused(
            time.monotonic(),
            fingerprint(key),
            "CURVE key refused key=%s%s socket=%s address=%s: %s",
            fingerprint(key),
            "" if known is None else f" name={known.name}",
            socket,
            self._address or "-",  # ipc and inproc peers have none
            "unknown key" if known is None else f"a {known.role} key",
        )

    def held_back(self, now: float) -> str | None:
        """See `KeyRefusals.held_back`."""
        return self._refusals.held_back(now)


class KeyRefusals:
    """The log of handshakes the gate refused.

    A peer whose key is refused tries again every few seconds for as long as
    it runs, which was a WARNING every few seconds for ever: each key's
    refusals are said at once, then less and less often (`logs.Routine`),
    the lines between at DEBUG. Keys are remembered up to `REMEMBERED`, the
    oldest forgotten first (a key forgotten is said at once again). A flood
    of refusals (many keys, or peers past max_peers) is said at most once a
    second in all.

    Refusals are logged from the gate's thread, and what a burst held back is
    counted from the broker's loop (`held_back`): one lock.
    """

    REMEMBERED = 1024
    FIRST_INTERVAL_S = 10.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flood = RateLimit(per_s=1.0, what="refused handshake")
        self._by_key: Routines[str] = Routines(
            __name__, self.FIRST_INTERVAL_S, remembered=self.REMEMBERED
        )

    def __len__(self) -> int:
        return len(self._by_key)

    def refused(self, now: float, key: str | None, message: str, *args: object) -> None:
        """A handshake refused at `now`, of `key` (its fingerprint; None when
        the refusal is not the key's): log `message % args` if it is due."""
        with self._lock:
            routine = None if key is None else self._by_key.of(key)
            if routine is not None and not routine.due(now):
                routine.note(now, 1)  # counted for its next line
                log.debug(message, *args)
                return
            if not self._flood.allows(now):
                # Counted by the burst; the key's own routine is left as it
                # was, so that the key is named at its next try.
                return
            routine_note = "" if routine is None else routine.note(now, 1)
            flood_note = self._flood.suppressed_note()
        log.warning(message + "%s%s", *args, routine_note, flood_note)

    def held_back(self, now: float) -> str | None:
        """The refusals the flood limit held back since the last one logged,
        once a second passed, in words for a line of the broker's; else None.
        Without it the tail of a burst was counted only at the next refusal,
        if any."""
        with self._lock:
            return self._flood.held_back(now)

"""9/TSP (Titanic) served inside the broker, on the journal.

A `titanic.request` becomes an ordinary task of session ``mdp:titanic:<uuid>``
(task id 0) whose result goes to the recipient ``mdp:titanic``, which never
connects: the result stays journalled until `titanic.close` withdraws it (or
`result_ttl_s` expires it). The task runs on the service's queue like an MDP
client's request, so requeueing and poison limits apply, and everything
survives a broker restart because the journal replays it.

Status codes (9/TSP): 200 OK, 300 pending, 400 unknown (do not retry),
500 try later. A malformed Titanic request and a request that failed for good
(poison, expired) also get 400: asking again would get the same answer.

Pure: the scheduler and a UUID source come in; no sockets, clock or logging.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from . import mdp
from . import protocol as p
from . import scheduler as s
from .errors import ProtocolError

__all__ = ["Titanic"]

RECIPIENT = s.GATEWAY_PREFIX + "titanic"
_UUID = re.compile(rb"[0-9a-f]{32}")


def _session(uuid: str) -> str:
    return f"{RECIPIENT}:{uuid}"


class Titanic:
    """Answers the three Titanic services from the scheduler's state."""

    SERVICES = ("titanic.request", "titanic.reply", "titanic.close")

    def __init__(self, scheduler: s.Scheduler, new_uuid: Callable[[], str]) -> None:
        self._scheduler = scheduler
        self._new_uuid = new_uuid

    def answer(self, service: str, body: Sequence[bytes], now: float) -> list[bytes]:
        """The reply body to a request for Titanic `service`."""
        if service == "titanic.request":
            return self._request(body, now)
        if service not in self.SERVICES:
            return [b"501"]  # as MMI answers names it does not know
        uuid = _uuid(body)
        if uuid is None:
            return [b"400 expected one frame: a 32-digit lowercase hex UUID"]
        if service == "titanic.reply":
            return self._reply(uuid)
        self._scheduler.withdraw(_session(uuid), 0)
        return [b"200"]  # idempotent: an unknown UUID is closed too

    def _request(self, body: Sequence[bytes], now: float) -> list[bytes]:
        if len(body) < 2:
            return [b"400 expected a service name and at least one body frame"]
        try:
            service = mdp.service_name(body[0])
        except ProtocolError as exc:
            return [f"400 {exc}".encode()]
        if mdp.is_reserved(service):
            return [f"400 {service} is the broker's own service".encode()]

        uuid = self._new_uuid()
        spec = p.TaskSpec(0, service, mdp.pack_body(body[1:]), p.Flags.RAW)
        refusal = self._scheduler.accept_task(_session(uuid), spec, now, RECIPIENT)
        if refusal is not None:
            return [f"500 {refusal}".encode()]
        return [b"200", uuid.encode()]

    def _reply(self, uuid: str) -> list[bytes]:
        task = self._scheduler.find_task(_session(uuid), 0)
        if task is None:
            return [b"400 unknown request"]
        if task.state is not s.State.FINISHED or task.status is None:
            return [b"300"]
        if task.status is not p.Status.OK:
            return [f"400 the request failed for good: {task.status.name}".encode()]
        try:
            return [b"200", *mdp.unpack_body(task.result)]
        except ProtocolError:
            return [b"400 the service's reply is not an MDP body"]


def _uuid(body: Sequence[bytes]) -> str | None:
    if len(body) != 1 or not _UUID.fullmatch(body[0]):
        return None
    return body[0].decode()

"""ventilator: a distributed task system for Python, built on ZeroMQ.

A broker queues tasks and hands each to a worker that has room for it; the
worker's result goes back to the client that submitted it, or to a named sink.

    >>> import ventilator
    >>> with ventilator.local(workers=2, modules=["ventilator.examples"]) as cluster:
    ...     with ventilator.Client(cluster.address) as client:
    ...         client.submit("ventilator.examples:square", 7).result()
    49
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The errors are small and every part raises them: imported now.
from .errors import (
    BrokerTimeout,
    ClientBroken,
    ClientClosed,
    FunctionNotFound,
    JournalError,
    NetworkError,
    PickleNotAllowed,
    PoisonTask,
    ProtocolError,
    ResultExpired,
    SessionInUse,
    SessionRefused,
    TaskError,
    TaskRaised,
    TaskRejected,
    TaskTimeout,
    UsageError,
    VentilatorError,
)

# The rest is imported on first use (PEP 562): a process that needs one part
# does not pay for all of them. A worker's task process, started again after
# each task that kills it, imported the whole package in about 0.35 s of CPU;
# `ventilator status` did too.
_HOMES = {
    "AsyncClient": "aio",
    "Backoff": "policy",
    "Broker": "broker",
    "BrokerConfig": "broker",
    "Client": "client",
    "ClientExecutor": "client",
    "ItemOutcome": "client",
    "Limits": "policy",
    "LocalCluster": "embedded",
    "ServerKeys": "security",
    "Sink": "sink",
    "SinkResult": "sink",
    "TaskFuture": "client",
    "Worker": "worker",
    "WorkerConfig": "worker",
    "generate_keys": "security",
    "local": "embedded",
    "mdp_service": "registry",
}

if TYPE_CHECKING:
    from .aio import AsyncClient
    from .broker import Broker, BrokerConfig
    from .client import Client, ClientExecutor, ItemOutcome, TaskFuture
    from .embedded import LocalCluster, local
    from .policy import Backoff, Limits
    from .registry import mdp_service
    from .security import ServerKeys, generate_keys
    from .sink import Sink, SinkResult
    from .worker import Worker, WorkerConfig


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # the next use is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Backoff",
    "Broker",
    "BrokerConfig",
    "BrokerTimeout",
    "Client",
    "ClientBroken",
    "ClientClosed",
    "ClientExecutor",
    "FunctionNotFound",
    "ItemOutcome",
    "JournalError",
    "Limits",
    "LocalCluster",
    "NetworkError",
    "PickleNotAllowed",
    "PoisonTask",
    "ProtocolError",
    "ResultExpired",
    "ServerKeys",
    "SessionInUse",
    "SessionRefused",
    "Sink",
    "SinkResult",
    "TaskError",
    "TaskFuture",
    "TaskRaised",
    "TaskRejected",
    "TaskTimeout",
    "UsageError",
    "VentilatorError",
    "Worker",
    "WorkerConfig",
    "generate_keys",
    "local",
    "mdp_service",
]

"""ventilator: a distributed task system for Python, built on ZeroMQ.

A broker queues tasks and hands each to a worker that has room for it; the
worker's result goes back to the client that submitted it, or to a named sink.

    >>> import ventilator
    >>> with ventilator.local(workers=2, modules=["ventilator.examples"]) as cluster:
    ...     with ventilator.Client(cluster.address) as client:
    ...         client.submit("ventilator.examples:square", 7).result()
    49
"""

from .aio import AsyncClient
from .broker import Broker, BrokerConfig
from .client import Client, ClientExecutor, ItemOutcome, TaskFuture
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
from .local import LocalCluster, local
from .policy import Backoff, Limits
from .registry import mdp_service
from .security import ServerKeys, generate_keys
from .sink import Sink, SinkResult
from .worker import Worker, WorkerConfig

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

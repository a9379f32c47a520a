"""How the worker sends batches to its task processes: a length, then a pickle.

The worker writes these without blocking (see pool.ProcessPool._flush), which a
multiprocessing Connection cannot do; outcomes come back through a Connection,
which the worker reads whole.
"""

from __future__ import annotations

import pickle
import struct
from typing import IO, Any

__all__ = ["frame", "read_message"]

_LENGTH = struct.Struct("!Q")


def frame(message: Any) -> tuple[bytes, bytes]:
    """A message to a child, as its length header and its body."""
    body = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)), body


def read_message(stream: IO[bytes]) -> Any:
    """The next message `frame` made; EOFError when the worker went away."""
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        raise EOFError
    (size,) = _LENGTH.unpack(header)
    body = stream.read(size)
    if len(body) < size:
        raise EOFError
    return pickle.loads(body)

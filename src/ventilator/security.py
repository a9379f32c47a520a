"""CURVE keys, allow lists per role, function rights, and the ZAP gate.

A broker with a secret key is a CURVE server on both sockets: every byte is
encrypted, and only peers whose public key is in the allow list *of that
socket's role* get through the handshake (a client key on the workers' socket is
refused). Allow lists are folders of public certificates as
`zmq.auth.create_certificates` writes them (``NAME.key``); a ``NAME.functions``
file beside one limits that key to the functions matching its glob patterns, one
per line (``reports:*``). No such file: every function.

The broker's gate, which asks a `KeyStore` per handshake, is in `gate`. On an
accepted CURVE connection the ZAP User-Id is the client's public key, so the
broker can tell, for every message, which key sent it, and check it against
the *live* allow list: a key removed by a reload loses access even on a
connection it already holds.

Clients and workers import this module for their keys: what they do not use,
pyzmq's `zmq.auth` (asyncio with it), is imported where it is used.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import zmq
from zmq.utils import z85

from . import protocol as p
from .errors import UsageError
from .scope import Scope

__all__ = [
    "CLIENT",
    "WORKER",
    "ClientKeys",
    "Identity",
    "KeyStore",
    "Reloaded",
    "Rights",
    "ServerKeys",
    "Unread",
    "client_keys",
    "fingerprint",
    "generate_keys",
    "is_loopback",
]

log = logging.getLogger(__name__)

CLIENT = "client"
WORKER = "worker"
# Whose keys a broker socket lets in: the frontend clients', the backend
# workers', an MDP socket either (each message's MDP header says which).
CLIENTS: tuple[str, ...] = (CLIENT,)
WORKERS: tuple[str, ...] = (WORKER,)
MDP: tuple[str, ...] = (CLIENT, WORKER)
# The ZAP domain of each kind of socket: it tells the gate which lists apply.
DOMAINS = {
    CLIENTS: "ventilator.clients",
    WORKERS: "ventilator.workers",
    MDP: "ventilator.mdp",
}
ROLES_OF_DOMAIN = {domain: roles for roles, domain in DOMAINS.items()}
RIGHTS_SUFFIX = ".functions"
# What a connection without CURVE carries as its ZAP User-Id.
ANONYMOUS = "anonymous"
# The name rights are checked against for pickled callables (see `right_name`).
PICKLED_RIGHT = "pickled:"
# The ERROR code of an operator command the sender's key may not give.
NOT_PERMITTED = "not_permitted"
# The ERROR code a client connection hears once its key is removed: it is sent
# no more results (see `Broker._revoke_clients`).
REVOKED = "revoked"
# A session name already inside a key: its fingerprint and a dot, as the broker
# makes it at HELLO and as status, failed and sink records show it.
_QUALIFIED_SESSION = re.compile(r"[0-9a-f]{16}\.")
# Sessions of the broker's own (retries, MDP clients): inside no key.
_BROKER_SESSIONS = ("ventilator:", "mdp:")
# Operator commands as the CLI and the Client name them.
_COMMAND_NAMES = {p.ListFailed: "failed", p.Retry: "retry", p.Purge: "purge"}


# --- rights and identities ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rights:
    """The functions a key may submit (a client) or serve (a worker): globs
    matched against ``module:function``. Pickled tasks are named
    ``pickled:<qualname>``, so only a key granted ``pickled:*`` (or ``*``)
    may submit or run them."""

    patterns: tuple[str, ...] = ("*",)

    def allows(self, function: str) -> bool:
        return any(fnmatch.fnmatchcase(function, p) for p in self.patterns)

    def allows_task(self, function: str, flags: int) -> bool:
        """Whether a task of `function` with these flags is within the rights."""
        return self.allows(right_name(function, flags))

    @property
    def unrestricted(self) -> bool:
        return "*" in self.patterns

    def __str__(self) -> str:
        return ",".join(self.patterns) or "(none)"


def right_name(function: str, flags: int) -> str:
    """The name a task's rights are checked against: its function, or for a
    pickled callable ``pickled:`` and its label, whatever the label claims."""
    if flags & p.Flags.PICKLED:
        return PICKLED_RIGHT + function.removeprefix(PICKLED_RIGHT)
    return function


@dataclass(frozen=True, slots=True)
class Identity:
    """One allowed key: whose it is (the certificate's file name), its role and
    its rights."""

    name: str
    role: str
    public_key: str  # Z85, as the ZAP User-Id carries it
    rights: Rights = Rights()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


@dataclass(frozen=True, slots=True)
class Admitted:
    """What a client's command becomes within its key's rights."""

    command: p.Command | None  # what reaches the scheduler, if anything
    rejected: list[tuple[int, str]]  # (task id, reason): tasks outside the rights
    forbidden: str | None = None  # why the whole command is refused
    code: str = "forbidden"  # the ERROR code that refusal is sent with
    # What the command sees and reaches, for a key with limited rights.
    scope: Scope | None = None


class Admission:
    """What each key may do, decided apart from the broker's socket loop.

    Args:
        curve: peers have keys, so sessions are kept apart by key.
        pickle_permitted: workers may run pickled callables at all; not on a
            broker reachable from other machines without CURVE, unless
            --insecure.
    """

    def __init__(self, curve: bool, pickle_permitted: bool) -> None:
        self._curve = curve
        self._pickle_permitted = pickle_permitted

    def client(self, identity: Identity, command: p.Command) -> Admitted:
        if isinstance(command, p.Submit) and not identity.rights.unrestricted:
            return self._submit(identity, command)
        if isinstance(command, p.Hello) and self._curve:
            return self._hello(identity, command)
        if isinstance(command, p.OPERATOR_TYPES) and self._curve:
            return self._operator(identity, command)
        if isinstance(command, p.StatusRequest) and self._curve:
            return Admitted(command, [], scope=scope_of(identity))
        return Admitted(command, [])

    def _submit(self, identity: Identity, submit: p.Submit) -> Admitted:
        # One refusal per task id, however many copies a raw client sent; and
        # none of its copies goes on, or the id would be accepted and refused.
        refused: dict[int, str] = {}
        for spec in submit.tasks:
            name = right_name(spec.function, spec.flags)
            if spec.task_id not in refused and not identity.rights.allows(name):
                refused[spec.task_id] = (
                    f"key {identity.name} ({identity.fingerprint}) may not submit "
                    f"{name}; it may submit {identity.rights}"
                )
        allowed = [spec for spec in submit.tasks if spec.task_id not in refused]
        return Admitted(p.Submit(allowed) if allowed else None, list(refused.items()))

    def _hello(self, identity: Identity, hello: p.Hello) -> Admitted:
        # A sink collects other keys' results: a key with limited rights may
        # register only the sinks its rights name (``sink:NAME``).
        if hello.sink is not None and not identity.rights.allows(f"sink:{hello.sink}"):
            reason = (
                f"key {identity.name} ({identity.fingerprint}) may not receive the "
                f"results of sink {hello.sink!r}; its rights are {identity.rights}"
            )
            return Admitted(None, [], forbidden=reason)
        # Sessions live inside their key: another key cannot take over a
        # session (and its results) by guessing its name.
        session = f"{identity.fingerprint}.{hello.session}"
        return Admitted(replace(hello, session=session), [])

    def _operator(self, identity: Identity, command: p.OperatorCommand) -> Admitted:
        """An operator command within the key's rights.

        A key limited by a ``.functions`` file operates on its own sessions'
        work only: it may cancel their tasks, read their failures and retry
        them (into a sink its rights name, as functions they still allow);
        purge empties a function's queue of every key's tasks, so it is for
        keys with every right. A session named without a key is the caller's
        own, as at HELLO.
        """
        if isinstance(command, p.CancelTask):
            return self._cancel(identity, command)
        if identity.rights.unrestricted:
            return Admitted(command, [])
        if isinstance(command, p.ListFailed):
            return Admitted(command, [], scope=scope_of(identity))
        if isinstance(command, p.Retry):
            return self._retry(identity, command)
        reason = (
            f"key {identity.name} ({identity.fingerprint}) may not use "
            f"{_COMMAND_NAMES[type(command)]}: it reaches every key's tasks, so "
            "it is for keys without a .functions file"
        )
        return Admitted(None, [], forbidden=reason, code=NOT_PERMITTED)

    def _cancel(self, identity: Identity, command: p.CancelTask) -> Admitted:
        session = qualified_session(identity, command.session)
        command = p.CancelTask(session, command.task_id)
        mine = session.startswith(f"{identity.fingerprint}.")
        if mine or identity.rights.unrestricted:
            return Admitted(command, [])
        reason = (
            f"key {identity.name} ({identity.fingerprint}) may cancel only "
            f"its own sessions' tasks, not those of session {session!r}: a key "
            "with a .functions file operates on its own work"
        )
        return Admitted(None, [], forbidden=reason, code=NOT_PERMITTED)

    def _retry(self, identity: Identity, command: p.Retry) -> Admitted:
        # The reruns' results go to the sink: one the key may not receive
        # would hand its results to whoever does, or mix them into theirs.
        scope = scope_of(identity)
        if identity.rights.allows(f"sink:{command.sink}"):
            return Admitted(command, [], scope=scope)
        reason = (
            f"key {identity.name} ({identity.fingerprint}) may retry only into a "
            f"sink its rights name, not {command.sink!r}: add sink:{command.sink} "
            f"to its .functions file (its rights are {identity.rights})"
        )
        if not command.tickets or scope is None:  # all its failures: none may go
            return Admitted(None, [], forbidden=reason, code=NOT_PERMITTED)
        # Named tickets are refused one by one, by the rule that applies to
        # each: the sink for its own failures, but another key's are not its
        # to retry into any sink (the scheduler says so of those).
        return Admitted(command, [], scope=replace(scope, retry_refusal=reason))

    def ready(self, identity: Identity, ready: p.Ready) -> p.Ready:
        """A worker's registration, cut down to its rights."""
        rights = identity.rights
        services = [name for name in ready.services if rights.allows(name)]
        pickle = (
            ready.allow_pickle
            and self._pickle_permitted
            and rights.allows(PICKLED_RIGHT)
        )
        refused = len(ready.services) - len(services)
        if refused or pickle != ready.allow_pickle:
            log.warning(
                "worker registered with less than it asked for worker=%s key=%s "
                "(%s): %d functions outside its rights %s%s",
                ready.worker_id,
                identity.name,
                identity.fingerprint,
                refused,
                rights,
                "; pickled callables refused"
                if ready.allow_pickle and not pickle
                else "",
            )
        problem = ready.problem
        if ready.services and not services and problem is None:
            # Else status shows it "not serving" with no reason.
            problem = (
                f"key {identity.name} ({identity.fingerprint}) may serve none of "
                f"its {len(ready.services)} functions: its rights are {rights}"
            )
        return replace(ready, services=services, allow_pickle=pickle, problem=problem)


def scope_of(identity: Identity) -> Scope | None:
    """What a key's status and operator commands see and reach: with limited
    rights, its own sessions and the functions it may submit; else all."""
    if identity.rights.unrestricted:
        return None
    return Scope(f"{identity.fingerprint}.", identity.rights.allows_task)


def qualified_session(identity: Identity, session: str) -> str:
    """The full name of a session a client names under CURVE.

    Sessions live inside their key, so a bare name is the caller's own (as at
    HELLO); a name already inside a key (``<fingerprint>.<name>``, as status,
    failed and sink records show it) or one of the broker's own is taken as
    it is. A session its user named like a fingerprint and a dot must then be
    given in full.
    """
    if session.startswith(_BROKER_SESSIONS) or _QUALIFIED_SESSION.match(session):
        return session
    return f"{identity.fingerprint}.{session}"


def fingerprint(public_key: str | bytes) -> str:
    """A short, stable, log-safe name for a public key (Z85 text or 32 raw bytes)."""
    raw = public_key if isinstance(public_key, bytes) else public_key.encode()
    if len(raw) == 40:
        # Not Z85 after all: hash what we were given.
        with contextlib.suppress(ValueError, KeyError, IndexError):
            raw = z85.decode(raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# --- key files -----------------------------------------------------------------------


def generate_keys(
    name: str, directory: str | os.PathLike[str], functions: Iterable[str] = ()
) -> tuple[Path, Path]:
    """Write ``NAME.key`` (public) and ``NAME.key_secret`` (mode 0600).

    With `functions`, also ``NAME.functions``: copy it into the broker's allow
    list folder beside ``NAME.key`` to limit the key to those functions.

    Returns:
        The paths of the public and secret files.

    Raises:
        UsageError: the name is not a plain file name, the files exist, or a
            function pattern is empty or not a valid glob; nothing is written.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise UsageError(f"a key name must be a plain file name, got {name!r}")
    patterns = [pattern.strip() for pattern in functions]
    for pattern in patterns:
        problem = _pattern_problem(pattern)
        if problem is not None:
            raise UsageError(problem)
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    public, secret = target / f"{name}.key", target / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise UsageError(f"{path} exists; refusing to overwrite a key")

    # Written in a private folder first: the secret is never readable by others,
    # not even between its creation and the chmod.
    staging = Path(tempfile.mkdtemp(prefix=".keys-", dir=target))
    try:
        import zmq.auth

        made_public, made_secret = zmq.auth.create_certificates(staging, name)
        os.chmod(made_secret, 0o600)
        os.replace(made_secret, secret)
        os.replace(made_public, public)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if patterns:
        (target / f"{name}{RIGHTS_SUFFIX}").write_text("\n".join(patterns) + "\n")
    return public, secret


def _pattern_problem(pattern: str) -> str | None:
    """Why `pattern` cannot be a line of a rights file; None when it can."""
    if not pattern:
        return (
            "a function pattern is empty: a rights file without patterns lets "
            "the key use no function at all; leave the patterns out to let it "
            "use every function, or name them ('reports:*')"
        )
    if not pattern.isprintable() or any(char.isspace() for char in pattern):
        return f"function pattern {pattern!r} has a space or control character"
    # fnmatch takes a '[' it cannot close as a plain character, silently: the
    # pattern would match something else than its author meant.
    if re.search(r"\[(?![^\]]*\])", pattern):
        return (
            f"function pattern {pattern!r} is not a valid glob: a '[' is never "
            "closed by ']'"
        )
    return None


def read_secret_key(
    path: str | os.PathLike[str], what: str = "the secret key file"
) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a ``.key_secret`` file; `what` names
    the argument it came from, for errors.

    Raises:
        UsageError: the file is missing, or holds no secret key.
    """
    public, secret = _load(path, what)
    if secret is None:
        raise UsageError(
            f"{what} {path} holds no secret key; pass the NAME.key_secret file "
            "that `ventilator keys generate` wrote"
        )
    _warn_if_others_may_read(Path(path))
    return public, secret


def _warn_if_others_may_read(path: Path) -> None:
    """A secret key that other users may read is anyone's key: said, not
    refused, since a deploy whose files came out 0644 must not stop."""
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning(
                "the secret key file %s can be read by other users (mode %04o): "
                "anyone who reads it can pass for its owner; chmod 600 %s",
                path,
                mode,
                path,
            )


def read_public_key(
    path: str | os.PathLike[str], what: str = "the certificate file"
) -> bytes:
    """The Z85 public key of a certificate file (``.key`` or ``.key_secret``)."""
    return _load(path, what)[0]


# Every character a Z85-encoded key may hold (ZeroMQ RFC 32).
_Z85 = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)


def _load(path: str | os.PathLike[str], what: str) -> tuple[bytes, bytes | None]:
    # Keys are given as files: a key passed in their place must not end up in
    # an error message, and from there in a log or a terminal's scrollback.
    if not isinstance(path, str | os.PathLike):
        raise UsageError(
            f"{what} must be a path to a key file (str or os.PathLike), got "
            f"{type(path).__name__}; its value is not shown, as it may be a key"
        )
    try:
        import zmq.auth

        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        if _looks_like_a_key(path):
            raise UsageError(
                f"{what} must be a path to a key file, and no such file exists; "
                "what was given looks like a key itself (not shown): write it "
                "to a file, as `ventilator keys generate` does, and pass its path"
            ) from None
        if isinstance(exc, ValueError):  # pyzmq: "No public key found in ..."
            raise UsageError(
                f"{what} {path} is not a CURVE key file: it holds no key in the "
                "form `ventilator keys generate` writes"
            ) from exc
        raise UsageError(f"cannot read a CURVE key from {what} {path}: {exc}") from exc


def _looks_like_a_key(path: str | os.PathLike[str]) -> bool:
    text = os.fspath(path)
    return (
        isinstance(text, str)
        and len(text) == 40
        and _Z85.issuperset(text)
        and not os.path.exists(text)
    )


UnreadKind = Literal["folder", "certificate", "rights file"]


@dataclass(frozen=True, slots=True)
class Unread:
    """A file or folder of an allow list that could not be read, and what
    stays in force in its place."""

    path: Path
    role: str
    what: UnreadKind
    problem: str  # why, naming the path
    # What the lists in force had for it: the whole list for a folder, the
    # key's old identity for one of its files; empty, nothing is let in.
    kept: tuple[Identity, ...] = ()


def read_allow_list(
    directory: str | os.PathLike[str], role: str, old: Mapping[str, Identity]
) -> tuple[dict[str, Identity], list[Unread]]:
    """Every ``*.key`` in `directory` as an `Identity`, keyed by its Z85 key;
    and the files it could not read, each replaced by what `old` (the list in
    force, empty at start) had for it.

    A bad file keeps what it gave, rather than fail the whole reload: an
    operator removing a leaked key must see it go even if another file is
    being edited, and a file half written must not lock a good peer out. A
    folder that cannot be listed keeps the whole old list: a folder renamed
    must not remove every key of a role.
    """
    folder = Path(directory)
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        problem = f"the {role} allow list {folder} cannot be listed: {exc.strerror}"
        return dict(old), [Unread(folder, role, "folder", problem, (*old.values(),))]
    _warn_if_others_may_write(folder, role)
    allowed: dict[str, Identity] = {}
    unread: list[Unread] = []
    for certificate in (folder / name for name in names if name.endswith(".key")):
        identity, unreadable = _read_identity(certificate, role, old)
        if unreadable is not None:
            unread.append(unreadable)
        # A key read from a good file wins over one kept for a bad file.
        if identity is not None and (
            unreadable is None or identity.public_key not in allowed
        ):
            allowed[identity.public_key] = identity
    return allowed, unread


def _warn_if_others_may_write(folder: Path, role: str) -> None:
    with contextlib.suppress(OSError):
        if stat.S_IMODE(folder.stat().st_mode) & 0o022:
            log.warning(
                "the %s allow list %s can be written by other users: anyone who "
                "can add a .key file there gets in; chmod go-w %s",
                role,
                folder,
                folder,
            )


def _read_identity(
    certificate: Path, role: str, old: Mapping[str, Identity]
) -> tuple[Identity | None, Unread | None]:
    """The identity a certificate and its rights file give, or, if one of them
    cannot be read, what `old` had for it (None: nothing) and why."""
    try:
        key = _read_allowed_key(certificate)
    except UsageError as exc:
        # The key is unknown, so its old identity is found by file name.
        kept = next((i for i in old.values() if i.name == certificate.stem), None)
        return kept, _unread(certificate, role, "certificate", exc, kept)
    rights_file = certificate.with_suffix(RIGHTS_SUFFIX)
    try:
        rights = _read_rights(rights_file)
    except UsageError as exc:
        before = old.get(key)
        kept = None if before is None else replace(before, name=certificate.stem)
        return kept, _unread(rights_file, role, "rights file", exc, kept)
    return Identity(certificate.stem, role, key, rights), None


def _unread(
    path: Path, role: str, what: UnreadKind, exc: UsageError, kept: Identity | None
) -> Unread:
    return Unread(path, role, what, str(exc), () if kept is None else (kept,))


def _read_allowed_key(certificate: Path) -> str:
    """The Z85 public key of an allow list's certificate.

    Raises:
        UsageError: the file cannot be read or holds no whole key; pyzmq takes
            whatever follows ``public-key =``, so a file cut short in a copy
            would otherwise be a wrong key, and lock its peer out.
    """
    # Latin-1 decodes any bytes, so that whatever the file holds is checked.
    key = read_public_key(certificate).decode("latin-1")
    if len(key) != 40 or not _Z85.issuperset(key):
        raise UsageError(
            f"the certificate file {certificate} holds no whole public key: "
            f"{len(key)} characters, not the 40 Z85 characters `ventilator keys "
            "generate` writes (a copy cut short?)"
        )
    return key


def _read_rights(path: Path) -> Rights:
    """The rights a ``.functions`` file beside a key gives it (none: every
    function).

    Raises:
        UsageError: the file cannot be read, is not UTF-8 text, or holds a
            pattern that is no glob; named, so that a reload keeps the key's
            old rights and says which file to mend, rather than stop the broker.
    """
    if not path.exists():
        return Rights()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"the rights file {path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise UsageError(f"cannot read the rights file {path}: {exc}") from exc
    lines = (line.strip() for line in text.splitlines())
    patterns = tuple(p for p in lines if p and not p.startswith("#"))
    for pattern in patterns:
        problem = _pattern_problem(pattern)
        if problem is not None:
            raise UsageError(f"the rights file {path}: {problem}")
    return Rights(patterns)


# --- the live allow lists -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reloaded:
    """What a reload of the allow lists changed, and what it could not read."""

    # The identities that lost access or changed rights: their connections
    # must be looked at again.
    changed: tuple[Identity, ...]
    unread: tuple[Unread, ...]


class KeyStore:
    """The broker's allow lists, one per role, reloadable while it runs.

    Read from the ZAP thread and the broker's loop, replaced whole by `reload`:
    a reader sees the old lists or the new ones, never half of each.

    Raises:
        UsageError: at start, a folder or a file cannot be read (each is
            named): with no lists in force there is nothing to keep in its
            place, and a broker must not start with fewer keys than given.
    """

    def __init__(self, folders: Mapping[str, str | os.PathLike[str]]) -> None:
        self._folders = dict(folders)
        self._lists: dict[str, dict[str, Identity]] = {}
        unread = self.reload().unread
        if unread:
            raise UsageError(
                "; ".join(u.problem for u in unread)
                + ": mend or remove the files named, then start the broker again"
            )

    def reload(self) -> Reloaded:
        """Read the folders again, and apply whatever could be read.

        A key whose certificate or rights file cannot be read keeps its old
        identity and rights (a new one is not let in); a folder that cannot
        be read keeps its role's whole list. Each is in `Reloaded.unread`.
        """
        fresh: dict[str, dict[str, Identity]] = {}
        unread: list[Unread] = []
        for role, folder in self._folders.items():
            fresh[role], role_unread = read_allow_list(
                folder, role, self._lists.get(role, {})
            )
            unread.extend(role_unread)
        old, self._lists = self._lists, fresh
        changed = tuple(
            identity
            for role, identities in old.items()
            for key, identity in identities.items()
            if fresh[role].get(key) != identity
        )
        return Reloaded(changed, tuple(unread))

    def identity(self, role: str, public_key: str) -> Identity | None:
        return self._lists.get(role, {}).get(public_key)

    def counts(self) -> dict[str, int]:
        return {role: len(keys) for role, keys in self._lists.items()}


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """The broker's CURVE settings: its secret key and one allow list per role."""

    secret_key: str
    clients: str
    workers: str

    def key_store(self) -> KeyStore:
        return KeyStore({CLIENT: self.clients, WORKER: self.workers})

    def apply(self, sock: zmq.Socket[Any], roles: tuple[str, ...]) -> None:
        """Make `sock` a CURVE server letting in the keys of `roles`."""
        _, secret = read_secret_key(self.secret_key)
        sock.curve_server = True
        sock.curve_secretkey = secret
        sock.zap_domain = domain(roles).encode()


def domain(roles: tuple[str, ...]) -> str:
    """The ZAP domain of a socket that lets in the keys of `roles`."""
    return DOMAINS[roles]


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """A client's, sink's or worker's CURVE keys: its own pair, and the broker's
    public key (without which the broker cannot be told from an impostor)."""

    public_key: bytes
    secret_key: bytes
    broker_key: bytes

    @classmethod
    def load(
        cls, secret_key: str | os.PathLike[str], broker_key: str | os.PathLike[str]
    ) -> ClientKeys:
        public, secret = read_secret_key(secret_key, "secret_key (--secret-key)")
        return cls(public, secret, _broker_public_key(broker_key))

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_publickey = self.public_key
        sock.curve_secretkey = self.secret_key
        sock.curve_serverkey = self.broker_key


def _broker_public_key(path: str | os.PathLike[str]) -> bytes:
    """The broker's public key from its ``.key`` file. Its ``.key_secret``
    holds the public key too, but a copy of it on a peer is a leaked secret:
    refused, so that it is noticed and removed rather than relied on."""
    what = "broker_key (--broker-key)"
    public, secret = _load(path, what)
    if secret is not None:
        raise UsageError(
            f"{what} {path} is a secret key file: give the broker's public key "
            "(its .key file); the .key_secret belongs on the broker alone, and "
            "a copy elsewhere should be deleted"
        )
    return public


def client_keys(
    secret_key: str | os.PathLike[str] | None,
    broker_key: str | os.PathLike[str] | None,
) -> ClientKeys | None:
    """The keys a peer connects with, from its two key files; None (neither
    given) for a plain-text connection.

    Raises:
        UsageError: only one of the two is given, or a file is unreadable.
    """
    if secret_key is None and broker_key is None:
        return None
    if secret_key is None or broker_key is None:
        raise UsageError(
            "CURVE needs both a secret key (--secret-key) and the broker's public "
            "key (--broker-key)"
        )
    return ClientKeys.load(secret_key, broker_key)


def is_loopback(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint can only be reached from this machine."""
    if not endpoint.startswith("tcp://"):
        return endpoint.startswith(("ipc://", "inproc://"))
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: assume exposed

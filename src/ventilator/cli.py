"""The `ventilator` command line.

Every option can also come from the environment: ``VENTILATOR_<COMMAND>_<OPTION>``,
e.g. ``VENTILATOR_WORKER_CONNECT`` or ``VENTILATOR_BROKER_JOURNAL``. This is the
only module that configures logging.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, NoReturn

import click
from click.core import ParameterSource

from . import _lifeline, logs
from . import protocol as p
from ._allocator import keep_freed_memory
from ._cli_errors import or_usage_error
from ._wire import check_endpoint
from ._words import counted
from .errors import (
    JournalError,
    NetworkError,
    ProtocolError,
    UsageError,
)
from .policy import (
    DEFAULT_ADDRESS,
    DEFAULT_JOURNAL_MIN_FREE_BYTES,
    DURABILITY_MODES,
    MAX_INTERVAL_S,
    MIN_HEARTBEAT_INTERVAL_S,
    Limits,
    MdpSettings,
)
from .pool import POOL_KINDS
from .registry import resolve
from .security import ServerKeys, fingerprint, generate_keys, read_public_key

# What map, exec, status, failed and sink run is imported by those commands
# when they run, as broker() imports the broker: not by every command's start.
if TYPE_CHECKING:
    from ._run_output import Output, OutputFailed
    from ._runs import Run
    from .broker import Broker
    from .client import Client
    from .dashboard import DashboardServer
    from .worker import Worker, WorkerConfig

log = logging.getLogger(__name__)

_DEFAULT_LIMITS = Limits()
# The most a broker's count or size option may be: beyond any machine, and
# within the 64-bit counts the protocol carries and ZeroMQ's message-size
# option, both of which a larger value made fail once the broker was running.
MAX_LIMIT_OPTION = 2**62
# How long map/exec wait for a broker named with --connect to answer at all.
BROKER_ANSWER_S = 10.0


class _FiniteRange(click.FloatRange):
    """A range of floats without nan and inf, which every range check lets
    through (nan compares false) and no duration or interval means."""

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def _log_setting(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Apply --log-level or --log-format, given before or after the command.

    The group's options are the defaults; a command's own override them. Both
    go through here, and logging is set up again with what is known so far.
    """
    root = ctx.find_root()
    settings = root.meta.setdefault("ventilator.logging", {"level": "WARNING"})
    settings.setdefault("format", "text")
    if value is not None:
        # The parameters are named after their options (log_level), so that
        # their variables are too: VENTILATOR_MAP_LOG_LEVEL.
        settings[str(param.name).removeprefix("log_")] = value
    logs.configure(settings["level"], settings["format"])


def _log_settings() -> tuple[str, str]:
    """(level, format) that logging was set up with for this command."""
    settings = click.get_current_context().find_root().meta["ventilator.logging"]
    return str(settings["level"]).upper(), str(settings["format"])


def _say_started(line: str) -> None:
    """Tell a person at a terminal that a server command is up, and how to
    stop it: at the default level it logs nothing at all while all is well,
    and a new user took its silence for a hang. Not in JSON logs, not when
    INFO says it anyway, not from a process a map or exec runs for itself."""
    level, log_format = _log_settings()
    embedded = _lifeline.ENV in os.environ
    quiet = logging.getLevelName(level) > logging.INFO
    if sys.stderr.isatty() and log_format == "text" and quiet and not embedded:
        click.echo(f"ventilator {line}", err=True)


def _logging_options(default: bool) -> Callable[[Callable[..., Any]], Any]:
    """--log-level and --log-format; `default` shows the defaults (the group)."""

    def decorate(command: Callable[..., Any]) -> Any:
        command = click.option(
            "--log-format",
            type=click.Choice(logs.LOG_FORMATS),
            default="text" if default else None,
            show_default=default,
            expose_value=False,
            callback=_log_setting,
            help="Log lines as text, or one JSON object per line.",
        )(command)
        return click.option(
            "--log-level",
            type=click.Choice(logs.LOG_LEVELS, case_sensitive=False),
            default="WARNING" if default else None,
            show_default=default,
            expose_value=False,
            callback=_log_setting,
            help="Log records at this level and above go to stderr.",
        )(command)

    return decorate


class _Commands(click.Group):
    """The command group; a bad value from a `VENTILATOR_*` variable is
    reported under the variable's name, not only the option's, which the user
    never typed. The group's own options are parsed in `make_context`, its
    commands' (at any depth) in `invoke`."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.BadParameter as exc:
            _name_the_variable(exc)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.BadParameter as exc:
            _name_the_variable(exc)
            raise


def _name_the_variable(exc: click.BadParameter) -> None:
    ctx, param = exc.ctx, exc.param
    if ctx is None or not isinstance(param, click.Option) or param.name is None:
        return
    if ctx.get_parameter_source(param.name) is not ParameterSource.ENVIRONMENT:
        return
    envvar = param.envvar or f"{ctx.auto_envvar_prefix}_{param.name.upper()}"
    exc.param_hint = f"{envvar} (the environment's value for {param.opts[0]})"


@click.group(cls=_Commands, context_settings={"auto_envvar_prefix": "VENTILATOR"})
@_logging_options(default=True)
@click.version_option(package_name="ventilator")
def cli() -> None:
    """ventilator: a distributed task system on ZeroMQ."""


def main() -> None:
    """Entry point of the `ventilator` command and of `python -m ventilator`."""
    _fill_closed_streams()
    _find_modules_in_working_directory()
    try:
        cli()
    except UsageError as exc:
        # What the library refused as a wrong call (a malformed address, say)
        # is the user's error, told as click tells its own: no traceback.
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)


# Standard streams that were closed when the command started (0, 1, 2).
_CLOSED_STREAMS: set[int] = set()


def _fill_closed_streams() -> None:
    """Put /dev/null where a standard stream was closed (`2>&-`).

    Otherwise the first file or socket opened takes its descriptor, and what
    is meant for stderr (a log line, a child's traceback) lands in it; and
    Python, finding no stream, leaves sys.stderr None, on which the first
    message fails. Output that would go to a closed stdout is refused where it
    is opened (see _open_output), as Unix tools refuse to write there.
    """
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            _CLOSED_STREAMS.add(fd)
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            mode = "r" if fd == 0 else "w"
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115


def _find_modules_in_working_directory() -> None:
    """Put the working directory first on `sys.path`, as `python -m` does and
    the console script does not: ``ventilator map mytasks:f`` then finds
    mytasks.py where it runs, as other task runners' commands do. Embedded
    workers and their task processes inherit it (see `LocalCluster`)."""
    with contextlib.suppress(OSError):  # a working directory deleted under us
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)


def _stop_on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _limit_option(
    flag: str, help: str, type: click.ParamType[Any] | None = None
) -> Callable[..., Any]:
    """A broker option for the `Limits` field the flag names (``--max-peers``:
    ``max_peers``), with that field's default: the two cannot drift apart."""
    field = flag.removeprefix("--").replace("-", "_")
    return click.option(
        flag,
        type=type or click.IntRange(min=1, max=MAX_LIMIT_OPTION),
        default=getattr(_DEFAULT_LIMITS, field),
        show_default=True,
        help=help,
    )


def _key_file(
    help_text: str, name: str = "--secret-key", envvar: str | None = None
) -> Callable[..., Any]:
    return click.option(
        name,
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        envvar=envvar,
        help=help_text,
    )


def _peer_keys(command: Callable[..., Any]) -> Callable[..., Any]:
    """--secret-key and --broker-key, for everything that connects to a broker;
    one pair of variables for all of them, since one machine has one identity."""
    command = _key_file(
        "The broker's public .key file (CURVE)  [env: VENTILATOR_BROKER_KEY]",
        "--broker-key",
        "VENTILATOR_BROKER_KEY",
    )(command)
    secret_key = _key_file(
        "This peer's .key_secret file (CURVE)  [env: VENTILATOR_SECRET_KEY]",
        envvar="VENTILATOR_SECRET_KEY",
    )
    return secret_key(command)  # type: ignore[no-any-return]


# --- keys -------------------------------------------------------------------------


@cli.group()
@_logging_options(default=False)
def keys() -> None:
    """CURVE key pairs for brokers, clients and workers."""


@keys.command(name="generate")
@_logging_options(default=False)
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where to write NAME.key and NAME.key_secret.",
)
@click.option(
    "--functions",
    multiple=True,
    help="Limit the key to functions matching this glob (repeatable), e.g. "
    "'reports:*'; written to NAME.functions, to copy beside NAME.key.",
)
def keys_generate(name: str, directory: str, functions: tuple[str, ...]) -> None:
    """Write a key pair: NAME.key (public, give it out) and NAME.key_secret
    (mode 0600, keep it)."""
    public, secret = or_usage_error(lambda: generate_keys(name, directory, functions))
    click.echo(f"public key: {public}\nsecret key: {secret}")
    if functions:
        click.echo(f"rights:     {public.with_suffix('.functions')}")


@keys.command(name="fingerprint")
@_logging_options(default=False)
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def keys_fingerprint(files: tuple[str, ...]) -> None:
    """Print the fingerprint of each key file (NAME.key or NAME.key_secret):
    the 16 hex digits the broker's and peers' logs name a key by."""
    for path in files:
        public = or_usage_error(functools.partial(read_public_key, path))
        click.echo(f"{fingerprint(public)}  {path}")


# --- broker and worker ----------------------------------------------------------


_heartbeat_option = click.option(
    "--heartbeat-interval-s",
    type=_FiniteRange(MIN_HEARTBEAT_INTERVAL_S, MAX_INTERVAL_S),
    default=1.0,
    show_default=True,
    help="Seconds between heartbeats; silence for 3 of them is death.",
)


def _bind_address(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Check an address to bind before anything starts (or warns about it)."""
    if value is not None:
        try:
            check_endpoint(value, "the address", to_bind=True)
        except UsageError as exc:
            raise click.BadParameter(str(exc), ctx, param) from None
    return value


@cli.command()
@_logging_options(default=False)
@click.option(
    "--frontend",
    default="tcp://127.0.0.1:5555",
    show_default=True,
    help="Endpoint clients and sinks connect to.",
    callback=_bind_address,
)
@click.option(
    "--backend",
    default="tcp://127.0.0.1:5556",
    show_default=True,
    help="Endpoint workers connect to.",
    callback=_bind_address,
)
@click.option(
    "--journal",
    default="ventilator-journal.db",
    show_default=True,
    help="SQLite journal file of accepted tasks.",
)
@click.option(
    "--durability",
    default="process",
    show_default=True,
    type=click.Choice(DURABILITY_MODES),
    help="Survive a process kill, power loss (fsync), or nothing (memory).",
)
@click.option(
    "--journal-min-free-bytes",
    type=click.IntRange(min=0),
    default=DEFAULT_JOURNAL_MIN_FREE_BYTES,
    show_default=True,
    help="Refuse new tasks while the journal's disk has less room (0: never).",
)
@_limit_option(
    "--max-payload-bytes",
    "Largest task arguments or result; larger ones are refused, naming the limit.",
)
@_limit_option(
    "--max-queued-tasks",
    "Tasks held in all: queued, running, and results waiting for "
    "delivery; past it new tasks are refused.",
)
@_limit_option(
    "--client-window",
    "Tasks one client may have in the broker.",
)
@_heartbeat_option
@_limit_option(
    "--max-attempts",
    "Times a task's process dies or its worker is lost under it before it "
    "fails as poison.",
)
@click.option(
    "--mdp",
    default=None,
    callback=_bind_address,
    help="Also serve Majordomo (7/MDP) clients and workers on this endpoint; "
    "they are welcome on the frontend and backend too.",
)
@click.option(
    "--mdp-heartbeat",
    type=_FiniteRange(min=0.01),
    default=MdpSettings().heartbeat_interval_s,
    show_default=True,
    help="Seconds between heartbeats to MDP workers (zguide's peers use 2.5).",
)
@click.option(
    "--mdp-liveness",
    type=click.IntRange(min=1),
    default=MdpSettings().liveness,
    show_default=True,
    help="Heartbeats an idle MDP worker may miss before it is presumed dead.",
)
@click.option(
    "--mdp-unserved-expiry",
    type=_FiniteRange(min=0.0),
    default=MdpSettings().unserved_expiry_s,
    show_default=True,
    help="Seconds an MDP request waits for a worker of its service when none "
    "offers it; then it is answered '400 expired: ...' and forgotten.",
)
@click.option(
    "--mdp-unserved-per-service",
    type=click.IntRange(min=1),
    default=MdpSettings().unserved_per_service,
    show_default=True,
    help="MDP requests that may wait for one service no worker offers; more "
    "are answered '500 ...'.",
)
@click.option(
    "--mdp-unserved-total",
    type=click.IntRange(min=1),
    default=MdpSettings().unserved_total,
    show_default=True,
    help="MDP requests that may wait for services no worker offers, all "
    "together; more are answered '500 ...'.",
)
@_limit_option(
    "--client-max-bytes",
    "Payload and result bytes one client may have in the broker.",
)
@_limit_option(
    "--max-queued-bytes",
    "Argument and result bytes held in all; past it new tasks are refused.",
)
@_limit_option(
    "--max-peers",
    "Connections on both sockets together; more are refused at their "
    "handshake, and their ZeroMQ retries: they wait for a free place.",
)
@_limit_option(
    "--max-sessions",
    "Client sessions and sinks remembered at once; a HELLO naming a new "
    "one past it is refused, naming the limit.",
)
@_limit_option(
    "--max-questions-per-s",
    "Questions (status, operator commands) one connection may ask in a "
    "second; past it each is answered at once with a refusal naming the limit.",
)
@_limit_option(
    "--session-grace-s",
    "Seconds after it was last heard that a session which left, owing "
    "and holding nothing, is forgotten (status shows it until then).",
    type=_FiniteRange(min=0.0),
)
@_limit_option(
    "--orphan-grace-s",
    "Seconds a client session must have had no client connected before a "
    "full broker drops its results (oldest first) to make room; each leaves "
    "a tombstone saying why. Sinks' results are never dropped this way.",
    type=_FiniteRange(min=0.0),
)
@_key_file(
    "The broker's .key_secret file; turns CURVE on (needs --clients, --workers)."
)
@click.option(
    "--clients",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of client public keys (NAME.key, optional NAME.functions).",
)
@click.option(
    "--workers",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of worker public keys (NAME.key, optional NAME.functions).",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Without CURVE on a non-loopback address, still let workers run "
    "pickled callables.",
)
@click.option(
    "--no-shared-memory",
    "shared_memory",
    flag_value=False,
    default=True,
    help="Send large payloads in messages even to clients and workers on "
    "this machine (they go through shared memory otherwise).",
)
@click.option(
    "--announce",
    is_flag=True,
    help="Print the bound endpoints as one JSON line on stdout.",
)
@click.option(
    "--http",
    "http_address",
    default=None,
    metavar="HOST:PORT",
    help="Serve the dashboard, /metrics, /health and /api here (port 0: any "
    "free port)  [default: off]",
)
@click.option(
    "--http-allow-remote",
    is_flag=True,
    help="Allow --http on a non-loopback address; it has no authentication.",
)
def broker(
    frontend: str,
    backend: str,
    journal: str,
    durability: str,
    journal_min_free_bytes: int,
    max_payload_bytes: int,
    max_queued_tasks: int,
    client_window: int,
    heartbeat_interval_s: float,
    max_attempts: int,
    mdp: str | None,
    mdp_heartbeat: float,
    mdp_liveness: int,
    mdp_unserved_expiry: float,
    mdp_unserved_per_service: int,
    mdp_unserved_total: int,
    client_max_bytes: int,
    max_queued_bytes: int,
    max_peers: int,
    max_sessions: int,
    max_questions_per_s: int,
    session_grace_s: float,
    orphan_grace_s: float,
    secret_key: str | None,
    clients: str | None,
    workers: str | None,
    insecure: bool,
    shared_memory: bool,
    announce: bool,
    http_address: str | None,
    http_allow_remote: bool,
) -> None:
    """Run a broker: queue tasks from clients, hand them to workers.

    With --secret-key, only clients and workers whose public keys are in
    --clients and --workers get in; SIGHUP reads those folders again.
    """
    # Here, not at the top: every command's process would load them, a
    # worker's twice as long to start as it needs (the scheduler, the
    # journal, the metrics).
    from .broker import Broker, BrokerConfig
    from .dashboard import DashboardServer, parse_http_address

    http = None
    if http_address is not None:
        http = or_usage_error(
            lambda: parse_http_address(http_address, http_allow_remote)
        )
    limits = Limits(
        max_payload_bytes=max_payload_bytes,
        max_queued_tasks=max_queued_tasks,
        max_queued_bytes=max_queued_bytes,
        client_window=client_window,
        client_max_bytes=client_max_bytes,
        heartbeat_interval_s=heartbeat_interval_s,
        max_attempts=max_attempts,
        max_peers=max_peers,
        max_sessions=max_sessions,
        max_questions_per_s=max_questions_per_s,
        session_grace_s=session_grace_s,
        orphan_grace_s=orphan_grace_s,
    )
    config = BrokerConfig(
        frontend,
        backend,
        _journal_named(journal, durability),
        durability,
        limits,
        curve=_server_keys(secret_key, clients, workers),
        insecure=insecure,
        journal_min_free_bytes=journal_min_free_bytes,
        shared_memory=shared_memory,
        telemetry=http is not None,
        mdp=mdp,
        mdp_settings=MdpSettings(
            mdp_heartbeat,
            mdp_liveness,
            unserved_expiry_s=mdp_unserved_expiry,
            unserved_per_service=mdp_unserved_per_service,
            unserved_total=mdp_unserved_total,
        ),
    )
    server = or_usage_error(lambda: Broker(config))
    or_usage_error(server.bind)
    dashboard = None
    if http is not None and server.telemetry is not None:
        telemetry = server.telemetry
        dashboard = or_usage_error(lambda: DashboardServer(http, telemetry))
        dashboard.start()
    # Before the endpoints are printed: a supervisor that waits for them may
    # signal at once, and a SIGHUP nobody handles ends the process.
    _stop_on_signals(server.stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: server.reload())
    _say_started(_broker_started(server, dashboard))
    if announce:
        endpoints = {
            "frontend": server.frontend_endpoint,
            "backend": server.backend_endpoint,
            "http": dashboard.endpoint if dashboard else None,
            "mdp": server.mdp_endpoint or None,
        }
        click.echo(json.dumps(endpoints), nl=True)
        sys.stdout.flush()
    try:
        server.serve()
    except JournalError as exc:
        raise click.ClickException(str(exc)) from exc  # logged by the broker too
    finally:
        if dashboard is not None:
            dashboard.stop()


def _broker_started(server: Broker, dashboard: DashboardServer | None) -> str:
    """The line a broker started at a terminal says (see _say_started)."""
    if server.config.durability == "memory":
        kept = "no journal (--durability memory)"
    else:
        kept = f"journal {server.config.journal}"
    also = "".join(
        f", {what} {where}"
        for what, where in (
            ("MDP on", server.mdp_endpoint),
            ("dashboard at", dashboard.endpoint if dashboard else None),
        )
        if where
    )
    return (
        f"broker: clients connect to {server.frontend_endpoint}, workers to "
        f"{server.backend_endpoint}{also}; {kept}. Ctrl-C stops it; "
        "--log-level INFO logs who comes and goes"
    )


def _journal_named(journal: str, durability: str) -> str | None:
    """The journal file, or None for a broker in memory that was not named
    one: it opens none, and has none to warn about (see open_journal)."""
    source = click.get_current_context().get_parameter_source("journal")
    if durability == "memory" and source is ParameterSource.DEFAULT:
        return None
    return journal


def _server_keys(
    secret_key: str | None, clients: str | None, workers: str | None
) -> ServerKeys | None:
    given = [secret_key, clients, workers]
    if not any(given):
        return None
    if secret_key is None or clients is None or workers is None:
        raise click.UsageError(
            "CURVE needs all of --secret-key, --clients and --workers (a folder "
            "may be empty, to let no one of that role in)"
        )
    return ServerKeys(secret_key, clients, workers)


@cli.command()
@_logging_options(default=False)
@click.argument("modules", nargs=-1, required=True)
@click.option(
    "--connect",
    default="tcp://127.0.0.1:5556",
    show_default=True,
    help="The broker's backend endpoint.",
)
@click.option(
    "--concurrency",
    # Bounded here, so that the error names the option a user typed.
    type=click.IntRange(min=1, max=p.MAX_SLOTS),
    default=None,
    help=f"Tasks run at once, at most {p.MAX_SLOTS}  [default: number of CPUs]",
)
@click.option(
    "--pool",
    type=click.Choice(POOL_KINDS),
    default="process",
    show_default=True,
    help="Processes for CPU work, threads for I/O.",
)
@click.option(
    "--prefetch",
    default="auto",
    show_default=True,
    callback=lambda ctx, param, value: _prefetch(value),
    help="Tasks held per slot, counting the running one; 'auto' holds one when "
    "tasks are long and more when they are short.",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Run pickled callables: lets any client run any code here.",
)
@_heartbeat_option
@_peer_keys
@click.option(
    "--insecure",
    is_flag=True,
    help="With --allow-pickle, accept a non-loopback broker without CURVE.",
)
@click.option(
    "--no-shared-memory",
    "shared_memory",
    flag_value=False,
    default=True,
    help="Receive large payloads in messages even from a broker on this "
    "machine, which would pass them through shared memory.",
)
def worker(
    modules: tuple[str, ...],
    connect: str,
    concurrency: int | None,
    pool: str,
    prefetch: int | None,
    allow_pickle: bool,
    heartbeat_interval_s: float,
    secret_key: str | None,
    broker_key: str | None,
    insecure: bool,
    shared_memory: bool,
) -> None:
    """Serve the public functions of MODULES (tasks name them module:function)."""
    from .worker import Worker, WorkerConfig  # see broker()

    config = WorkerConfig(
        modules=modules,
        connect=connect,
        concurrency=concurrency or os.cpu_count() or 1,
        pool=pool,
        prefetch=prefetch,
        allow_pickle=allow_pickle,
        heartbeat_interval_s=heartbeat_interval_s,
        secret_key=secret_key,
        broker_key=broker_key,
        insecure=insecure,
        shared_memory=shared_memory,
    )
    server = or_usage_error(lambda: Worker(config))
    keep_freed_memory()  # this process exists to move payloads
    _stop_on_signals(server.stop)
    signal.signal(signal.SIGQUIT, _leave_at_once(server))
    _say_started(_worker_started(config))
    server.serve()


def _worker_started(config: WorkerConfig) -> str:
    """The line a worker started at a terminal says (see _say_started)."""
    if config.pool == "process":
        slots = counted(config.concurrency, "task process", "task processes")
    else:
        slots = counted(config.concurrency, "thread")
    return (
        f"worker: serving {', '.join(config.modules)} in {slots} for the broker "
        f"at {config.connect}. Ctrl-C finishes the tasks it holds and leaves; "
        "twice, at once"
    )


def _leave_at_once(server: Worker) -> Callable[[int, object], None]:
    """SIGQUIT, the cold stop: leave now; the broker requeues what ran."""

    def handler(signum: int, frame: object) -> None:
        log.info("received SIGQUIT; leaving at once")
        server.stop(at_once=True)

    return handler


def _prefetch(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise click.BadParameter(
            f"expected 'auto' or a whole number >= 1, got {value!r}"
        )
    return number


# --- map and exec -----------------------------------------------------------------


def _cluster_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "--input",
                "input_file",
                # A line that is not UTF-8 fails alone (see _run_output), not the run.
                type=click.File("r", errors="surrogateescape"),
                default="-",
                help="One call per line  [default: stdin]",
            ),
            click.option(
                "--null",
                "-0",
                "null_separated",
                is_flag=True,
                help="Input items end with a NUL byte, not a newline (as "
                "`find -print0` writes them, for names with newlines).",
            ),
            click.option(
                "--output",
                "output_path",
                # Opened by _open_output, once it is known not to be the input.
                type=click.Path(dir_okay=False, allow_dash=True),
                default="-",
                help="One JSON object per input line  [default: stdout]",
            ),
            click.option(
                "--connect",
                default=None,
                help="A running broker's frontend; without it, an embedded "
                "broker and local workers run.",
            ),
            click.option(
                "--connect-timeout-s",
                type=_FiniteRange(min=0, min_open=True),
                default=BROKER_ANSWER_S,
                show_default=True,
                help="With --connect: how long the broker has to answer before "
                "the run gives up; ignored without --connect.",
            ),
            click.option(
                "--workers",
                # Refused before the cluster starts, whose worker would refuse
                # it as `concurrency`, an option the user never typed.
                type=click.IntRange(min=1, max=p.MAX_SLOTS),
                default=None,
                help="Without --connect: task processes of the local worker "
                f"the run starts, at most {p.MAX_SLOTS}  [default: number of CPUs]",
            ),
            click.option(
                "--timeout-s",
                type=_FiniteRange(min=0, min_open=True, max=p.MAX_TIMEOUT_S),
                default=None,
                help="Stop each line's call after this many seconds.",
            ),
            click.option(
                "--retries",
                type=click.IntRange(min=0),
                default=0,
                help="Run a line that raised again, up to this many times.",
            ),
            click.option(
                "--progress/--no-progress",
                default=None,
                help="Progress bar  [default: when stderr is a terminal]",
            ),
        ]
    ):
        command = option(command)
    return _peer_keys(command)


@cli.command(name="map")
@_logging_options(default=False)
@click.argument("function")
@_cluster_options
@click.option("--sink", default=None, help="Send results to this sink instead.")
@click.option(
    "--tracebacks",
    is_flag=True,
    help="Give each failed line's error the traceback of where it failed, "
    'under "traceback".',
)
def map_command(
    function: str,
    input_file: IO[str],
    null_separated: bool,
    output_path: str,
    connect: str | None,
    connect_timeout_s: float,
    workers: int | None,
    timeout_s: float | None,
    retries: int,
    progress: bool | None,
    secret_key: str | None,
    broker_key: str | None,
    sink: str | None,
    tracebacks: bool,
) -> None:
    """Apply MODULE:FUNCTION to each input line (as JSON if it parses)."""
    from ._jobs import map_job  # see broker()
    from ._runs import run_job

    if connect is None and sink is not None:
        raise click.UsageError(
            "--sink needs --connect: an embedded broker ends with the run, and "
            "its sink's results with it"
        )
    _check_task_fields(function, timeout_s, retries, sink)
    _check_workers(connect, workers)
    if connect is None:
        or_usage_error(lambda: resolve(function))
    job = map_job(function, timeout_s, retries, sink, tracebacks)
    run = _run_of(
        input_file,
        null_separated,
        output_path,
        connect,
        connect_timeout_s,
        workers,
        progress,
        secret_key,
        broker_key,
    )
    sys.exit(run_job(job, run))


@cli.command(name="exec")
@_logging_options(default=False)
@click.argument("command", nargs=-1, required=True)
@_cluster_options
def exec_command(
    command: tuple[str, ...],
    input_file: IO[str],
    null_separated: bool,
    output_path: str,
    connect: str | None,
    connect_timeout_s: float,
    workers: int | None,
    timeout_s: float | None,
    retries: int,
    progress: bool | None,
    secret_key: str | None,
    broker_key: str | None,
) -> None:
    """Run COMMAND once per input line: '{}' in an argument becomes the line.

    Without '{}', the line is appended as the last argument. No shell is used.
    Workers of a running broker must serve the ventilator.shell module.
    """
    from ._jobs import SHELL_FUNCTION, exec_job  # see broker()
    from ._runs import run_job

    _check_task_fields(SHELL_FUNCTION, None, retries, None)
    _check_workers(connect, workers)
    job = exec_job(command, timeout_s, retries)
    run = _run_of(
        input_file,
        null_separated,
        output_path,
        connect,
        connect_timeout_s,
        workers,
        progress,
        secret_key,
        broker_key,
    )
    sys.exit(run_job(job, run))


def _run_of(
    input_file: IO[str],
    null_separated: bool,
    output_path: str,
    connect: str | None,
    connect_timeout_s: float,
    workers: int | None,
    progress: bool | None,
    secret_key: str | None,
    broker_key: str | None,
) -> Run:
    """Where a map's or an exec's lines come from and go, and what runs them,
    as its options and the command line's logging say."""
    from ._input_records import records_of
    from ._runs import Run

    level, log_format = _log_settings()
    return Run(
        records_of(input_file, null_separated),
        _open_output(output_path, input_file),
        connect,
        workers,
        progress,
        secret_key,
        broker_key,
        connect_timeout_s,
        log_level=level,
        log_format=log_format,
    )


def _check_task_fields(
    function: str, timeout_s: float | None, retries: int, sink: str | None
) -> None:
    """Refuse, before anything starts, a name or option that every line's task
    would be refused for (the broker's own rules, see protocol.task_problem)."""
    spec = p.TaskSpec(0, function, b"", 0, timeout_s, retries, sink)
    problem = p.submission_problem(function, 0) or p.task_problem(spec)
    if problem is not None:
        raise click.UsageError(problem)


def _check_workers(connect: str | None, workers: int | None) -> None:
    if connect is None or workers is None:
        return
    # A default from the environment is meant for embedded runs, not an error.
    source = click.get_current_context().get_parameter_source("workers")
    if source is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError(
            "--workers starts local workers for the embedded broker and has no "
            "meaning with --connect: start `ventilator worker` processes on the "
            "broker's backend instead"
        )


def _open_output(path: str, input_file: IO[str]) -> Output:
    """The output stream, opened (and so emptied) only when it is not the input.

    Opening the input for writing would empty it before a line is read: the
    run would end at once with 0 tasks and the file lost. Standard output is
    compared too, for `--input lines.txt >> lines.txt`.
    """
    from ._run_output import Output

    param = _param_named("output_path")
    if path == "-" and 1 in _CLOSED_STREAMS:
        raise click.BadParameter(
            "standard output is closed: name a file to write the output to",
            param=param,
        )
    same = _same_regular_file(input_file, path)
    if same is not None:
        raise click.BadParameter(
            f"{same} is the --input file: writing it while reading it would lose "
            "the input (or, appending, read the output back); write the output "
            "to another file",
            param=param,
        )
    ctx = click.get_current_context()
    stream = click.File("w", lazy=False).convert(path, param, ctx)
    return Output(stream, "standard output" if path == "-" else repr(path))


def _param_named(name: str) -> click.Parameter:
    ctx = click.get_current_context()
    return next(param for param in ctx.command.params if param.name == name)


def _same_regular_file(input_file: IO[str], output_path: str) -> str | None:
    """The output's name when it is the regular file the input reads, else None
    (two ttys or pipes may be one device, and are no loss to share)."""
    try:
        read = os.fstat(input_file.fileno())
        written = os.fstat(1) if output_path == "-" else os.stat(output_path)
    except (OSError, ValueError):
        return None  # not there yet, or no descriptor: a new file, not the input
    if not stat.S_ISREG(read.st_mode):
        return None
    if (read.st_dev, read.st_ino) != (written.st_dev, written.st_ino):
        return None
    return "standard output" if output_path == "-" else repr(output_path)


# --- status and sink -------------------------------------------------------------


def _connect_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--connect, --timeout-s and the CURVE keys of a one-question command; the
    keys go to `_broker_answer` through the click context, not the signature."""
    for name, envvar, what in (
        ("--broker-key", "VENTILATOR_BROKER_KEY", "The broker's public .key file"),
        ("--secret-key", "VENTILATOR_SECRET_KEY", "This peer's .key_secret file"),
    ):
        command = click.option(
            name,
            type=click.Path(exists=True, dir_okay=False),
            envvar=envvar,
            expose_value=False,
            callback=_remember_key,
            help=f"{what} (CURVE)  [env: {envvar}]",
        )(command)
    command = click.option(
        "--timeout-s",
        type=_FiniteRange(min=0, min_open=True, max=MAX_INTERVAL_S),
        default=5.0,
        show_default=True,
        help="How long to wait for the broker's answer.",
    )(command)
    return click.option(
        "--connect",
        default=DEFAULT_ADDRESS,
        show_default=True,
        help="The broker's frontend endpoint.",
    )(command)


def _remember_key(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    assert param.name is not None
    ctx.meta[f"ventilator.{param.name}"] = value


@contextlib.contextmanager
def _broker_answer(connect: str, timeout_s: float) -> Iterator[Client]:
    """A client for one question; no answer in time is a clear CLI error."""
    from .client import Client

    meta = click.get_current_context().meta
    secret_key = meta.get("ventilator.secret_key")
    broker_key = meta.get("ventilator.broker_key")
    client = or_usage_error(
        lambda: Client(connect, secret_key=secret_key, broker_key=broker_key)
    )
    with client:
        try:
            yield client
        except TimeoutError:
            raise click.ClickException(
                f"no answer from a broker at {connect} within {timeout_s:g}s"
            ) from None
        except NetworkError as exc:  # it answered, but not as a broker's frontend
            raise click.ClickException(str(exc)) from None
        except UsageError as exc:  # this key may not give that command
            raise click.ClickException(str(exc)) from None
        except ProtocolError as exc:  # it answered, but unreadably (too large)
            raise click.ClickException(str(exc)) from None


@cli.command()
@_logging_options(default=False)
@_connect_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(connect: str, as_json: bool, timeout_s: float) -> None:
    """Show the broker's workers, queues, clients and recent failures."""
    from ._status_view import print_status, without_session  # see broker()

    with _broker_answer(connect, timeout_s) as client:
        report = without_session(client.status(timeout_s), client.session_at_broker)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        print_status(report, connect)


# --- operator commands -------------------------------------------------------------


@cli.command()
@_logging_options(default=False)
@_connect_option
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="List at most this many, the newest.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON, tracebacks too.")
def failed(connect: str, timeout_s: float, limit: int, as_json: bool) -> None:
    """List the broker's latest failed tasks with their reasons, newest first."""
    with _broker_answer(connect, timeout_s) as client:
        failures = client.failed(limit, timeout_s)
    if as_json:
        click.echo(json.dumps(failures, indent=2))
        return
    from ._status_view import print_failures  # see broker()

    print_failures(failures)


@cli.command()
@_logging_options(default=False)
@_connect_option
@click.argument("tickets", nargs=-1, type=int)
@click.option("--all", "every", is_flag=True, help="Every failed task remembered.")
@click.option(
    "--sink",
    default="retried",
    show_default=True,
    help="The sink that receives the reruns' results.",
)
def retry(
    connect: str, timeout_s: float, tickets: tuple[int, ...], every: bool, sink: str
) -> None:
    """Run failed tasks again, named by their TICKETS (see `ventilator failed`).

    The submitter already received the failure, and a task's result is
    delivered once: the rerun's result goes to the sink --sink instead
    (read it with `ventilator sink NAME`).
    """
    if bool(tickets) == every:
        raise click.UsageError("name the TICKETS to retry, or pass --all (not both)")
    with _broker_answer(connect, timeout_s) as client:
        report = client.retry(tickets, sink, timeout_s)
    for ticket, reason in report["refused"]:
        click.echo(f"ventilator: not retried ticket={ticket}: {reason}", err=True)
    if report["retried"]:
        click.echo(
            f"retried {counted(len(report['retried']), 'task')}; results go to "
            f"sink {sink!r}"
        )
    else:
        click.echo("retried 0 tasks")
    if report["refused"]:
        sys.exit(1)


@cli.command()
@_logging_options(default=False)
@_connect_option
@click.argument("function", required=False)
@click.option(
    "--session",
    callback=lambda ctx, param, value: _not_an_option(value, param),
    help="Instead: drop all the broker holds for this session, which left.",
)
@click.option(
    "--sink",
    callback=lambda ctx, param, value: _not_an_option(value, param),
    help="Instead: drop the results waiting for this sink, which nobody receives.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(
    connect: str,
    timeout_s: float,
    function: str | None,
    session: str | None,
    sink: str | None,
    yes: bool,
) -> None:
    """Cancel every task of FUNCTION still waiting to run.

    Their submitters see them cancelled; running tasks finish. With
    --session NAME instead of FUNCTION: drop the results waiting for a
    session that is not connected and the tasks it submitted (running ones
    when they end), as `status` names it. With --sink NAME: drop the results
    waiting for a sink that is not connected (`status` names it sink:NAME).
    """
    chosen = [given for given in (function, session, sink) if given is not None]
    if len(chosen) != 1:
        raise click.UsageError("give one of FUNCTION, --session NAME or --sink NAME")
    if session is not None:
        _purge_session(connect, timeout_s, session, yes)
        return
    if sink is not None:
        _purge_sink(connect, timeout_s, sink, yes)
        return
    _purge_function(connect, timeout_s, chosen[0], yes)


def _purge_function(connect: str, timeout_s: float, function: str, yes: bool) -> None:
    with _broker_answer(connect, timeout_s) as client:
        if not yes:
            question = _purge_question(client.status(timeout_s), function)
            if question is not None:
                click.confirm(question, abort=True)
        purged = client.purge(function, timeout_s)
        known = purged or _function_known(client.status(timeout_s), function)
    if not known:
        # A typo would purge nothing and look like success. The error alone
        # is the answer: a count of nothing beside it said two things at once.
        raise click.ClickException(
            f"nothing matched {function!r}: no queue, running task or worker has "
            "that function (`ventilator status` lists them)"
        )
    click.echo(f"purged {counted(purged, 'task')} of {function}")


def _not_an_option(value: str | None, param: click.Parameter) -> str | None:
    """Refuse an option's name taken for a value (`--session --connect ...`)."""
    if value is not None and value.startswith("-"):
        raise click.BadParameter(
            f"{value!r} looks like an option, not a session name: name the "
            "session right after --session",
            param=param,
        )
    return value


def _purge_question(report: dict[str, Any], function: str) -> str | None:
    """The confirmation to ask, with how many tasks of `function` wait when
    the broker says (among many functions it lists the busiest only); None
    when it says none wait: there is nothing to confirm."""
    if function in report["queued"] or not _partial(report):
        queued = report["queued"].get(function, 0)
        if not queued:
            return None
        return f"Cancel the {counted(queued, 'task')} of {function} waiting to run?"
    return f"Cancel every task of {function} waiting to run?"


def _function_known(report: dict[str, Any], function: str) -> bool:
    """Whether the broker knows `function` from a queue, a running task or a
    worker that serves it (in which case purging none of it is no typo).
    When the broker listed part of its workers or functions only, it may
    know more than it listed: then no typo is claimed."""
    served = any(function in w["services"] for w in report["workers"])
    listed = function in report["queued"] or function in report["running"]
    return served or listed or _partial(report)


def _partial(report: dict[str, Any]) -> bool:
    """Whether the broker left workers, functions or a worker's functions out
    of `report` (an older broker lists them all, and has no counts)."""
    counts = [report.get("worker_counts"), report.get("queue_counts")]
    if any(c is not None and c["all"] > c["listed"] for c in counts):
        return True
    return any(
        w.get("service_count", 0) > len(w["services"]) for w in report["workers"]
    )


def _purge_session(connect: str, timeout_s: float, session: str, yes: bool) -> None:
    if not yes:
        click.confirm(
            f"Drop the results waiting for session {session} and the tasks it "
            "submitted?",
            abort=True,
        )
    with _broker_answer(connect, timeout_s) as client:
        dropped = client.purge_session(session, timeout_s)
    if not any(dropped[kind] for kind in ("results", "expired", "queued", "running")):
        # A session that left with nothing owed is forgotten: as is a typo.
        # The error alone answers, as for a function that matched nothing.
        raise click.ClickException(
            f"nothing matched session {session!r}: "
            + _sink_results_hint(dropped["for_sinks"], session)
        )
    click.echo(
        f"session {session}: dropped {_results_dropped(dropped)} and "
        f"{counted(dropped['queued'], 'queued task')}; "
        f"{counted(dropped['running'], 'running task')} dropped when they end"
    )


def _results_dropped(dropped: dict[str, int]) -> str:
    """The results a purge dropped, and apart from them the expired ones, as
    `status` counts them: a tombstone kept to tell its client the result
    expired is no result waiting for delivery."""
    said = f"{counted(dropped['results'], 'result')} waiting for delivery"
    if dropped["expired"]:
        said += f", {counted(dropped['expired'], 'expired result')}"
    return said


def _sink_results_hint(for_sinks: int, session: str) -> str:
    """Where what a session holds went, when its purge dropped nothing."""
    if for_sinks:
        return (
            f"the results of {for_sinks} of its tasks wait for sinks, which "
            "count against it until taken (`ventilator status` lists sinks as "
            "sink:NAME): `ventilator purge --sink NAME` drops them"
        )
    return (
        "the broker holds nothing for it (`ventilator status` lists sessions; "
        "for the results waiting for a sink of that name: `ventilator purge "
        f"--sink {session}`)"
    )


def _purge_sink(connect: str, timeout_s: float, sink: str, yes: bool) -> None:
    """Drop the results waiting for sink `sink`: the broker keeps them under
    the name ``sink:NAME``, which a session's purge empties."""
    if not yes:
        click.confirm(f"Drop the results waiting for sink {sink}?", abort=True)
    with _broker_answer(connect, timeout_s) as client:
        dropped = client.purge_session(f"{p.SINK_PREFIX}{sink}", timeout_s)
    if not dropped["results"] and not dropped["expired"]:
        raise click.ClickException(
            f"nothing matched sink {sink!r}: no result waits for it "
            "(`ventilator status` lists sinks as sink:NAME)"
        )
    click.echo(f"sink {sink}: dropped {_results_dropped(dropped)}")


@cli.command()
@_logging_options(default=False)
@_connect_option
@click.argument("session")
@click.argument("task_id", type=int)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def cancel(
    connect: str, timeout_s: float, session: str, task_id: int, yes: bool
) -> None:
    """Cancel the task TASK_ID of the client SESSION: queued, it leaves its
    queue; running, its worker stops it.

    `ventilator status` names each worker's task that has run for a minute
    or more; `ventilator failed` and the dashboard show the failed ones; a
    client's own are `Client.session` and `TaskFuture.task_id`.
    """
    if not yes:
        click.confirm(f"Cancel task {task_id} of session {session}?", abort=True)
    with _broker_answer(connect, timeout_s) as client:
        outcome = client.cancel_task(session, task_id, timeout_s)
    messages = {
        "cancelled": "cancelled; its submitter sees it cancelled",
        "running": (
            "not cancelled: it runs on an MDP worker, which cannot be told to "
            "stop it; it will finish"
        ),
        "cancelled already": "not cancelled again: it was cancelled already",
        "finished": "not cancelled: it had finished already",
        "unknown": (
            "not cancelled: the broker has no such task (never submitted, or "
            "forgotten once its result was collected or expired)"
        ),
        "unknown session": (
            "not cancelled: the broker knows no session of this name (it holds "
            "nothing for one: never connected, or all collected)"
        ),
    }
    click.echo(f"task {task_id} of {session}: {messages.get(outcome, outcome)}")
    if outcome != "cancelled":
        sys.exit(1)


@cli.command()
@_logging_options(default=False)
@click.argument("name")
@click.option(
    "--connect",
    default=DEFAULT_ADDRESS,
    show_default=True,
    help="The broker's frontend endpoint.",
)
@click.option(
    "--output",
    "output_file",
    type=click.File("a"),
    default="-",
    help="Append JSON lines here  [default: stdout]",
)
@click.option(
    "--idle-timeout-s",
    type=_FiniteRange(min=0, max=MAX_INTERVAL_S),
    default=None,
    help="Exit after this long without a result  [default: never]",
)
@_peer_keys
def sink(
    name: str,
    connect: str,
    output_file: IO[str],
    idle_timeout_s: float | None,
    secret_key: str | None,
    broker_key: str | None,
) -> None:
    """Receive the results of tasks submitted with sink=NAME, as JSON lines."""
    from ._run_output import Output, OutputFailed, write_sink_results
    from ._runs import Terminated, terminate
    from .sink import Sink  # see broker()

    receiver = or_usage_error(
        lambda: Sink(name, connect, secret_key=secret_key, broker_key=broker_key)
    )
    output = Output(output_file, _sink_output_name(output_file))
    with receiver:
        try:
            # SIGTERM unwinds as Ctrl-C does, through the receiver's close():
            # killed by it, the sink said no BYE, and the broker logged it as
            # unreachable rather than as a sink that left.
            signal.signal(signal.SIGTERM, terminate)
            write_sink_results(receiver, output, idle_timeout_s)
        except OutputFailed as exc:
            _sink_output_failed(exc, name)
        except (UsageError, NetworkError) as exc:
            # The name is taken, this key may not receive it, or the broker
            # refuses its handshakes: the command was right, its broker would
            # not serve it now; 1, as for the operator commands, not 2.
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            # Ctrl-C is the way to stop a sink that runs until interrupted:
            # the status a shell gives a command SIGINT ended, as map does.
            sys.exit(128 + signal.SIGINT)
        except Terminated:
            sys.exit(128 + signal.SIGTERM)  # the status of a command it ended
    if not receiver.welcomed:
        raise click.ClickException(
            f"no broker answered at {connect} before the idle timeout ended"
        )


def _sink_output_name(output_file: IO[str]) -> str:
    name = getattr(output_file, "name", "<stdout>")
    return "standard output" if name == "<stdout>" else repr(name)


def _sink_output_failed(exc: OutputFailed, name: str) -> NoReturn:
    """End a sink whose output failed; what it did not write waits at the
    broker for the next receiver of `name`."""
    if exc.broken_pipe:
        # As `yes | head` ends, and as map does: quietly, with SIGPIPE's status.
        sys.exit(128 + signal.SIGPIPE)
    raise click.ClickException(
        f"{exc}; the results not written wait at the broker for the next "
        f"`ventilator sink {name}`"
    ) from None


__all__ = ["cli", "main"]

"""Running a `map` or `exec` job: the client of a broker named with --connect,
or of an embedded cluster started for the run and watched while it runs; the
lines submitted ahead of their records, which are written in input order;
and, when the run stops early (Ctrl-C, SIGTERM, an output that fails), the
unfinished lines' tasks cancelled and the exit status and last line that say
how far it got."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from ._cli_errors import or_usage_error
from ._input_records import Unsendable
from ._run_output import Output, OutputFailed, write_record
from ._run_progress import Progress
from ._words import counted
from .errors import NetworkError, TaskError, TaskRejected, UsageError, VentilatorError

if TYPE_CHECKING:
    from ._jobs import Job
    from .client import Client, ItemOutcome
    from .embedded import LocalCluster

# What a run logs is the command's: it logs as the command line does.
log = logging.getLogger("ventilator.cli")

# Tasks submitted ahead of the oldest unfinished one, for map and exec.
MAP_AHEAD = 10_000
# How often map/exec check that the embedded cluster still runs.
HEALTH_CHECK_S = 1.0
# How long an interrupted run waits for the broker to confirm its cancels.
CANCEL_SETTLE_S = 2.0
# How long a stopped run's client waits for an embedded broker to take its
# cancellations before the cluster is stopped anyway.
EMBEDDED_CLOSE_S = 1.0


@dataclass(frozen=True, slots=True)
class Run:
    """Where a job's lines come from and go, and what runs them."""

    lines: Iterator[str]
    output: Output
    connect: str | None  # a broker's frontend, or None for an embedded cluster
    workers: int | None  # embedded task processes
    progress: bool | None  # None: when stderr is a terminal
    secret_key: str | None  # CURVE, for a broker named with --connect
    broker_key: str | None
    connect_timeout_s: float  # for it to answer at first
    # What the embedded broker and worker log, as the command was told to.
    log_level: str
    log_format: str


@dataclass(slots=True)
class _Stopping:
    """How far a run got, and what became of its unfinished lines when it
    stopped early."""

    # Lines whose records were written, and how many of those failed.
    written: int = 0
    failed: int = 0
    # Lines read whose records were not written: their tasks are cancelled.
    unfinished: int = 0
    # Of those, lines whose tasks a broker was asked to cancel and did not
    # confirm it (it was down): those it had accepted may still run there.
    unconfirmed: int = 0
    # The command that drops them, and their results, once the broker is back.
    purge: str = ""
    # Whether that broker journals what it accepts: one that does not keeps
    # nothing once it stopped.
    durable: bool = True

    def wrote(self, ok: bool) -> None:
        self.written += 1
        self.failed += not ok

    def outcome(self) -> str:
        """What became of the lines, and where to start again: the output
        holds a record for each of the input's first `written` lines."""
        # Lines past those read were never looked at: the count of unfinished
        # ones is not what was left of the input (a tester read it so).
        rest = (
            f"; the rest of the input starts at line {self.written + 1} "
            f"(`tail -n +{self.written + 1}` gives it)"
        )
        return self._what_became_of_the_lines() + rest

    def _what_became_of_the_lines(self) -> str:
        done = f"after {counted(self.written, 'line')} ({self.failed} failed); "
        if not self.unconfirmed:
            unfinished = counted(self.unfinished, "unfinished line")
            return f"{done}the tasks of {unfinished} cancelled"
        # A broker without a journal that stopped kept nothing; one that
        # stands still or is out of reach still has them.
        lasting = "" if self.durable else " while it runs (it has no journal)"
        return (
            f"{done}could not reach the broker to cancel the tasks of "
            f"{counted(self.unconfirmed, 'unfinished line')}; those it had "
            f"accepted may still run there{lasting}, their "
            "results kept for this run's session until they expire. Once the "
            f"broker is back, `{self.purge}` drops them"
        )


def _purge_command(client: Client, run: Run) -> str:
    """The command line that drops what the broker holds for this run's
    session, with the keys the run was given, ready to paste."""
    argv = ["ventilator", "purge", "--session", client.session_at_broker]
    argv += ["--connect", str(run.connect), "--yes"]
    for option, key in (
        ("--secret-key", run.secret_key),
        ("--broker-key", run.broker_key),
    ):
        if key is not None:
            argv += [option, key]
    return shlex.join(argv)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the run unwinds as on Ctrl-C,
    its embedded cluster stopped, but ends with its own status. A
    BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on
    the way swallows it."""


def run_job(job: Job, run: Run) -> int:
    """Run the job; return the exit status: 0 all succeeded, 1 some failed or
    the output could not be written, 130 interrupted (SIGINT), 141 the output
    was a pipe its reader closed, 143 terminated (SIGTERM)."""
    signal.signal(signal.SIGTERM, terminate)
    stopping = _Stopping()
    try:
        failed = _run_tasks(job, run, stopping)
    except OutputFailed as exc:
        if exc.broken_pipe:
            # As `yes | head` ends: quietly, with the status of SIGPIPE.
            return 128 + signal.SIGPIPE
        click.echo(f"ventilator: {exc}, {stopping.outcome()}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo(f"ventilator: interrupted {stopping.outcome()}", err=True)
        return 130
    except Terminated:
        click.echo(f"ventilator: terminated {stopping.outcome()}", err=True)
        return 128 + signal.SIGTERM
    return 1 if failed else 0


def terminate(signum: int, frame: object) -> None:
    # Once is enough: a second SIGTERM must not cut the cluster's stop short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def _run_tasks(job: Job, run: Run, stopping: _Stopping) -> int:
    """Run an item per line, write records in input order; return failures."""
    with contextlib.ExitStack() as stack:
        client, watch = _connect(stack, job, run)
        if job.connected is not None:
            job.connected(client)
        bar = stack.enter_context(Progress(run.progress))
        started = time.perf_counter()
        # Lines read and not yet written: the map reads ahead of its output.
        read: deque[tuple[str, Any]] = deque()
        items = _items(job, run.lines, read, bar)
        with watch.explained(stopping):
            batches = _outcomes(client, job, items)
            stack.enter_context(
                _cancelled_unless_done(client, batches, run, stopping, read)
            )
            for outcomes in batches:
                for line, item, outcome in _line_outcomes(outcomes, read):
                    stopping.wrote(write_record(run.output, job, line, item, outcome))
                    bar.advance()
                # Each batch as it comes: input may pause (tail -f) for hours.
                run.output.flush()
            for line, item, outcome in _unsent(read):
                stopping.wrote(write_record(run.output, job, line, item, outcome))
                bar.advance()
        run.output.flush()

    _summary(stopping.written, stopping.failed, time.perf_counter() - started, job.sink)
    return stopping.failed


@contextlib.contextmanager
def _cancelled_unless_done(
    client: Client,
    batches: Generator[list[ItemOutcome], None, None],
    run: Run,
    stopping: _Stopping,
    unfinished: deque[tuple[str, Any]],
) -> Iterator[None]:
    """Cancel the tasks of lines not written yet when the run stops early
    (Ctrl-C, SIGTERM, a broken output): a broker must not run them for a
    session that will never collect their results. `stopping` learns whether
    a broker named with --connect confirmed it."""
    try:
        yield
    except BaseException:
        lines = stopping.unfinished = len(unfinished)
        batches.close()
        if run.connect is None:
            # The embedded broker ends with the run: its client need not wait
            # the usual close timeout for it to take the cancellations.
            client.close(timeout_s=EMBEDDED_CLOSE_S)
        elif not _settle_cancellations(client):
            stopping.unconfirmed = lines
            stopping.purge = _purge_command(client, run)
            stopping.durable = client._io.broker_durable
            # A broker that did not answer will not confirm what it was sent
            # either: waiting for that (close()'s default 10 s) would only put
            # off the end the user asked for. What it has, the purge drops.
            client.close(timeout_s=0)
        raise


def _settle_cancellations(client: Client) -> bool:
    """Take in the broker's word on the tasks just cancelled, so that it
    keeps no result for this session once it leaves; False if it did not
    answer (it may never have heard the cancellation).

    The broker answers a question in the turn that reads it and sends the
    results of that turn after the answer: the second answer comes after the
    cancelled tasks' results, which the client then acknowledges on close.
    """
    for _ in range(2):
        try:
            client.status(timeout_s=CANCEL_SETTLE_S)
        except (TimeoutError, VentilatorError):
            return False
    return True


def _run_session(job: Job) -> str:
    """A session name that tells an operator reading `status` which run it
    is: the command, the host, the process and a few random digits (a
    process id comes back), not a bare random id."""
    host = socket.gethostname()[:64]  # a name is at most 256 characters
    return f"{job.command}-{host}-{os.getpid()}-{secrets.token_hex(2)}"


def _connect(
    stack: contextlib.ExitStack, job: Job, run: Run
) -> tuple[Client, _ClusterWatch]:
    """A client of the broker named with --connect, or of an embedded cluster
    started here; both are stopped when `stack` closes."""
    from .client import Client
    from .embedded import LocalCluster

    if run.connect is not None:
        client = stack.enter_context(
            Client(
                run.connect,
                session=_run_session(job),
                secret_key=run.secret_key,
                broker_key=run.broker_key,
            )
        )
        _check_broker(client, run.connect, run.connect_timeout_s)
        # A remote broker that goes away is waited for: the client reconnects
        # and the broker's journal keeps the tasks.
        return client, _ClusterWatch(None, client)

    cluster = LocalCluster(
        run.workers, job.modules, log_level=run.log_level, log_format=run.log_format
    )
    stack.callback(cluster.stop)
    or_usage_error(cluster.start)
    client = stack.enter_context(Client(cluster.address))
    return client, stack.enter_context(_ClusterWatch(cluster, client))


def _items(
    job: Job, lines: Iterator[str], read: deque[tuple[str, Any]], bar: Progress
) -> Iterator[Any]:
    for line in lines:
        item = job.item_of(line)
        read.append((line, item))
        bar.submitted()
        if not isinstance(item, Unsendable):
            yield item


def _line_outcomes(
    outcomes: list[ItemOutcome], read: deque[tuple[str, Any]]
) -> Iterator[tuple[str, Any, ItemOutcome]]:
    """Each line read with its outcome, in input order: the outcomes are those
    of the lines sent, and a line that was not sent fails in its place."""
    for outcome in outcomes:
        yield from _unsent(read)
        line, item = read.popleft()
        yield line, item, outcome


def _unsent(read: deque[tuple[str, Any]]) -> Iterator[tuple[str, Any, ItemOutcome]]:
    from .client import ItemOutcome

    while read and isinstance(read[0][1], Unsendable):
        line, item = read.popleft()
        yield line, item, ItemOutcome(None, item.error)


def _outcomes(
    client: Client, job: Job, items: Iterator[Any]
) -> Generator[list[ItemOutcome], None, None]:
    """The lines' outcomes, a batch at a time, read by a thread of their own
    so that a pause in the input does not hold back results already in."""
    from ._maps import outcome_batches

    if job.sink is not None:
        return _sent_to_sink(client, job, items)
    return outcome_batches(
        client, job.function, items, None, job.timeout_s, job.retries, streaming=True
    )


def _sent_to_sink(
    client: Client, job: Job, items: Iterator[Any]
) -> Generator[list[ItemOutcome], None, None]:
    """A task per line, since a sink receives the results of tasks; each
    line's outcome is its task accepted (or refused) by the broker."""
    from .client import TaskFuture

    window: deque[Future[Any]] = deque()
    try:
        for item in items:
            window.append(_submit(client, job, item))
            while window and (len(window) >= MAP_AHEAD or window[0].done()):
                yield [_acceptance(client, job, window.popleft())]
        while window:
            yield [_acceptance(client, job, window.popleft())]
    finally:
        # Stopped early: the lines not written yet are not run.
        client._withdraw([f.task_id for f in window if isinstance(f, TaskFuture)])


def _submit(client: Client, job: Job, item: Any) -> Future[Any]:
    """Submit one line's task; a line that cannot be sent is a refused task."""
    try:
        return client.submit(
            job.function,
            item,
            timeout_s=job.timeout_s,
            retries=job.retries,
            sink=job.sink,
        )
    except (UsageError, TaskError) as exc:
        refused: Future[Any] = Future()
        refused.set_exception(exc)
        return refused


def _acceptance(client: Client, job: Job, future: Future[Any]) -> ItemOutcome:
    """A line's task accepted, as the ids its result will carry on the sink,
    or refused, as why."""
    from .client import ItemOutcome, TaskFuture

    # An operator may purge a task before it is accepted: its line says so.
    if future.cancelled():
        return ItemOutcome(None, CancelledError("the task was cancelled at the broker"))
    error = future.exception()
    if error is None:
        assert isinstance(future, TaskFuture)  # only a submitted task is accepted
        task_id = future.task_id
        # The fields `ventilator sink` writes with the result, to join on.
        ids = {"client": client.session_at_broker, "task_id": task_id}
        return ItemOutcome({**ids, "task_id_str": str(task_id), "sink": job.sink}, None)
    if isinstance(error, UsageError):
        return ItemOutcome(None, TaskRejected("UsageError", str(error)))
    if isinstance(error, TaskError):
        return ItemOutcome(None, error)
    raise error


class _ClusterWatch:
    """Checks the embedded cluster every HEALTH_CHECK_S in a thread of its own.

    When a process of it exited, results will never come: the watch closes the
    client, which ends a map waiting on them, and `explained` turns what the
    map then raises into an error naming the dead process.
    """

    def __init__(self, cluster: LocalCluster | None, client: Client) -> None:
        self._cluster = cluster
        self._client = client
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="ventilator-cluster-watch", daemon=True
        )
        self.dead: str | None = None

    def __enter__(self) -> _ClusterWatch:
        if self._cluster is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        assert self._cluster is not None
        while not self._stop.wait(HEALTH_CHECK_S):
            dead = self._cluster.exited()
            if dead:
                # The error the run ends with says so; no need to say it twice.
                log.info("the embedded %s exited; closing the client", dead)
                self.dead = dead
                self._client.close(timeout_s=0)
                return

    @contextlib.contextmanager
    def explained(self, stopping: _Stopping) -> Iterator[None]:
        """Say that the embedded process died, if the run failed for that,
        and how far it got: with --output, nothing else says so."""
        try:
            yield
        except VentilatorError:
            if self.dead is None:
                raise
            raise click.ClickException(
                f"the embedded {self.dead} exited after "
                f"{counted(stopping.written, 'line')} ({stopping.failed} failed); "
                "the tasks of the lines after those are lost"
            ) from None


def _check_broker(client: Client, address: str, timeout_s: float) -> None:
    try:
        client.status(timeout_s=timeout_s)
    except TimeoutError:
        raise click.ClickException(
            f"no broker answered at {address} within {timeout_s:g}s "
            "(--connect-timeout-s)"
        ) from None
    except NetworkError as exc:  # it answered, but not as a broker's frontend
        raise click.ClickException(str(exc)) from None


def _summary(done: int, failed: int, elapsed_s: float, sink: str | None) -> None:
    # Counted in lines, not tasks: lines travel many to a task.
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    lines = counted(done, "line")
    if sink:
        outcome = f"accepted for sink {sink!r}; {failed} refused"
    else:
        outcome = f"{done - failed} succeeded, {failed} failed"
    click.echo(
        f"ventilator: {lines}, {outcome} in {elapsed_s:.2f}s ({rate:,.0f} lines/s)",
        err=True,
    )

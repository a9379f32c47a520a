"""How the broker tells its operator what the scheduler did.

The scheduler decides and says so in notices (`ventilator.notices`), touching
no logger; the broker hands each loop turn's notices to `NoticeLog`, which
turns them into log lines at the level an operator should read them. Some
notices come in bursts: a full disk refuses every task, a network cut loses
hundreds of workers at once, a client renames itself in a loop. The rate
limits here say the first few of those and count the rest, and remember whose
join they held back: a client the log never said joined leaves at DEBUG.

The lines keep the broker's logger, ``ventilator.broker``: operators, and the
tests that read them, know them as the broker's.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace

from . import notices as n
from . import protocol as p
from ._full_queues import FullQueues
from ._words import counted
from .logs import RateLimit, Routine, Routines

__all__ = ["NoticeLog"]

_LOG_NAME = "ventilator.broker"
log = logging.getLogger(_LOG_NAME)

# Lines per second saying a client joined; the rest are counted (see _join_log).
JOINS_LOGGED_PER_S = 5.0
# Clients whose join the rate limit held back, remembered so that their
# departure is not said either (see _UnsaidJoins); the oldest are forgotten.
UNSAID_JOINS_KEPT = 10_000
# Lines per second saying a worker was lost; the rest are counted.
LOSSES_LOGGED_PER_S = 5.0
# Functions a worker's join line names; `status` lists them all.
LOGGED_SERVICES = 20
# Failure records forgotten to make room for new ones (past failed_kept) are
# said at once, then after this long, then twice as long each time.
FORGOTTEN_FAILURES_FIRST_INTERVAL_S = 60.0
# A function's tasks failing as poison or by timeout, likewise per function
# and outcome.
TASK_FAILURES_FIRST_INTERVAL_S = 10.0
# Results of sessions that left dropped to make room, at most once a loop turn
# while clients keep a broker full: said at once, then less and less often.
ORPHANS_DROPPED_FIRST_INTERVAL_S = 10.0
# A worker busy with long tasks hands back what waits behind them every few
# seconds: said at once per worker, then after this long, then twice as long.
HAND_BACKS_FIRST_INTERVAL_S = 60.0


class NoticeLog:
    """The log lines of the scheduler's notices, and the rate limits that keep
    a burst of them from flooding the log. `full_queues` is the broker's: the
    loss of a client that stopped reading is said there, once an episode."""

    def __init__(self, full_queues: FullQueues) -> None:
        self._full_queues = full_queues
        self._rejection_log = RateLimit(per_s=1.0, what="refused task")
        self._refusals = RefusalSpell()
        self._session_refusal_log = RateLimit(per_s=1.0, what="refused session")
        # A line per HELLO under a new name is a flood when a client renames
        # itself in a loop; a few a second still name the clients of a start.
        self._join_log = RateLimit(
            JOINS_LOGGED_PER_S, what="client joined", plural="clients joined"
        )
        self._unsaid_joins = _UnsaidJoins(UNSAID_JOINS_KEPT)
        # Their departures, said at DEBUG: counted on a tick, as their joins.
        self._unsaid_leaves = 0
        # Hundreds of workers lost at once (a network cut) would be as many
        # lines in the same millisecond.
        self._loss_log = RateLimit(
            LOSSES_LOGGED_PER_S, what="worker lost", plural="workers lost"
        )
        # Workers let go for the broker's own reasons (all of them at once
        # after it stood still) are no loss: counted apart, and said at INFO.
        self._drop_log = RateLimit(
            LOSSES_LOGGED_PER_S, what="worker dropped", plural="workers dropped"
        )
        self._forgotten_failures = Routine(
            _LOG_NAME, FORGOTTEN_FAILURES_FIRST_INTERVAL_S
        )
        self._task_failures: Routines[tuple[str, str]] = Routines(
            _LOG_NAME, TASK_FAILURES_FIRST_INTERVAL_S, level=logging.WARNING
        )
        self._orphans_dropped = Routine(
            _LOG_NAME, ORPHANS_DROPPED_FIRST_INTERVAL_S, level=logging.WARNING
        )
        self._hand_backs: Routines[str] = Routines(
            _LOG_NAME, HAND_BACKS_FIRST_INTERVAL_S
        )

    def log(self, notices: list[n.Notice], now: float) -> None:
        """Say a loop turn's notices, within the rate limits."""
        for notice in notices:
            if isinstance(notice, n.Rejected):
                if notice.refusing_all:
                    self._refusals.refused(now)
                if self._rejection_log.allows(now):
                    # A refusal per task of a burst would flood the log (a full
                    # disk refuses them all): one a second, saying how many more.
                    _log_rejection(notice, self._rejection_log.suppressed_note())
            elif isinstance(notice, n.SessionRefused):
                # A peer saying HELLO under new names in a loop: as above.
                if self._session_refusal_log.allows(now):
                    note = self._session_refusal_log.suppressed_note()
                    _log_session_refusal(notice, note)
            elif isinstance(notice, n.ClientJoined):
                self._log_join(notice, now)
            elif isinstance(notice, n.ClientLost):
                if not self._full_queues.lost(notice):
                    departure = self._unsaid_joins.left(notice)
                    self._unsaid_leaves += departure.quiet
                    _log_notice(departure)
            elif isinstance(notice, n.WorkerLost):
                limit = self._drop_log if _dropped(notice) else self._loss_log
                if limit.allows(now):
                    _log_worker_lost(notice, limit.suppressed_note())
            elif isinstance(notice, n.FailureForgotten):
                self._log_failures_forgotten(notice, now)
            elif isinstance(notice, n.TaskFailed):
                self._log_task_failed(notice, now)
            elif isinstance(notice, n.OrphansDropped):
                self._log_orphans_dropped(notice, now)
            elif isinstance(notice, n.WorkerReturned) and _handed_back(notice):
                self._log_hand_back(notice, now)
            else:
                _log_notice(notice)

    def say_accepting_again(self, now: float) -> None:
        """A task was accepted at `now`: say so if that ends a spell of refusals."""
        over = self._refusals.ended(now)
        if over is not None:
            refused, lasted_s = over
            # At the refusals' level: whoever read them must read this too.
            log.warning(
                "accepting new tasks again; %s refused since %.1fs ago",
                counted(refused, "task"),
                lasted_s,
            )

    def log_held_back(self, now: float) -> None:
        """Count the lines each of these rate limits held back since its last
        one: on a tick, so that a burst's tail is said without waiting for the
        next burst."""
        for limit in (self._rejection_log, self._session_refusal_log):
            note = limit.held_back(now)
            if note is not None:
                log.warning("%s", note)
        note = self._join_log.held_back(now)
        if note is not None:
            log.info("%s (`ventilator status` counts the clients)", note)
        if self._unsaid_leaves:
            left = counted(self._unsaid_leaves, "more client", "more clients")
            log.info(
                "%s left not logged in the last seconds (nor were their joins)", left
            )
            self._unsaid_leaves = 0
        note = self._loss_log.held_back(now)
        if note is not None:
            log.warning("%s (`ventilator status` lists the workers left)", note)
        note = self._drop_log.held_back(now)
        if note is not None:
            log.info("%s (they register again as they come back)", note)
        for routine in (self._forgotten_failures, self._orphans_dropped):
            routine.flush(now)
        self._task_failures.flush(now)
        self._hand_backs.flush(now)

    def _log_join(self, notice: n.ClientJoined, now: float) -> None:
        if self._join_log.allows(now):
            self._unsaid_joins.said(notice.recipient)
            _log_client_joined(notice, self._join_log.suppressed_note())
        else:
            self._unsaid_joins.unsaid(notice.recipient)

    def _log_task_failed(self, notice: n.TaskFailed, now: float) -> None:
        # A line per failure, but dwindling per function and outcome: a map of
        # a thousand items that all time out is not a thousand lines.
        self._task_failures.of((notice.function, notice.outcome)).log(
            now,
            1,
            "task failed as %s ticket=%d function=%s client=%s task=%d%s: %s",
            notice.outcome,
            notice.ticket,
            notice.function,
            notice.session,
            notice.task_id,
            f" worker={notice.worker}" if notice.worker else "",
            notice.reason,
        )

    def _log_failures_forgotten(self, notice: n.FailureForgotten, now: float) -> None:
        # Once `failed_kept` is full each new failure forgets the oldest: a line
        # each was half of a soak run's log. Said when it starts, then less and
        # less often, with the count since.
        oldest = counted(notice.count, "oldest failed task", bare_one=True)
        self._forgotten_failures.log(
            now,
            notice.count,
            "forgot the %s: the broker remembers the latest %d (failed_kept); what "
            "it forgets can no longer be retried",
            oldest,
            notice.kept,
        )

    def _log_hand_back(self, notice: n.WorkerReturned, now: float) -> None:
        self._hand_backs.of(notice.worker_id).log(
            now,
            1,
            "worker registered again worker=%s, keeping %s it runs: requeued %d "
            "it had not started, for workers with room",
            notice.worker_id,
            counted(notice.kept, "task"),
            notice.requeued,
        )

    def _log_orphans_dropped(self, notice: n.OrphansDropped, now: float) -> None:
        # A WARNING: work was done and is lost, though nobody was left to
        # read it; the operator learns which limit is too tight for its use.
        self._orphans_dropped.log(
            now,
            notice.count,
            "the broker is full (%s): dropped %s of %s with no client "
            "connected for %gs or more (orphan_grace_s) to make room; a client "
            "of theirs that comes back hears why",
            notice.limit,
            counted(notice.count, "result"),
            counted(notice.sessions, "session"),
            notice.grace_s,
        )


def _log_rejection(notice: n.Rejected, suppressed_note: str) -> None:
    log.warning(
        "refused task client=%s task=%d: %s%s",
        notice.session,
        notice.task_id,
        notice.reason,
        suppressed_note,
    )


def _log_session_refusal(notice: n.SessionRefused, suppressed_note: str) -> None:
    log.warning(
        "refused a new session=%s: %s; its client is told why%s",
        notice.session,
        notice.reason,
        suppressed_note,
    )


def _log_notice(notice: n.Notice) -> None:
    if isinstance(notice, n.WorkerJoined):
        # Slots and credit apart: the credit of a worker that registers
        # again has grown with its tiny tasks, and one number read as slots.
        log.info(
            "worker joined worker=%s slots=%s credit=%d services=%s",
            notice.worker_id,
            "-" if notice.slots is None else notice.slots,
            notice.capacity,
            _some_of(notice.services),
        )
    elif isinstance(notice, n.WorkerReturned):
        _log_worker_returned(notice)
    elif isinstance(notice, n.WorkerDraining):
        log.info(
            "worker draining worker=%s; no new tasks, waiting for %d running",
            notice.worker_id,
            notice.running,
        )
    elif isinstance(notice, n.WorkerLeft):
        # A goodbye is a departure, not a fault: what it had not finished was
        # left on purpose (a cold stop), and runs on another worker.
        log.info(
            "worker left worker=%s; requeued %s",
            notice.worker_id,
            counted(notice.requeued, "unfinished task"),
        )
    elif isinstance(notice, n.LeaseOverrun):
        _log_overrun(notice)
    elif isinstance(notice, n.OperatorActed):
        _log_operator_acted(notice)
    elif isinstance(notice, n.LateOutcome) and notice.released:
        log.debug(
            "dropped a result of a task its worker was told to give up "
            "ticket=%d attempt=%d worker=%s: the task is settled, cancelled "
            "or another worker's",
            notice.ticket,
            notice.attempt,
            notice.worker_id,
        )
    elif isinstance(notice, n.LateOutcome):
        log.warning(
            "dropped a late result ticket=%d attempt=%d worker=%s: that attempt was "
            "given up on (its worker was lost, or let it overrun its deadline)",
            notice.ticket,
            notice.attempt,
            notice.worker_id,
        )
    elif isinstance(notice, n.ClientLost):
        _log_client_lost(notice)
    elif isinstance(notice, n.ResultsExpired):
        log.warning(
            "dropped %s nobody collected (result_ttl_s)",
            counted(notice.count, "result"),
        )
    elif isinstance(notice, n.TombstonesForgotten):
        # Their clients stayed away twice the TTL: one that comes back with
        # its futures sends those tasks again; a new process hears nothing.
        log.info(
            "forgot %s, kept %gs (result_ttl_s) after they expired to tell "
            "their clients",
            counted(notice.count, "expired result"),
            notice.ttl_s,
        )
    elif isinstance(notice, n.SinkTaken):
        # A refused sink asks again every heartbeat: its first refusal is news.
        log.log(
            logging.WARNING if notice.first else logging.DEBUG,
            "refused a second receiver of sink=%s; the first one keeps it",
            notice.sink,
        )
    elif isinstance(notice, n.SessionsForgotten):
        log.info(
            "forgot %s that left owing and holding nothing, %gs "
            "(session_grace_s) after they were last heard; one that comes "
            "back starts anew",
            counted(notice.count, "session"),
            notice.grace_s,
        )
    elif isinstance(notice, n.SessionHeld):
        # A refused client asks again every heartbeat: its first refusal is news.
        log.log(
            logging.WARNING if notice.first else logging.DEBUG,
            "refused a second client of session=%s; the one holding it keeps it "
            "until it says BYE or falls silent",
            notice.session,
        )


def _handed_back(notice: n.WorkerReturned) -> bool:
    """Whether a worker registered again only to hand back tasks it had not
    started: routine, where a return after a reconnection is news."""
    return notice.same_connection and not (notice.refused or notice.taken_back)


def _log_worker_returned(notice: n.WorkerReturned) -> None:
    """Say what a worker that registered again holds now. Tasks it took back
    from their queues answer an earlier line, "worker dropped" or "worker
    lost ... requeued N": without them here, an operator could not tell
    whether those N ran twice."""
    taken_back = (
        f", took back {notice.taken_back} requeued while it was away (it still "
        "runs them: none runs twice)"
        if notice.taken_back
        else ""
    )
    refused = (
        f"; {notice.refused} it named {'needs' if notice.refused == 1 else 'need'} "
        "nothing more from it (their results are here already, or they were "
        "cancelled or went to another worker): told to drop them"
        if notice.refused
        else ""
    )
    log.info(
        "worker returned worker=%s; kept %s it still holds%s, requeued %d it no "
        "longer holds%s",
        notice.worker_id,
        counted(notice.kept, "task"),
        taken_back,
        notice.requeued,
        refused,
    )


def _some_of(names: Sequence[str], shown: int = LOGGED_SERVICES) -> str:
    """The first `shown` of `names`, and how many more: a worker serving
    thousands of functions made a join line of 600,000 characters."""
    listed = ",".join(names[:shown])
    more = len(names) - shown
    return f"{listed} and {more} more" if more > 0 else listed


def _worth_a_warning(lost: n.WorkerLost) -> bool:
    """A worker lost (killed, cut off, silent), even an idle one, is a worker
    fewer, news an operator should see; so is one that misbehaved. One
    dropped for reasons of the broker's (replaced, revoked, cut off while
    the broker stood still) is not."""
    return lost.fault in (n.Fault.LOST, n.Fault.MISBEHAVED)


def _log_operator_acted(notice: n.OperatorActed) -> None:
    """Who dropped or reran work, and what became of it: asked later where
    tasks went, the log answers."""
    log.info(
        "operator command from client=%s: %s; %s",
        notice.client,
        _operator_command(notice.command),
        json.dumps(notice.report, default=str, separators=(",", ":"))[:500],
    )


def _operator_command(command: p.Retry | p.Purge | p.CancelTask) -> str:
    if isinstance(command, p.Retry):
        tickets = ",".join(map(str, command.tickets[:20])) or "all"
        more = "..." if len(command.tickets) > 20 else ""
        return f"retry tickets={tickets}{more} sink={command.sink}"
    if isinstance(command, p.Purge) and command.session is not None:
        return f"purge session={command.session}"
    if isinstance(command, p.Purge):
        return f"purge function={command.function}"
    return f"cancel client={command.session} task={command.task_id}"


def _log_overrun(notice: n.LeaseOverrun) -> None:
    ticket, attempt = notice.first
    log.warning(
        "worker=%s let %d tasks run %gs past their timeout without reporting "
        "them (%d in a row; the first ticket=%d attempt=%d timeout_s=%g); ended "
        "them as timed out, and results it sends for them later will be dropped",
        notice.worker_id,
        notice.count,
        notice.grace_s,
        notice.overruns,
        ticket,
        attempt,
        notice.timeout_s,
    )


# How each departure reads in the log line that notes it.
_DEPARTURES = {
    n.Departure.LEFT: "left",
    n.Departure.SILENT: "fell silent",
    n.Departure.UNREACHABLE: "unreachable",
    n.Departure.CUT_BY_STALL: "reconnecting after this broker stood still",
    n.Departure.REVOKED: "cut off (its key lost access)",
}


def _dropped(notice: n.WorkerLost) -> bool:
    """Whether the worker was let go for the broker's own reasons (see
    _log_worker_dropped), not lost."""
    return notice.fault is n.Fault.NONE


def _log_worker_lost(notice: n.WorkerLost, note: str) -> None:
    if _dropped(notice):
        _log_worker_dropped(notice, note)
        return
    log.log(
        logging.WARNING if _worth_a_warning(notice) else logging.INFO,
        "worker lost worker=%s reason=%s; requeued %s, %s handed back to their "
        "maps, %d failed as poison%s",
        notice.worker_id,
        notice.reason,
        counted(notice.requeued, "task"),
        counted(notice.split, "map batch", "map batches"),
        notice.poisoned,
        note,
    )


def _log_worker_dropped(notice: n.WorkerLost, note: str) -> None:
    """A worker let go for the broker's own reasons (replaced, its key
    revoked, its connection cut while the broker stood still): no fault of
    its, and nothing lost, which "worker lost" read as."""
    log.info(
        "worker dropped worker=%s reason=%s; requeued %s unblamed (if it "
        "registers again it takes back those it still runs), %s handed back "
        "to their maps%s",
        notice.worker_id,
        notice.reason,
        counted(notice.requeued, "task"),
        counted(notice.split, "map batch", "map batches"),
        note,
    )


class RefusalSpell:
    """A spell of refused tasks (a full disk, a flood past the limits), said
    over once tasks are accepted again: the refusals' lines stop, and nothing
    else told the operator that the broker takes work again. At the edge of a
    limit, tasks are refused and accepted turn by turn: the spell ends only
    once `QUIET_S` passed without a refusal."""

    QUIET_S = 1.0

    def __init__(self) -> None:
        self._began_at: float | None = None
        self._last_at = 0.0
        self._count = 0

    def refused(self, now: float) -> None:
        if self._began_at is None:
            self._began_at = now
        self._last_at = now
        self._count += 1

    def ended(self, now: float) -> tuple[int, float] | None:
        """A task was accepted at `now`: (tasks refused, seconds since the
        first of them) if that ends a spell; else None. Since the first, not
        until the last: a full broker asked for four tasks in 38 s refused them
        for 38 s, where the last minus the first read as 0.1 (tester 36)."""
        if self._began_at is None or now - self._last_at < self.QUIET_S:
            return None
        over = (self._count, now - self._began_at)
        self._began_at, self._count = None, 0
        return over


class _UnsaidJoins:
    """The clients whose join line the rate limit held back: their leaving
    is logged as quietly (at DEBUG), or a "client left" names a client the
    log never said joined. Bounded: the oldest are forgotten first, and one
    forgotten is only said to leave."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._recipients: OrderedDict[str, None] = OrderedDict()

    def unsaid(self, recipient: str) -> None:
        self._recipients[recipient] = None
        if len(self._recipients) > self._limit:
            self._recipients.popitem(last=False)

    def said(self, recipient: str) -> None:
        self._recipients.pop(recipient, None)

    def left(self, notice: n.ClientLost) -> n.ClientLost:
        """The departure to log: quiet if its join was not said."""
        if notice.recipient not in self._recipients:
            return notice
        del self._recipients[notice.recipient]
        return replace(notice, quiet=True)


def _log_client_joined(notice: n.ClientJoined, note: str) -> None:
    log.info(
        "client joined client=%s resent=%d%s", notice.recipient, notice.resent, note
    )


def _log_client_lost(notice: n.ClientLost) -> None:
    how = _DEPARTURES[notice.how]
    going_on = _going_on(notice)
    if not notice.held:
        # A quiet one is counted on the next tick (see log_held_back).
        level = logging.DEBUG if notice.quiet else logging.INFO
        log.log(level, "client %s client=%s%s", how, notice.recipient, going_on)
        return
    # Even one that said BYE may open its session again to collect them.
    log.info(
        "client %s client=%s; keeping %s for its return (result_ttl_s; "
        "orphan_grace_s if the broker is full)%s",
        how,
        notice.recipient,
        counted(notice.held, "result"),
        going_on,
    )


def _going_on(notice: n.ClientLost) -> str:
    """The tasks of a departed client's session still in the broker, which
    run on for it, and how to drop them: a killed map's hundreds of queued
    tasks went unsaid (tester 36)."""
    if not notice.unfinished:
        return ""
    return (
        f"; {counted(notice.unfinished, 'more task')} of its session are in the "
        f"broker and go on (`ventilator purge --session {notice.recipient}` "
        "drops them)"
    )

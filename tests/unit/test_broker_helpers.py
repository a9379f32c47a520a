"""Small pure pieces of the I/O shells: log rate limiting, message splitting."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from ventilator import protocol as p
from ventilator._client_io import SUBMIT_BATCH, SUBMIT_BATCH_BYTES, _batches
from ventilator._full_queues import FullQueues
from ventilator._notice_log import (
    NoticeLog,
    RefusalSpell,
    _log_notice,
    _log_worker_lost,
)
from ventilator._wire import Unfinished, UnfinishedHandshakes
from ventilator.broker import (
    BACKEND,
    FRONTEND,
    SEND_QUEUE,
    Broker,
    BrokerConfig,
    _DiskRoom,
    _log_unfinished,
    _RateLimit,
    _results_first,
)
from ventilator.errors import UsageError
from ventilator.logs import Dwindling, Routine
from ventilator.notices import (
    ClientJoined,
    ClientLost,
    Departure,
    FailureForgotten,
    Fault,
    Notice,
    OperatorActed,
    Rejected,
    SinkTaken,
    TaskFailed,
    WorkerJoined,
    WorkerLeft,
    WorkerLost,
    WorkerReturned,
)
from ventilator.scheduler import STALL_REASON


def test_rate_limit_allows_one_line_per_interval_and_counts_the_rest() -> None:
    limit = _RateLimit(per_s=1.0, what="refused message")

    allowed = [limit.allows(now) for now in (0.0, 0.1, 0.2, 0.9, 1.0, 1.5)]

    assert allowed == [True, False, False, False, True, False]
    assert limit.suppressed_note() == "; 4 more not logged"
    assert limit.suppressed_note() == ""


def test_rate_limit_counts_a_bursts_tail_once_its_interval_is_over() -> None:
    limit = _RateLimit(per_s=1.0, what="refused message")
    for now in (0.0, 0.1, 0.2):
        limit.allows(now)

    assert limit.held_back(0.5) is None  # the interval of the last line runs
    note = "2 more refused messages not logged in the last seconds"
    assert limit.held_back(1.0) == note
    assert limit.held_back(2.0) is None  # counted once
    assert limit.allows(2.0)
    assert limit.suppressed_note() == ""


def _spec(task_id: int, size: int) -> p.TaskSpec:
    return p.TaskSpec(task_id, "jobs:f", b"x" * size)


def test_submissions_are_split_by_count() -> None:
    specs = [_spec(i, 1) for i in range(SUBMIT_BATCH * 2 + 1)]

    sizes = [len(chunk) for chunk in _batches(specs)]

    assert sizes == [SUBMIT_BATCH, SUBMIT_BATCH, 1]


def test_submissions_are_split_by_bytes_keeping_order() -> None:
    big = SUBMIT_BATCH_BYTES // 2 + 1
    specs = [_spec(i, big) for i in range(5)]

    chunks = list(_batches(specs))

    assert [len(chunk) for chunk in chunks] == [2, 2, 1]
    assert [s.task_id for chunk in chunks for s in chunk] == [0, 1, 2, 3, 4]


def test_one_oversized_submission_still_travels_alone() -> None:
    specs = [_spec(0, SUBMIT_BATCH_BYTES * 3), _spec(1, 1)]

    assert [len(chunk) for chunk in _batches(specs)] == [1, 1]


def test_only_messages_of_small_frames_are_copied() -> None:
    assert p.small([b"header", b"x" * (p.ZERO_COPY_BYTES - 1)])
    assert not p.small([b"header", b"x" * p.ZERO_COPY_BYTES])


def test_results_go_before_the_commit_but_never_ahead_of_what_waits_for_it() -> None:
    def results(task_id: int) -> p.Results:
        return p.Results([p.ResultEntry(task_id, p.Status.OK, b"")])

    welcome = p.Welcome(window=10, max_payload_bytes=1024, heartbeat_interval_s=1.0)
    messages: list[tuple[bytes, p.Command]] = [
        (b"alice", results(1)),
        (b"bob", welcome),
        (b"bob", results(2)),  # behind bob's WELCOME, which waits for the commit
        (b"alice", p.Accepted([3])),
        (b"alice", results(4)),  # behind alice's ACCEPTED
        (b"carol", results(5)),
        (b"mdp-dave", results(6)),  # the gateway orders an MDP client's replies
    ]

    early, after_commit = _results_first(messages, lambda peer: peer.startswith(b"mdp"))

    assert early == [messages[0], messages[5]]
    assert after_commit == [
        messages[1],
        messages[2],
        messages[3],
        messages[4],
        messages[6],
    ]


def test_a_worker_that_said_goodbye_is_logged_as_leaving_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        _log_notice(WorkerLeft("worker-1", requeued=1))

    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert "lost" not in record.getMessage()


@pytest.mark.parametrize(
    ("lost", "level"),
    [
        (WorkerLost("w", "silent for 3.1s", 2, 0), logging.WARNING),
        # Idle, but a worker fewer: an operator at the default level (WARNING)
        # heard nothing of a worker killed between tasks.
        (WorkerLost("w", "silent for 3.1s", 0, 0), logging.WARNING),
        (
            WorkerLost("w", STALL_REASON, 2, 0, fault=Fault.NONE),
            logging.INFO,
        ),
        (
            WorkerLost("w", "let 3 tasks overrun", 0, 0, fault=Fault.MISBEHAVED),
            logging.WARNING,
        ),
    ],
)
def test_a_lost_worker_is_a_warning_only_when_it_was_at_fault(
    caplog: pytest.LogCaptureFixture, lost: WorkerLost, level: int
) -> None:
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        _log_worker_lost(lost, "")

    [record] = caplog.records
    assert record.levelno == level, record.getMessage()


def test_a_worker_cut_off_by_the_broker_s_own_stall_is_not_called_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # It reconnected while the broker stood still, and registers again at once.
    dropped = WorkerLost("w", STALL_REASON, 4, 0, fault=Fault.NONE)
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        _log_worker_lost(dropped, "")

    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert "lost" not in record.getMessage()


def test_a_refused_sink_asking_again_is_logged_below_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="ventilator.broker"):
        _log_notice(SinkTaken("totals", first=True))
        _log_notice(SinkTaken("totals", first=False))

    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG]


def test_a_returning_worker_says_how_many_requeued_tasks_it_took_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Dropped, "requeued 3 tasks unblamed (if it registers again it takes back
    # those it still runs)"; back, the line that follows must close the story.
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        _log_notice(WorkerReturned("w", kept=0, requeued=0, refused=0, taken_back=3))
        _log_notice(WorkerReturned("w", kept=2, requeued=0, refused=0))

    back, kept = (r.getMessage() for r in caplog.records)
    assert "took back 3" in back
    assert "took back" not in kept
    assert {r.levelno for r in caplog.records} == {logging.INFO}


def test_a_worker_serving_thousands_of_functions_joins_in_a_short_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    services = [f"jobs:function_{i}" for i in range(3000)]
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        _log_notice(WorkerJoined("w", services, 4))

    [record] = caplog.records
    assert "and 2980 more" in record.getMessage()
    assert len(record.getMessage()) < 1000


@pytest.mark.parametrize(("slots", "said"), [(1, "slots=1"), (None, "slots=-")])
def test_a_worker_joins_in_a_line_telling_its_slots_from_its_credit(
    caplog: pytest.LogCaptureFixture, slots: int | None, said: str
) -> None:
    # A worker that re-registered once its credit grew to 64 joined again with
    # "capacity=64", after "capacity=1": read as more slots, which it has not.
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        _log_notice(WorkerJoined("w", ["jobs:work"], 64, slots))

    [record] = caplog.records
    fields = record.getMessage().split()
    assert said in fields
    assert "credit=64" in fields
    assert not any(field.startswith("capacity=") for field in fields)


def test_broker_refuses_a_malformed_endpoint_before_warning_about_exposure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = Broker(BrokerConfig("foo://bar", "tcp://127.0.0.1:*", None, "memory"))
    try:
        with pytest.raises(UsageError, match="frontend endpoint 'foo://bar'"):
            server.bind()
    finally:
        server.stop()
        server.serve()  # returns at once, closing what the constructor opened

    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


MIB = 2**20


def disk_room_of(tmp_path: Path, free: list[int]) -> _DiskRoom:
    """The disk room of a broker keeping the default 64 MiB reserve, on a
    disk whose free bytes are `free[0]` at each look."""
    config = BrokerConfig(
        journal=str(tmp_path / "journal.db"), journal_min_free_bytes=64 * MIB
    )
    return _DiskRoom(config, free_bytes=lambda folder: free[0])


def test_the_disk_is_looked_at_again_once_a_quarter_of_the_reserve_was_written(
    tmp_path: Path,
) -> None:
    # A burst of large payloads between two ticks must not fill the disk: the
    # journal's own writes bring the next look forward.
    mib = MIB
    free = [100 * mib]
    room = disk_room_of(tmp_path, free)

    assert room.problem(written_bytes=0) is None
    assert not room.due(written_bytes=15 * mib)
    assert room.due(written_bytes=16 * mib)

    free[0] = 60 * mib
    problem = room.problem(written_bytes=16 * mib)

    assert problem is not None and "60 MiB free" in problem
    assert not room.due(written_bytes=31 * mib)


def test_results_are_held_while_the_disk_has_no_room_to_record_their_delivery(
    tmp_path: Path,
) -> None:
    # Tester 36: a client collected 192 results from a broker whose disk an
    # outsider filled; it stopped, unable to journal their acknowledgements,
    # and delivered them again after its restart.
    free = [100 * MIB]
    room = disk_room_of(tmp_path, free)

    room.problem()
    before = room.delivery_hold()
    free[0] = 15 * MIB  # into the quarter of the reserve kept for SQLite's log
    room.problem()
    held = room.delivery_hold()
    free[0] = 100 * MIB
    room.problem()

    assert before is None
    assert held is not None and "15 MiB free" in held
    assert room.delivery_hold() is None


def test_a_memory_broker_never_looks_at_its_disk() -> None:
    looked: list[str] = []

    def free_bytes(folder: str) -> int:
        looked.append(folder)
        return 0

    room = _DiskRoom(BrokerConfig(journal=None), free_bytes=free_bytes)

    assert room.problem(written_bytes=10**12) is None
    assert not room.due(written_bytes=10**12)
    assert looked == []


# The value libzmq gives a connection its peer closed mid-handshake, and one
# that ran out of handshake time (the errno its last read left).
CLOSED, TIMED_OUT = errno.ECONNRESET, errno.EAGAIN


def test_unfinished_handshakes_that_a_success_follows_are_settled_at_once() -> None:
    # The connections peers gave up on while the broker stood still, accepted
    # on SIGCONT already closed, then the peers' new ones.
    unfinished = UnfinishedHandshakes(settle_s=10.0)
    unfinished.failed(FRONTEND, CLOSED, now=100.0)
    unfinished.failed(FRONTEND, TIMED_OUT, now=100.0)
    assert unfinished.settled(now=100.1) == []  # waiting to see what follows

    unfinished.succeeded(FRONTEND)

    [(tag, settled)] = unfinished.settled(now=100.2)
    assert tag == FRONTEND
    assert (settled.closed, settled.timed_out, settled.followed) == (1, 1, True)
    assert unfinished.settled(now=200.0) == []  # told once


def test_unfinished_handshakes_no_success_follows_are_settled_after_a_while() -> None:
    unfinished = UnfinishedHandshakes(settle_s=10.0)
    unfinished.succeeded(BACKEND)  # before: says nothing of what comes after
    unfinished.failed(BACKEND, CLOSED, now=100.0)
    unfinished.succeeded(FRONTEND)  # another socket's peers

    assert unfinished.settled(now=109.9) == []
    [(tag, settled)] = unfinished.settled(now=110.0)
    assert tag == BACKEND
    assert (settled.count, settled.followed) == (1, False)


@pytest.mark.parametrize(
    ("closed", "timed_out", "followed", "level"),
    [
        (3, 0, True, "INFO"),
        (0, 3, True, "INFO"),
        # A plain TCP connect and close, as a load balancer's health check
        # does every few seconds: routine, not a page every 10 s.
        (3, 0, False, "INFO"),
        (0, 3, False, "WARNING"),  # peers that began and never finished
        (2, 1, False, "WARNING"),
    ],
)
def test_unfinished_handshakes_warn_only_when_peers_began_and_none_got_in_after(
    caplog: pytest.LogCaptureFixture,
    closed: int,
    timed_out: int,
    followed: bool,
    level: str,
) -> None:
    caplog.set_level(logging.INFO, logger="ventilator.broker")
    unfinished = Unfinished(100.0, closed, timed_out, followed)

    routine = Routine(log_name="ventilator.broker", first_interval_s=60.0)
    _log_unfinished("client", unfinished, 30.0, 110.0, routine)

    assert [(r.name, r.levelname) for r in caplog.records] == [
        ("ventilator.broker", level)
    ]


def test_a_health_check_every_few_seconds_is_logged_less_and_less_often(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A load balancer probes the port every 5 s for two hours: each probe
    # settles 10 s on as a port check. A line every 10 s buried the log.
    caplog.set_level(logging.DEBUG, logger="ventilator.broker")
    routine = Routine(log_name="ventilator.broker", first_interval_s=60.0)
    port_check = Unfinished(0.0, closed=1, timed_out=0, followed=False)

    for now in range(10, 7200, 5):
        _log_unfinished("client", port_check, 30.0, float(now), routine)

    said = [r for r in caplog.records if r.levelname == "INFO"]
    assert caplog.records[0].levelname == "INFO"  # the first at once
    assert 5 <= len(said) <= 10, [r.getMessage() for r in said]
    assert "more like it" in said[-1].getMessage()
    assert len(caplog.records) == len(range(10, 7200, 5))  # the rest at DEBUG


def test_a_port_check_after_a_long_quiet_is_said_at_once_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ventilator.broker")
    routine = Routine(log_name="ventilator.broker", first_interval_s=60.0)
    port_check = Unfinished(0.0, closed=1, timed_out=0, followed=False)

    for now in (10.0, 15.0, 20.0, 20_000.0):
        _log_unfinished("client", port_check, 30.0, now, routine)

    assert len(caplog.records) == 2  # the first and the one after the quiet


def test_the_disk_budget_keeps_the_reserve_for_tasks_and_a_quarter_of_it_for_results(
    tmp_path: Path,
) -> None:
    mib = 2**20
    config = BrokerConfig(
        journal=str(tmp_path / "journal.db"), journal_min_free_bytes=64 * mib
    )
    room = _DiskRoom(config, free_bytes=lambda folder: 100 * mib)

    room.problem(written_bytes=0)
    budget = room.budget()

    assert (budget.tasks, budget.results) == (36 * mib, 84 * mib)


def test_a_lasting_silence_is_said_less_and_less_often_and_anew_for_a_new_one() -> None:
    dwindling = Dwindling(first_interval_s=3.0, max_interval_s=20.0)
    began_at = 0.0

    said_at = [t for t in range(0, 100) if dwindling.due(float(t), began_at)]

    # At once, then 3, 6, 12 s later, then every 20 s at most.
    assert said_at == [0, 3, 9, 21, 41, 61, 81]
    assert dwindling.due(100.5, began_at=100.0)  # the broker came back, and went


def test_workers_dropped_after_a_broker_stall_are_not_counted_as_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Tester 36: "3 more workers lost not logged" at WARNING, after a stall in
    # which every worker was dropped unblamed and came straight back.
    notice_log = NoticeLog(FullQueues(SEND_QUEUE))
    dropped: list[Notice] = [
        WorkerLost(f"w{i}", STALL_REASON, 1, 0, fault=Fault.NONE) for i in range(4)
    ]
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        notice_log.log(dropped, now=100.0)
        notice_log.log_held_back(now=110.0)

    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert all(level == logging.INFO for level, _ in said), said
    assert not any("lost" in message for _, message in said), said
    assert any(m.startswith("3 more workers dropped not logged") for _, m in said)


def test_a_burst_of_refused_tasks_is_logged_once_a_second_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notice_log = NoticeLog(FullQueues(SEND_QUEUE))
    refusals: list[Notice] = [Rejected("s", i, "disk full") for i in range(5)]
    with caplog.at_level(logging.WARNING, logger="ventilator.broker"):
        notice_log.log(refusals, now=100.0)
        notice_log.log(refusals[:1], now=101.5)

    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "task=0" in messages[0] and "more not logged" not in messages[0]
    assert messages[1].endswith("; 4 more not logged")


def test_hand_backs_of_a_busy_worker_are_said_less_and_less_often(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Tester 34: 166 broker lines in 2 minutes of long and short tasks mixed.
    notice_log = NoticeLog(FullQueues(SEND_QUEUE))
    handed = WorkerReturned("w", 2, 5, 0, same_connection=True)
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        for second in range(120):
            notice_log.log([handed], now=float(second))

    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(said) == 2, said
    assert said[0].startswith("worker registered again worker=w, keeping 2 tasks")
    assert "59 more like it" in said[1]


def test_the_tail_of_a_burst_of_task_failures_is_said_on_a_tick(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Tester 36: three timeouts 3 s apart gave one line; the other two were
    # said only when a fourth came, minutes later.
    notice_log = NoticeLog(FullQueues(SEND_QUEUE))
    timeouts: list[Notice] = [
        TaskFailed(ticket, "jobs:hang", "s", ticket, "timeout", "ran past 2s", "w")
        for ticket in (1, 2, 3)
    ]
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        for second, notice in zip((0.0, 3.0, 6.0), timeouts, strict=True):
            notice_log.log([notice], now=second)
        notice_log.log_held_back(now=9.0)  # within the first interval: not yet
        notice_log.log_held_back(now=11.0)
        notice_log.log_held_back(now=12.0)  # said once

    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(said) == 2, said
    assert "ticket=3" in said[1] and "(1 more like it since the last line)" in said[1]


def test_a_worker_back_after_a_reconnection_is_said_each_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notice_log = NoticeLog(FullQueues(SEND_QUEUE))
    returned = WorkerReturned("w", 2, 5, 0)
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        notice_log.log([returned], now=1.0)
        notice_log.log([returned], now=2.0)

    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert [m.startswith("worker returned") for m in said] == [True, True], said


def test_counts_of_one_read_in_the_singular(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        _log_notice(WorkerLeft("w", requeued=1))
        _log_worker_lost(WorkerLost("w", "silent for 3.1s", 1, 1, split=1), "")
        _log_worker_lost(WorkerLost("w", STALL_REASON, 1, 0, fault=Fault.NONE), "")
        _log_notice(WorkerReturned("w", kept=1, requeued=1, refused=1, taken_back=1))

    said = " ".join(r.getMessage() for r in caplog.records)
    for plural in ("tasks", "batches", "results", "1 it no longer"):
        assert f"1 {plural}" not in said, said


def test_a_client_lost_with_tasks_still_queued_says_they_go_on_and_how_to_drop_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Tester 36: a killed map's line said "keeping 1 result for its return",
    # not the 328 tasks of its session still queued, running for nobody.
    lost = ClientLost("map-vm-1", 1, Departure.UNREACHABLE, unfinished=328)
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        _log_notice(lost)

    [said] = [r.getMessage() for r in caplog.records]
    assert "keeping 1 result for its return" in said
    assert "328 more tasks of its session are in the broker and go on" in said
    assert "`ventilator purge --session map-vm-1` drops them" in said


def test_a_client_whose_join_was_held_back_is_not_said_to_leave(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # "client left" for a client never said to join reads as a client unknown.
    notice_log = NoticeLog(FullQueues(SEND_QUEUE))
    joins: list[Notice] = [ClientJoined("c0", 0), ClientJoined("c1", 0)]
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        notice_log.log(joins, now=100.0)  # c1's join is held back
        notice_log.log([ClientLost("c1", 0, Departure.LEFT)], now=100.1)
        notice_log.log_held_back(now=110.0)

    said = [r.getMessage() for r in caplog.records]
    assert not any("client=c1" in m for m in said), said
    assert any(m.startswith("1 more client joined not logged") for m in said), said
    # Nor is it left out of the count (tester 36 missed those that left).
    assert (
        "1 more client left not logged in the last seconds (nor were their joins)"
        in said
    )


def test_failures_forgotten_one_at_a_time_are_said_less_and_less_often(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Tester 20: once `failed_kept` was full, every new failure logged "forgot
    # the 1 oldest failed tasks", half of a soak run's log.
    notice_log = NoticeLog(FullQueues(SEND_QUEUE))
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        for second in range(600):  # one failure a second for 10 minutes
            notice_log.log([FailureForgotten(1, 1000)], now=float(second))

    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert 2 <= len(said) <= 6, said
    assert said[0].startswith("forgot the oldest failed task:")
    assert "more like it" in said[-1]


def test_an_operator_command_is_logged_with_who_asked_and_what_it_did(
    caplog: pytest.LogCaptureFixture,
) -> None:
    acted = OperatorActed(
        "alice", p.Purge(session="bob"), {"session": "bob", "queued": 3}
    )
    with caplog.at_level(logging.INFO, logger="ventilator.broker"):
        _log_notice(acted)

    [record] = caplog.records
    assert record.levelno == logging.INFO
    said = record.getMessage()
    assert "client=alice" in said and "purge session=bob" in said
    assert '"queued":3' in said


def test_a_task_refused_for_itself_is_no_spell_of_the_whole_broker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Tester 36: one task refused for its key's rights was followed by
    # "accepting new tasks again, after refusing 1 task over 0.0s".
    notice_log = NoticeLog(FullQueues(SEND_QUEUE))
    with caplog.at_level(logging.WARNING, logger="ventilator.broker"):
        notice_log.log([Rejected("s", 1, "not allowed")], now=100.0)
        notice_log.say_accepting_again(now=110.0)
        notice_log.log([Rejected("s", 2, "full", refusing_all=True)], now=120.0)
        notice_log.say_accepting_again(now=158.0)

    said = [r.getMessage() for r in caplog.records if "accepting" in r.getMessage()]
    assert said == ["accepting new tasks again; 1 task refused since 38.0s ago"]


def test_a_spell_of_refusals_ends_with_a_task_accepted_after_a_quiet_second() -> None:
    # A tester's flood got thousands of tasks refused; nothing said when the
    # broker took work again. At a limit's edge, refusals and acceptances
    # alternate turn by turn: that is still the spell.
    spell = RefusalSpell()
    spell.refused(10.0)
    spell.refused(10.5)

    assert spell.ended(10.6) is None  # refusals still come
    spell.refused(11.0)
    assert spell.ended(11.0 + RefusalSpell.QUIET_S) == (3, 1.0 + RefusalSpell.QUIET_S)
    assert spell.ended(20.0) is None  # said once

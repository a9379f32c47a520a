"""Sessions are remembered while they matter and bounded in number: a session
that left owing and holding nothing is forgotten after `session_grace_s`, a
connection opens a few at most, and the broker `max_sessions` in all."""

from __future__ import annotations

from ventilator import protocol as p
from ventilator.notices import (
    ClientJoined,
    ClientLost,
    SessionRefused,
    SessionsForgotten,
)
from ventilator.policy import Limits
from ventilator.scheduler import (
    SESSIONS_PER_CONNECTION,
    sink_recipient,
)
from ventilator.status import STATUS_CLIENTS

from .driver import (
    CLIENT,
    Driver,
    accepted,
    assignments,
    error_codes,
    notices,
    results,
    sent,
    task,
)

W1 = b"worker-1"
OTHER = b"client-2"
# Beats of 1 s, given up after 3 silent ones; forgotten 10 s after last heard.
LIMITS = Limits(heartbeat_interval_s=1.0, liveness=3, session_grace_s=10.0)


def killed(driver: Driver, peer: bytes = CLIENT) -> None:
    """The client on `peer` stops speaking (kill -9: no BYE) and is given up."""
    driver.tick(4.0)
    assert all(r.peer != peer for r in driver.scheduler.recipients.values())


def test_a_killed_client_owing_nothing_is_forgotten_after_the_grace() -> None:
    driver = Driver(LIMITS)
    driver.hello(session="alice")
    driver.submit(task(1))
    [running] = assignments(driver.ready(W1), W1)
    [result] = results(driver.done(W1, running), CLIENT)
    driver.ack(("", result.task_id))
    killed(driver)

    kept = driver.tick(5.0)  # 9 s after it was last heard
    forgotten = driver.tick(1.0)

    assert not notices(kept, SessionsForgotten)
    assert [n.count for n in notices(forgotten, SessionsForgotten)] == [1]
    assert "alice" not in driver.scheduler.recipients
    assert driver.scheduler.status(driver.now)["clients"] == []


def test_a_session_that_left_owing_a_result_is_not_forgotten() -> None:
    driver = Driver(LIMITS)
    driver.hello(session="alice")
    driver.submit(task(1))
    [running] = assignments(driver.ready(W1), W1)
    assert results(driver.done(W1, running), CLIENT)  # sent, never acknowledged
    killed(driver)

    driver.tick(60.0)

    assert list(driver.scheduler.recipients["alice"].unacked)


def test_a_session_that_left_with_a_task_queued_is_not_forgotten() -> None:
    driver = Driver(LIMITS)
    driver.hello(session="alice")
    driver.submit(task(1))
    killed(driver)

    driver.tick(60.0)

    assert "alice" in driver.scheduler.recipients


def test_a_forgotten_session_that_speaks_again_is_simply_new() -> None:
    driver = Driver(LIMITS)
    driver.hello(session="alice")
    killed(driver)
    driver.tick(10.0)

    unknown = driver.submit(task(1))
    again = driver.hello(session="alice")

    assert error_codes(unknown, CLIENT) == ["hello_first"]
    assert sent(again, CLIENT, p.Welcome)
    assert accepted(driver.submit(task(1))) == [1]


def test_a_sink_that_left_owing_nothing_is_forgotten_after_the_grace() -> None:
    driver = Driver(LIMITS)
    driver.hello(sink="totals")
    killed(driver)

    driver.tick(10.0)

    assert sink_recipient("totals") not in driver.scheduler.recipients


def test_an_mdp_client_waiting_for_its_reply_is_not_forgotten() -> None:
    driver = Driver(LIMITS)
    driver.scheduler.attach_recipient(b"mdp-1", "mdp:01", driver.now, expires=False)
    driver.scheduler.accept_task("mdp:01", task(1), driver.now)

    driver.tick(60.0)

    assert driver.scheduler.recipients["mdp:01"].peer == b"mdp-1"


def test_a_connection_renaming_its_session_is_refused_past_a_few() -> None:
    driver = Driver(LIMITS)
    for i in range(SESSIONS_PER_CONNECTION):
        assert sent(driver.hello(session=f"s{i}"), CLIENT, p.Welcome)
        assert accepted(driver.submit(task(1))) == [1]

    refused = driver.hello(session="one-more")
    after = driver.submit(task(2))

    [error] = sent(refused, CLIENT, p.Error)
    assert error.code == p.TOO_MANY_SESSIONS
    assert str(SESSIONS_PER_CONNECTION) in error.message
    assert [n.session for n in notices(refused, SessionRefused)] == ["one-more"]
    # It left its last session: its next message is not taken for that one's.
    assert error_codes(after, CLIENT) == ["hello_first"]
    assert len(driver.scheduler.tasks) == SESSIONS_PER_CONNECTION


def test_an_idle_current_session_makes_room_at_the_limit() -> None:
    driver = Driver(LIMITS)
    for i in range(SESSIONS_PER_CONNECTION - 1):
        driver.hello(session=f"s{i}")
        driver.submit(task(1))
    driver.hello(session="idle")

    renamed = driver.hello(session="renamed")

    assert sent(renamed, CLIENT, p.Welcome)
    assert "idle" not in driver.scheduler.recipients


def test_a_connection_renaming_idle_sessions_keeps_one_at_a_time() -> None:
    driver = Driver(LIMITS)

    for i in range(10 * SESSIONS_PER_CONNECTION):
        assert sent(driver.hello(session=f"s{i}"), CLIENT, p.Welcome)

    assert list(driver.scheduler.recipients) == [f"s{10 * SESSIONS_PER_CONNECTION - 1}"]


def test_a_new_session_past_max_sessions_is_refused_naming_the_limit() -> None:
    driver = Driver(Limits(max_sessions=2))
    driver.hello(b"c1", session="one")
    driver.hello(b"c2", session="two")

    refused = driver.hello(b"c3", session="three")
    back = driver.hello(b"c4", session="two")  # a known one may come back

    [error] = sent(refused, b"c3", p.Error)
    assert error.code == p.TOO_MANY_SESSIONS
    assert "max_sessions=2" in error.message
    assert sent(back, b"c4", p.Welcome)


def test_room_made_by_forgetting_takes_a_new_session() -> None:
    driver = Driver(Limits(max_sessions=1, session_grace_s=0.0))
    driver.hello(b"c1", session="one")
    driver.client(b"c1", p.Bye())
    driver.tick(1.0)

    assert sent(driver.hello(b"c2", session="two"), b"c2", p.Welcome)


def test_status_lists_a_bounded_number_of_clients_with_exact_counts() -> None:
    driver = Driver(LIMITS)
    count = STATUS_CLIENTS + 50
    for i in range(count):
        driver.hello(f"c{i}".encode(), session=f"s{i}")
    driver.submit(task(1), peer=b"c7")
    [running] = assignments(driver.ready(W1), W1)
    driver.done(W1, running)

    status = driver.scheduler.status(driver.now)

    clients = status["clients"]
    assert isinstance(clients, list) and len(clients) == STATUS_CLIENTS
    assert clients[0]["name"] == "s7"  # owed a result: the most relevant
    assert status["client_counts"] == {
        "all": count,
        "connected": count,
        "sinks": 0,
        "connected_sinks": 0,
        "listed": STATUS_CLIENTS,
    }


def listed(status: dict[str, object]) -> list[str]:
    clients = status["clients"]
    assert isinstance(clients, list)
    return [client["name"] for client in clients]


def asked_for_status(driver: Driver, peer: bytes) -> dict[str, object]:
    [reply] = sent(driver.client(peer, p.StatusRequest()), peer, p.StatusReply)
    return reply.status


def test_a_session_that_only_asked_is_left_out_of_other_answers() -> None:
    # As two `ventilator status` runs at once saw it: each listed the other.
    driver = Driver(LIMITS)
    driver.hello(session="alice")
    driver.submit(task(1))
    driver.hello(b"status-1", session="first-run")
    driver.hello(b"status-2", session="second-run")
    asked_for_status(driver, b"status-1")

    status = asked_for_status(driver, b"status-2")

    assert listed(status) == ["alice", "second-run"]  # itself, which looks itself up
    counts = status["client_counts"]
    assert isinstance(counts, dict)
    assert (counts["all"], counts["connected"], counts["listed"]) == (2, 2, 2)
    assert "first-run" not in listed(driver.scheduler.status(driver.now))


def test_a_session_that_asked_and_holds_or_submitted_is_listed() -> None:
    driver = Driver(LIMITS)
    driver.hello(session="alice")
    driver.submit(task(1))
    asked_for_status(driver, CLIENT)
    driver.hello(b"quiet", session="connected-only")  # asked nothing yet
    driver.hello(b"watcher", session="watcher")

    status = asked_for_status(driver, b"watcher")

    assert sorted(listed(status)) == ["alice", "connected-only", "watcher"]


def test_a_session_that_only_asks_is_no_news_in_the_log() -> None:
    # Every `ventilator status` run was a "client joined" and a "client left"
    # line at INFO: news to nobody, and noise around what happened.
    driver = Driver(LIMITS)
    joined = driver.hello()
    asked = driver.client(CLIENT, p.StatusRequest())
    left = driver.client(CLIENT, p.Bye())

    assert notices(joined, ClientJoined) == notices(asked, ClientJoined) == []
    [lost] = notices(left, ClientLost)
    assert lost.quiet


def test_a_new_session_is_said_to_join_when_it_first_works() -> None:
    driver = Driver(LIMITS)
    driver.hello()
    driver.client(CLIENT, p.StatusRequest())

    submitted = driver.submit(task(1))
    left = driver.client(CLIENT, p.Bye())

    assert notices(submitted, ClientJoined) == [ClientJoined("alice", 0)]
    [lost] = notices(left, ClientLost)
    assert not lost.quiet


def test_a_sink_and_a_returning_session_are_said_to_join_at_once() -> None:
    driver = Driver(LIMITS)
    driver.hello()
    driver.submit(task(1))
    driver.client(CLIENT, p.Bye())  # holds its queued task

    back = driver.hello(OTHER)
    sink = driver.hello(b"sink-reader", session="reader", sink="totals")

    assert notices(back, ClientJoined) == [ClientJoined("alice", 0)]
    assert notices(sink, ClientJoined) == [ClientJoined(sink_recipient("totals"), 0)]

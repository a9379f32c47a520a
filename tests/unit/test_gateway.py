"""The MDP gateway over a real scheduler, without sockets: MDP frames in, MDP
frames out, and the scheduler's queues, leases and journal records between."""

from __future__ import annotations

import itertools
import logging

import pytest

from ventilator import mdp
from ventilator import protocol as p
from ventilator.gateway import MdpGateway, MdpSettings, mdp_name
from ventilator.policy import Limits
from ventilator.scheduler import Effects, Scheduler, State

C, W = mdp.CLIENT, mdp.WORKER
READY, REQUEST, REPLY, HEARTBEAT, DISCONNECT = (bytes((n,)) for n in range(1, 6))
CLIENT, WORKER, OTHER = b"Mclient", b"Mworker", b"Mother"
SETTINGS = MdpSettings(heartbeat_interval_s=1.0, liveness=3)

Sent = list[tuple[bytes, list[bytes]]]


class Shell:
    """What the broker does with the gateway, minus the sockets."""

    def __init__(
        self,
        limits: Limits | None = None,
        settings: MdpSettings = SETTINGS,
        first_uuid: int = 1,
    ) -> None:
        self.scheduler = Scheduler(limits or Limits(max_attempts=2))
        uuids = (f"{n:032x}" for n in itertools.count(first_uuid))
        self.gateway = MdpGateway(self.scheduler, settings, lambda: next(uuids))
        self.now = 0.0
        self.journalled: list[Effects] = []

    def receive(self, peer: bytes, *frames: bytes) -> Sent:
        self.gateway.receive(peer, list(frames), self.now)
        return self.turn()

    def turn(self) -> Sent:
        effects = self.scheduler.flush()
        self.journalled.append(effects)
        sent: Sent = []
        for peer, command in effects.to_workers:
            if self.gateway.owns(peer):
                sent += [(peer, f) for f in self.gateway.to_worker(peer, command, 0)]
            else:
                assert not peer.startswith(b"M"), f"{command} in VNT1 to MDP {peer!r}"
        for peer, command in effects.to_clients:
            if self.gateway.owns(peer):
                sent += [(peer, f) for f in self.gateway.to_client(peer, command)]
                self.gateway.delivered(peer, command, self.now)
            else:
                assert not peer.startswith(b"M"), f"{command} in VNT1 to MDP {peer!r}"
        sent += self.gateway.outbox
        self.gateway.outbox = []
        self.gateway.end_turn()
        self.scheduler.check_invariants()
        return sent

    def later(self, seconds: float) -> Sent:
        self.now += seconds
        self.scheduler.tick(self.now)
        self.scheduler.heartbeats()
        self.gateway.expire_unserved(self.now)
        return self.turn()


@pytest.fixture
def shell() -> Shell:
    return Shell()


def request_sent_to_worker(sent: Sent) -> tuple[bytes, list[bytes]]:
    [(peer, frames)] = sent
    assert peer == WORKER and frames[:3] == [b"", W, REQUEST] and frames[4] == b""
    return frames[3], frames[5:]


def test_heartbeats_of_the_scheduler_never_reach_mdp_peers_as_vnt1(
    shell: Shell,
) -> None:
    shell.receive(WORKER, b"", W, READY, b"echo")
    [(worker, request)] = shell.receive(CLIENT, b"", C, b"echo", b"x")
    shell.scheduler.heartbeats()
    assert shell.turn() == []  # heartbeats to MDP peers are the gateway's own

    shell.scheduler.heartbeats()  # queued before the reply is delivered
    sent = shell.receive(worker, b"", W, REPLY, *request[3:5], b"X")
    assert sent == [(CLIENT, [b"", C, b"echo", b"X"])]
    assert shell.later(0.5) == []  # the answered client is forgotten


def test_a_request_is_queued_journalled_and_answered_once(shell: Shell) -> None:
    assert shell.receive(CLIENT, b"", C, b"echo", b"a", b"") == []
    [task] = shell.scheduler.tasks.values()
    assert (task.state, task.queue, task.flags) == (
        State.QUEUED,
        "mdp:echo",
        p.Flags.RAW,
    )
    assert shell.journalled[-1].accepted == [task]

    address, body = request_sent_to_worker(
        shell.receive(WORKER, b"", W, READY, b"echo")
    )
    assert body == [b"a", b""]

    sent = shell.receive(WORKER, b"", W, REPLY, address, b"", b"A", b"")
    assert sent == [(CLIENT, [b"", C, b"echo", b"A", b""])]
    shell.turn()
    assert shell.scheduler.tasks == {}  # acknowledged on the client's behalf
    assert shell.scheduler.recipients == {}  # and the client, owed nothing, forgotten


def test_a_worker_serves_one_request_at_a_time(shell: Shell) -> None:
    shell.receive(WORKER, b"", W, READY, b"echo")
    first = shell.receive(CLIENT, b"", C, b"echo", b"1")
    assert shell.receive(CLIENT, b"", C, b"echo", b"2") == []

    address, _ = request_sent_to_worker(first)
    sent = shell.receive(WORKER, b"", W, REPLY, address, b"", b"one")
    replies = [f for peer, f in sent if peer == CLIENT]
    _, second = request_sent_to_worker([(p_, f) for p_, f in sent if p_ == WORKER])
    assert replies == [[b"", C, b"echo", b"one"]] and second == [b"2"]


def test_a_busy_worker_outlives_its_silence_and_an_idle_one_does_not(
    shell: Shell,
) -> None:
    shell.receive(WORKER, b"", W, READY, b"echo")
    shell.receive(OTHER, b"", W, READY, b"echo")
    shell.receive(CLIENT, b"", C, b"echo", b"1")

    shell.later(SETTINGS.max_silence_s + 1)

    workers = shell.scheduler.workers
    assert [w.peer for w in workers.values()] in ([WORKER], [OTHER])
    assert all(w.running for w in workers.values())


def test_the_request_of_an_unreachable_worker_goes_to_another(shell: Shell) -> None:
    shell.receive(WORKER, b"", W, READY, b"echo")
    request_sent_to_worker(shell.receive(CLIENT, b"", C, b"echo", b"x"))

    shell.scheduler.peer_unreachable(WORKER, shell.now)
    shell.turn()
    [(peer, frames)] = shell.receive(OTHER, b"", W, READY, b"echo")

    assert peer == OTHER and frames[5:] == [b"x"]


def test_heartbeats_go_to_busy_and_idle_mdp_workers(shell: Shell) -> None:
    shell.receive(WORKER, b"", W, READY, b"echo")
    shell.receive(OTHER, b"", W, READY, b"echo")
    shell.receive(CLIENT, b"", C, b"echo", b"x")

    shell.gateway.heartbeats()

    beats = [peer for peer, frames in shell.turn() if frames == [b"", W, HEARTBEAT]]
    assert sorted(beats) == sorted([WORKER, OTHER])


@pytest.mark.parametrize(
    "frames",
    [
        [b"", W, HEARTBEAT],
        [b"", W, REPLY, b"1.1", b"", b"x"],
        [b"", W, READY, b"mmi.service"],
        [b"", W, READY, b"titanic.request"],
        [b"", W, b"\x07"],
    ],
)
def test_unexpected_or_broken_worker_commands_get_disconnect(
    shell: Shell, frames: list[bytes]
) -> None:
    assert shell.receive(WORKER, *frames) == [(WORKER, [b"", W, DISCONNECT])]
    assert shell.scheduler.workers == {}


def test_a_second_ready_disconnects_and_requeues_what_it_held(shell: Shell) -> None:
    shell.receive(WORKER, b"", W, READY, b"echo")
    shell.receive(CLIENT, b"", C, b"echo", b"x")

    assert shell.receive(WORKER, b"", W, READY, b"echo") == [
        (WORKER, [b"", W, DISCONNECT])
    ]
    [task] = shell.scheduler.tasks.values()
    assert task.state is State.QUEUED and task.deaths == 0


def test_a_request_that_failed_for_good_gets_a_400_reply(shell: Shell) -> None:
    shell.receive(CLIENT, b"", C, b"echo", b"deadly")
    shell.receive(WORKER, b"", W, READY, b"echo")
    shell.scheduler.peer_unreachable(WORKER, shell.now)
    assert shell.turn() == []  # one death: requeued, no answer yet

    shell.receive(WORKER, b"", W, READY, b"echo")
    shell.scheduler.peer_unreachable(WORKER, shell.now)  # max_attempts: poison
    [(peer, frames)] = shell.turn()

    assert peer == CLIENT and frames[:3] == [b"", C, b"echo"]
    [status] = frames[3:]
    assert status.startswith(b"400 poison: ") and b"max_attempts=2" in status
    assert shell.turn() == []
    assert shell.scheduler.tasks == {}
    assert not shell.gateway.owns(CLIENT)


def test_a_request_the_broker_cannot_take_gets_a_500_reply() -> None:
    shell = Shell(Limits(max_payload_bytes=8))

    [(peer, frames)] = shell.receive(CLIENT, b"", C, b"echo", b"x" * 100)

    assert peer == CLIENT and frames[:3] == [b"", C, b"echo"]
    [status] = frames[3:]
    assert status.startswith(b"500 ") and b"max_payload_bytes" in status
    assert shell.scheduler.tasks == {}


def test_a_cancelled_request_gets_a_400_reply(shell: Shell) -> None:
    shell.receive(CLIENT, b"", C, b"echo", b"x")
    shell.scheduler.client_command(b"Fventilator", p.Hello("operator"), shell.now)

    shell.scheduler.client_command(b"Fventilator", p.Purge("mdp:echo"), shell.now)
    sent = [(peer, frames) for peer, frames in shell.turn() if peer == CLIENT]

    assert [frames[3][:13] for _, frames in sent] == [b"400 cancelled"]


def test_a_purged_request_keeps_its_busy_worker_until_it_replies(
    shell: Shell,
) -> None:
    # An MDP worker cannot be told to stop: a second request would reach it
    # while it still runs the first, and its reply to the first cut it off.
    shell.receive(WORKER, b"", W, READY, b"echo")
    [(_, first)] = shell.receive(CLIENT, b"", C, b"echo", b"1")
    assert shell.receive(OTHER, b"", C, b"echo", b"2") == []  # the worker is busy
    shell.scheduler.peer_unreachable(CLIENT, shell.now)
    shell.turn()
    operator = b"Foperator"
    shell.scheduler.client_command(operator, p.Hello("operator"), shell.now)
    purge = p.Purge(None, session=mdp_name(CLIENT))
    shell.scheduler.client_command(operator, purge, shell.now)

    assert not [frames for peer, frames in shell.turn() if peer == WORKER]

    after_reply = shell.receive(WORKER, b"", W, REPLY, first[3], b"", b"1")
    [second] = [frames for peer, frames in after_reply if peer == WORKER]
    assert second[2] == REQUEST and second[-1] == b"2"
    assert not [f for _, f in after_reply if DISCONNECT in f]


def test_mmi_service_answers_200_404_and_501(shell: Shell) -> None:
    def ask(service: bytes, *body: bytes) -> list[bytes]:
        [(peer, frames)] = shell.receive(CLIENT, b"", C, service, *body)
        assert peer == CLIENT and frames[:3] == [b"", C, service]
        return frames[3:]

    assert ask(b"mmi.service", b"echo") == [b"404"]
    shell.receive(WORKER, b"", W, READY, b"echo")
    assert ask(b"mmi.service", b"echo") == [b"200"]
    shell.receive(WORKER, b"", W, DISCONNECT)
    assert ask(b"mmi.service", b"echo") == [b"404"]
    assert ask(b"mmi.workers", b"echo") == [b"501"]
    assert ask(b"mmi.service", b"titanic.reply") == [b"200"]


def test_titanic_stores_the_reply_until_closed(shell: Shell) -> None:
    def ask(service: bytes, *body: bytes) -> list[bytes]:
        [(_, frames)] = shell.receive(CLIENT, b"", C, service, *body)
        return frames[3:]

    status, uuid = ask(b"titanic.request", b"echo", b"hi")
    assert status == b"200" and len(uuid) == 32
    assert ask(b"titanic.reply", uuid) == [b"300"]

    sent = shell.receive(WORKER, b"", W, READY, b"echo")
    address, body = request_sent_to_worker(sent)
    assert body == [b"hi"]
    shell.receive(WORKER, b"", W, REPLY, address, b"", b"HI")
    assert ask(b"titanic.reply", uuid) == [b"200", b"HI"]
    assert ask(b"titanic.reply", uuid) == [b"200", b"HI"]

    assert ask(b"titanic.close", uuid) == [b"200"]
    assert shell.scheduler.tasks == {}
    assert shell.journalled[-1].forgotten  # the journal row goes too
    assert ask(b"titanic.reply", uuid)[0][:3] == b"400"
    assert ask(b"titanic.close", uuid) == [b"200"]


def test_a_ventilator_task_on_an_mdp_queue_is_refused_not_sent(shell: Shell) -> None:
    shell.scheduler.client_command(b"Fventilator", p.Hello("alice"), 0.0)
    spec = p.TaskSpec(1, "mdp:echo", b"\x90")
    shell.scheduler.client_command(b"Fventilator", p.Submit([spec]), 0.0)
    effects = shell.scheduler.flush()

    assert shell.receive(WORKER, b"", W, READY, b"echo") == []
    [refusal] = [c for _, c in effects.to_clients if isinstance(c, p.Results)]
    assert [r.status for r in refusal.results] == [p.Status.REJECTED]
    assert not shell.scheduler.tasks


def test_restored_requests_keep_their_task_ids_unique(shell: Shell) -> None:
    shell.receive(CLIENT, b"", C, b"echo", b"x")
    shell.gateway.resume()
    shell.receive(OTHER, b"", C, b"echo", b"y")

    ids = sorted(t.task_id for t in shell.scheduler.tasks.values())
    assert ids == [1, 2]


def test_after_a_restart_a_new_client_with_a_dead_one_s_routing_id_gets_its_own_reply(
    shell: Shell,
) -> None:
    # libzmq numbers a ROUTER's connections from the same value on every
    # broker start: the first MDP client after a restart had the id of one
    # from before, and was sent that client's held reply as its own.
    numbered = b"M\x00\x6b\x8b\x45\x67"  # an id libzmq made (it starts with 0)
    shell.receive(numbered, b"", C, b"echo", b"secret-of-the-first")
    restarted = Shell(first_uuid=1000)
    for task in shell.scheduler.tasks.values():
        restarted.scheduler.restore(task, restarted.now)
    restarted.gateway.resume()

    restarted.receive(numbered, b"", C, b"echo", b"hello")
    sent = restarted.receive(WORKER, b"", W, READY, b"echo")
    while sent:
        address, body = request_sent_to_worker(sent)
        reply = restarted.receive(WORKER, b"", W, REPLY, address, b"", *body)
        sent = [(peer, frames) for peer, frames in reply if peer == WORKER]
        to_client = [frames for peer, frames in reply if peer == numbered]
        assert to_client in ([], [[b"", C, b"echo", b"hello"]]), to_client

    replied = [f for e in restarted.journalled for _, f in e.to_clients]
    assert len(replied) == 1, replied


def test_a_refused_client_request_is_answered_400_forbidden_on_its_service(
    shell: Shell,
) -> None:
    shell.gateway.refuse(CLIENT, [b"", C, b"echo\xff", b"body"], "limited rights")

    [(peer, frames)] = shell.turn()
    assert (peer, frames) == (
        CLIENT,
        [b"", C, b"echo\xff", b"400 forbidden: limited rights"],
    )
    assert mdp_name(CLIENT) not in shell.scheduler.recipients
    assert shell.scheduler.tasks == {}


def test_a_refused_worker_is_left_unanswered(shell: Shell) -> None:
    shell.gateway.refuse(WORKER, [b"", W, READY, b"echo"], "not a worker key")

    assert shell.turn() == []
    assert shell.scheduler.workers == {}


def test_a_flood_of_malformed_mdp_is_logged_once_a_second(
    shell: Shell, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ventilator.gateway"):
        for n in range(200):
            shell.receive(b"M%d" % n, b"", C, b"")  # a request without a body
            shell.receive(b"M%d" % n, b"", W, b"\x09")  # no such worker command
        shell.later(1.0)
        shell.receive(CLIENT, b"", C, b"")

    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert warnings[1].endswith("; 399 more not logged")


# --- requests for services no worker offers ----------------------------------------

EXPIRY_S = SETTINGS.unserved_expiry_s


def statuses(sent: Sent) -> list[tuple[bytes, bytes, bytes]]:
    """(peer, service, status frame) of each one-frame client reply in `sent`."""
    return [(peer, f[2], f[3]) for peer, f in sent if f[:2] == [b"", C]]


def test_an_expired_request_counts_as_failed_not_nowhere(shell: Shell) -> None:
    # Tester 26: expired requests were counted submitted and then nothing, so
    # submitted - (completed + failed + cancelled) showed them stuck for good.
    shell.receive(CLIENT, b"", C, b"nobody", b"1")
    shell.later(EXPIRY_S)

    [ended] = [task for effects in shell.journalled for task in effects.finished]
    assert ended.status is p.Status.NOT_FOUND
    assert shell.scheduler.status(shell.now)["totals"]["failed"] == 1
    [failure] = shell.scheduler.failed
    assert failure.function == "nobody"


def test_requests_for_a_service_nobody_offers_expire_with_a_400(
    shell: Shell, caplog: pytest.LogCaptureFixture
) -> None:
    shell.receive(CLIENT, b"", C, b"nobody", b"1")
    shell.later(EXPIRY_S / 2)
    shell.receive(OTHER, b"", C, b"nobody", b"2")  # queued half way through

    with caplog.at_level(logging.WARNING, logger="ventilator.gateway"):
        [(peer, service, status)] = statuses(shell.later(EXPIRY_S / 2))

    assert (peer, service) == (CLIENT, b"nobody")
    assert status.startswith(b"400 expired: no worker offered 'nobody' within 30s")
    assert [r.getMessage() for r in caplog.records] == [
        "expired 1 MDP requests that waited 30s for a worker of 1 services "
        "('nobody'); replied 400"
    ]
    assert not shell.gateway.owns(CLIENT)  # owed nothing more: forgotten
    [task] = shell.scheduler.tasks.values()
    assert task.session == mdp_name(OTHER)

    [(peer, _, _)] = statuses(shell.later(EXPIRY_S / 2))
    assert peer == OTHER
    assert shell.scheduler.tasks == {} and shell.scheduler.recipients == {}
    assert shell.scheduler.waiting_queues("mdp:") == []  # no queue left behind
    assert shell.journalled[-1].forgotten  # and the journal forgets them too


def test_a_backlog_outlives_its_busy_worker_and_titanic_requests_wait_on(
    shell: Shell,
) -> None:
    shell.receive(WORKER, b"", W, READY, b"echo")
    shell.receive(CLIENT, b"", C, b"echo", b"runs")
    shell.receive(CLIENT, b"", C, b"echo", b"waits")
    [(_, stored)] = shell.receive(OTHER, b"", C, b"titanic.request", b"echo", b"x")
    assert stored[3] == b"200"
    assert statuses(shell.later(EXPIRY_S * 2)) == []  # served, if busy: no expiry

    shell.scheduler.peer_unreachable(WORKER, shell.now)
    shell.turn()
    assert statuses(shell.later(1)) == []  # this sweep sees the service unserved
    assert statuses(shell.later(EXPIRY_S - 2)) == []  # its wait counts from there
    sent = statuses(shell.later(2))

    assert [(p_, s_, st[:12]) for p_, s_, st in sent] == [
        (CLIENT, b"echo", b"400 expired:")
    ] * 2
    [stored] = shell.scheduler.tasks.values()  # Titanic's request waits on
    assert stored.recipient == "mdp:titanic" and stored.state is State.QUEUED


def test_requests_for_services_nobody_offers_are_bounded_with_a_500() -> None:
    settings = MdpSettings(unserved_per_service=2, unserved_total=3)
    shell = Shell(settings=settings)
    for body in (b"1", b"2"):
        assert shell.receive(CLIENT, b"", C, b"a", body) == []

    [(_, service, status)] = statuses(shell.receive(CLIENT, b"", C, b"a", b"3"))
    assert service == b"a" and status.startswith(b"500 no worker offers 'a' and 2")
    assert b"--mdp-unserved-per-service" in status

    assert shell.receive(CLIENT, b"", C, b"b", b"1") == []
    [(_, _, status)] = statuses(shell.receive(CLIENT, b"", C, b"c", b"1"))
    assert status.startswith(b"500 ") and b"--mdp-unserved-total" in status

    shell.receive(WORKER, b"", W, READY, b"d")
    sent = shell.receive(CLIENT, b"", C, b"d", b"served")  # a worker offers d
    assert [peer for peer, _ in sent] == [WORKER]
    assert len(shell.scheduler.tasks) == 4

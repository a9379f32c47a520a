"""The address check every peer makes before it connects, the rule for
messages a socket's descriptor does not announce, and what a peer makes of
its failed handshakes."""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import zmq

from ventilator._wire import SILENT_FAILURES, HandshakeWatch, InputCheck, check_endpoint
from ventilator.errors import UsageError

DEADLINE_S = 10.0


@pytest.mark.parametrize(
    "address",
    ["tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://broker:1", "ipc:///tmp/v"],
)
def test_well_formed_addresses_pass(address: str) -> None:
    check_endpoint(address, "the broker address")


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("broker:5555", "no transport://"),
        ("tcp://", "no transport://"),
        ("http://broker:80", "unknown transport 'http'"),
        ("tcp://127.0.0.1", "HOST:PORT"),
        ("tcp://127.0.0.1:notaport", "HOST:PORT"),
        ("tcp://127.0.0.1:70000", "from 1 to 65535"),
        ("tcp://:5555", "HOST:PORT"),
    ],
)
def test_malformed_address_is_refused_naming_it_and_why(
    address: str, problem: str
) -> None:
    with pytest.raises(UsageError, match=problem) as refused:
        check_endpoint(address, "the broker address")

    assert repr(address) in str(refused.value)


@pytest.mark.parametrize(
    "address", ["tcp://127.0.0.1:*", "tcp://127.0.0.1:0", "tcp://*:5555"]
)
def test_an_address_to_bind_may_ask_for_any_free_port(address: str) -> None:
    check_endpoint(address, "the frontend endpoint", to_bind=True)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:*", "tcp://127.0.0.1:0"])
def test_an_address_to_connect_to_needs_a_port(address: str) -> None:
    with pytest.raises(UsageError, match="port from 1 to 65535"):
        check_endpoint(address, "the broker address")


def test_a_malformed_address_to_bind_is_refused_as_one() -> None:
    with pytest.raises(UsageError, match="not an address to bind") as refused:
        check_endpoint("foo://bar", "the frontend endpoint", to_bind=True)

    assert "unknown transport 'foo'" in str(refused.value)


def test_input_check_asks_on_a_new_socket_and_after_each_send_only() -> None:
    context = zmq.Context()
    ours, theirs = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        ours.bind("inproc://input-check")
        theirs.connect("inproc://input-check")
        theirs.send(b"waiting")
        ours.poll(5000)  # the message has arrived
        check = InputCheck(ours)

        assert check.unannounced()  # a new socket: asked, and it waits
        assert not check.unannounced()  # not asked again until a send
        ours.send(b"hello")
        check.sent()
        assert check.unannounced()  # asked again: still waiting
    finally:
        ours.close(linger=0)
        theirs.close(linger=0)
        context.term()


@dataclass(frozen=True, slots=True)
class CurveDealer:
    """A client's DEALER with CURVE keys, and its public key."""

    socket: zmq.Socket[bytes]
    public_key: bytes

    def watched(self, address: str) -> HandshakeWatch:
        """A client's watch over the socket, which then connects to `address`."""
        watch = HandshakeWatch(address, "client", self.public_key)
        watch.watch(self.socket)
        self.socket.connect(address)
        return watch


@pytest.fixture
def curve_dealer() -> Iterator[CurveDealer]:
    """A DEALER with CURVE keys for a broker key nobody holds, that gives each
    handshake 0.1 s (libzmq's default is 30 s)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    public_key, secret_key = zmq.curve_keypair()
    dealer.curve_serverkey, _ = zmq.curve_keypair()
    dealer.curve_publickey, dealer.curve_secretkey = public_key, secret_key
    dealer.setsockopt(zmq.HANDSHAKE_IVL, 100)
    try:
        yield CurveDealer(dealer, public_key)
    finally:
        # Every socket, the watch's monitor too, even if a test left it open.
        context.destroy(linger=0)


@pytest.fixture
def nobody_address() -> Iterator[str]:
    """A tcp address where connections are refused: its port is bound, so no
    one else takes it, and not listening."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"tcp://127.0.0.1:{bound.getsockname()[1]}"


@pytest.fixture
def greeters() -> Iterator[dict[str, str]]:
    """The addresses of two ROUTERs, by the mechanism they greet with."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    plain = context.socket(zmq.ROUTER)
    curve = context.socket(zmq.ROUTER)
    curve.curve_server = True
    _, curve.curve_secretkey = zmq.curve_keypair()
    try:
        yield {
            "NULL": f"tcp://127.0.0.1:{plain.bind_to_random_port('tcp://127.0.0.1')}",
            "CURVE": f"tcp://127.0.0.1:{curve.bind_to_random_port('tcp://127.0.0.1')}",
        }
    finally:
        context.destroy(linger=0)


def watch_until(watch: HandshakeWatch, seen: Callable[[], object], what: str) -> None:
    """Read the watch's events until `seen()` holds, under a deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while not seen():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert watch.monitor is not None
        if watch.monitor.poll(100):
            watch.read()


def test_handshakes_a_paused_broker_never_answers_are_not_blamed_on_its_key(
    curve_dealer: CurveDealer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ventilator._wire")
    # What a stopped broker's port does: the kernel accepts connections into
    # the backlog, and nobody answers the ZeroMQ greeting.
    with socket.create_server(("127.0.0.1", 0)) as stopped_broker:
        port = stopped_broker.getsockname()[1]
        watch = curve_dealer.watched(f"tcp://127.0.0.1:{port}")

        watch_until(
            watch,
            lambda: watch.problem or watch.timeouts > SILENT_FAILURES,
            "more timed-out handshakes than it takes to doubt a key",
        )
        watch.close()

    assert watch.problem is None
    assert not watch.definitive
    said = [r for r in caplog.records if r.name == "ventilator._wire"]
    assert [r.levelname for r in said] == ["INFO"]  # once a run of them
    assert "did not finish within 0.1s" in said[0].getMessage()


def test_a_broker_that_cannot_read_the_curve_hello_still_has_its_key_doubted(
    curve_dealer: CurveDealer,
) -> None:
    # A CURVE server closes a connection whose HELLO it cannot decrypt.
    server = curve_dealer.socket.context.socket(zmq.ROUTER)
    server.curve_server = True
    _, server.curve_secretkey = zmq.curve_keypair()
    try:
        port = server.bind_to_random_port("tcp://127.0.0.1")
        watch = curve_dealer.watched(f"tcp://127.0.0.1:{port}")

        watch_until(watch, lambda: watch.problem, "a problem named")
        watch.close()
    finally:
        server.close(linger=0)

    assert "is --broker-key (broker_key) the public key" in (watch.problem or "")
    assert watch.timeouts == 0


def test_a_problem_the_broker_named_outlasts_handshakes_that_end_without_detail(
    nobody_address: str,
) -> None:
    watch = HandshakeWatch(nobody_address, "worker", zmq.curve_keypair()[0])

    watch.note(
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
    )
    for _ in range(SILENT_FAILURES + 2):
        watch.note(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.ECONNRESET)

    assert "does not use CURVE" in (watch.problem or "")
    assert watch.failures == SILENT_FAILURES + 3  # every one counts
    assert watch.definitive


def test_failures_of_every_kind_count_and_a_success_starts_again(
    nobody_address: str,
) -> None:
    watch = HandshakeWatch(nobody_address, "worker", zmq.curve_keypair()[0])
    for _ in range(SILENT_FAILURES):
        watch.note(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.ECONNRESET)
    assert watch.failures == SILENT_FAILURES
    assert "is --broker-key" in (watch.problem or "")

    watch.note(zmq.EVENT_HANDSHAKE_SUCCEEDED, 0)
    watch.note(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.ECONNRESET)

    assert watch.failures == 1
    assert watch.problem is None  # one failure without detail is no evidence


def test_a_keyless_peer_whose_broker_cannot_be_asked_guesses_it_wants_curve(
    nobody_address: str,
) -> None:
    # libzmq, racing a CURVE broker's close, may report a keyless peer's
    # mismatch as EPIPE, every time in a run: that alone must diagnose it.
    watch = HandshakeWatch(nobody_address, "client", None)

    for _ in range(SILENT_FAILURES):
        watch.note(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EPIPE)

    assert "wants CURVE and this client has no key" in (watch.problem or "")
    assert watch.definitive


def test_a_missing_key_guessed_then_named_by_the_broker_is_said_once(
    caplog: pytest.LogCaptureFixture, nobody_address: str
) -> None:
    caplog.set_level(logging.ERROR, logger="ventilator._wire")
    watch = HandshakeWatch(nobody_address, "client", None)
    for _ in range(SILENT_FAILURES):
        watch.note(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EPIPE)
    watch.read()

    watch.note(
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
    )
    watch.read()

    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1
    assert "wants CURVE and this client has no key" in said[0]
    assert watch.problem is not None and watch.problem.startswith(
        f"the broker at {nobody_address} wants CURVE"
    )  # the named cause, kept for the tasks that fail on it


@pytest.mark.parametrize(
    ("keyed", "mechanism", "says"),
    [
        (False, "CURVE", "wants CURVE and this client has no key: give"),
        (True, "NULL", "does not use CURVE, but this client has keys"),
        (True, "CURVE", "is --broker-key (broker_key) the public key"),
    ],
)
def test_handshakes_closed_without_detail_are_explained_by_the_brokers_greeting(
    greeters: dict[str, str], keyed: bool, mechanism: str, says: str
) -> None:
    # What libzmq reports when a broker closes first, whatever the cause.
    public_key = zmq.curve_keypair()[0] if keyed else None
    watch = HandshakeWatch(greeters[mechanism], "client", public_key)

    for _ in range(SILENT_FAILURES):
        watch.note(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EPIPE)

    assert says in (watch.problem or "")
    assert watch.definitive


def test_a_keyless_peer_at_a_plain_broker_that_closes_it_guesses_nothing(
    greeters: dict[str, str],
) -> None:
    watch = HandshakeWatch(greeters["NULL"], "client", None)

    for _ in range(SILENT_FAILURES + 1):
        watch.note(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, errno.EPIPE)

    assert watch.problem is None  # no key is missing there
    assert not watch.definitive


@pytest.mark.parametrize("keyed", [False, True])
def test_a_mismatch_the_brokers_greeting_confirms_is_past_doubt_at_once(
    greeters: dict[str, str], nobody_address: str, keyed: bool
) -> None:
    # libzmq does not retry after a mismatch: waiting for three failures
    # made a client's tasks fail seconds after the diagnosis was said.
    public_key = zmq.curve_keypair()[0] if keyed else None
    other_side = greeters["NULL" if keyed else "CURVE"]
    confirmed = HandshakeWatch(other_side, "client", public_key)
    unconfirmed = HandshakeWatch(nobody_address, "client", public_key)

    for watch in (confirmed, unconfirmed):
        watch.note(
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
            zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH,
        )

    assert confirmed.definitive
    assert unconfirmed.problem == confirmed.problem.replace(other_side, nobody_address)
    assert not unconfirmed.definitive  # one failure, and nothing to confirm it

"""The dashboard's HTTP server as an attack surface and a probe sees it."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator

import pytest

from ventilator import dashboard
from ventilator.dashboard import DashboardServer
from ventilator.telemetry import Telemetry

WAIT_S = 10.0


@pytest.fixture
def server() -> Iterator[DashboardServer]:
    served = DashboardServer(("127.0.0.1", 0), Telemetry())
    served.start()
    yield served
    served.stop()


def connection(server: DashboardServer) -> http.client.HTTPConnection:
    host, port = server.endpoint.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=WAIT_S)


def test_a_head_request_is_answered_as_a_get_without_a_body(
    server: DashboardServer,
) -> None:
    # Tester 26: uptime checkers that probe with HEAD got 501.
    probe = connection(server)
    probe.request("HEAD", "/health")
    answer = probe.getresponse()

    assert answer.status == 503  # no snapshot yet: "stalled", as a GET says
    assert int(answer.getheader("Content-Length") or 0) > 0
    assert answer.read() == b""


def test_the_server_header_does_not_name_the_python_version(
    server: DashboardServer,
) -> None:
    probe = connection(server)
    probe.request("GET", "/health")
    answer = probe.getresponse()
    answer.read()

    assert "Python" not in (answer.getheader("Server") or "")


def test_a_client_that_never_finishes_its_request_is_hung_up_on(
    server: DashboardServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tester 26: a slow client that sent "GET /metr" and stopped held a thread
    # for as long as it stayed connected; hundreds of them, hundreds.
    monkeypatch.setattr(dashboard, "REQUEST_TIMEOUT_S", 0.5)
    host, port = server.endpoint.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as slow:
        slow.sendall(b"GET /metr")

        assert slow.recv(1024) == b""  # closed by the server, long before WAIT_S

"""The broker's HTTP face: a live dashboard, JSON, /metrics and /health.

Served from one thread in the broker process (the stdlib's
`ThreadingHTTPServer`: a few operators and a scraper, not the public). Every
request reads the latest `telemetry.Snapshot`, an immutable value the broker's
loop swaps in a few times a second, so a slow or hostile HTTP client can never
touch the scheduler or hold up a loop turn.

Routes::

    GET /                 the dashboard (static files shipped in the package)
    GET /api/status       the same JSON as `ventilator status --json`
    GET /api/history      per-second samples of the last minutes, for the charts
    GET /api/failed       the latest failed tasks with their reasons
    GET /metrics          Prometheus text format
    GET /health           200 while the broker's loop publishes, 503 if it stalled
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .errors import UsageError
from .telemetry import Snapshot, Telemetry, metrics_registry

__all__ = ["DashboardServer", "parse_http_address"]

log = logging.getLogger(__name__)

# /health says the broker stalled when its last snapshot is older than this.
STALE_AFTER_S = 10.0
# A connection that has not sent a whole request by then is closed.
REQUEST_TIMEOUT_S = 10.0
# The page and its assets: a fixed list, so no request path ever reaches a file.
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}


def parse_http_address(text: str, allow_remote: bool) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); refuse a non-loopback host unless allowed.

    Raises:
        UsageError: malformed, or not loopback and `allow_remote` is false.
    """
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"--http expects HOST:PORT, e.g. 127.0.0.1:8080; got {text!r}")
    if not allow_remote and not _is_loopback(host):
        raise UsageError(
            f"--http {text}: the dashboard has no authentication, so it listens on "
            "loopback only; pass --http-allow-remote to serve it on another address"
        )
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DashboardServer:
    """Serves the telemetry of one broker over HTTP from a daemon thread."""

    def __init__(self, address: tuple[str, int], telemetry: Telemetry) -> None:
        """
        Raises:
            UsageError: the address cannot be bound; the message names it.
        """
        self._telemetry = telemetry
        self._registry = metrics_registry(lambda: telemetry.latest)
        handler = type("Handler", (_Handler,), {"dashboard": self})
        try:
            self._server = _Server(address, handler)
        except OSError as exc:
            host, port = address
            raise UsageError(
                f"--http cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="ventilator-http", daemon=True
        )

    @property
    def endpoint(self) -> str:
        """The URL the server listens on (the real port when 0 was asked)."""
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    def start(self) -> None:
        self._thread.start()
        log.info("dashboard listening on %s", self.endpoint)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)

    def snapshot(self) -> Snapshot | None:
        return self._telemetry.latest

    def metrics(self) -> bytes:
        return generate_latest(self._registry)


class _Server(ThreadingHTTPServer):
    # Connections waiting to be accepted: socketserver's 5 dropped probes in a
    # burst of a few hundred (tester 26), as the task sockets do not.
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A caller that hung up before its answer (a health check that gave
        up) is routine: one DEBUG line, not socketserver's traceback on
        stderr for each."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            log.debug("http %s hung up: %s", client_address[0], error)
            return
        log.warning("http request from %s failed", client_address[0], exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    dashboard: DashboardServer
    server_version = "ventilator"
    sys_version = ""  # the Python version is nobody's business
    _head = False

    def setup(self) -> None:
        super().setup()
        # A client that never finishes its request is hung up on after this
        # long, not left holding a thread for as long as it stays connected.
        self.connection.settimeout(REQUEST_TIMEOUT_S)

    def do_HEAD(self) -> None:
        """As GET, without the body: what some uptime checkers send."""
        self._head = True
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in _STATIC:
            self._static(*_STATIC[path])
        elif path == "/metrics":
            self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, self.dashboard.metrics())
        elif path == "/health":
            self._health()
        elif path.startswith("/api/"):
            self._api(path.removeprefix("/api/"))
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

    def _api(self, name: str) -> None:
        snapshot = self.dashboard.snapshot()
        if snapshot is None:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "starting up"})
        elif name == "status":
            self._json(HTTPStatus.OK, snapshot.status)
        elif name == "history":
            self._json(HTTPStatus.OK, {"samples": list(snapshot.history)})
        elif name == "failed":
            self._json(HTTPStatus.OK, {"failed": list(snapshot.failed)})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such API: {name}"})

    def _health(self) -> None:
        snapshot = self.dashboard.snapshot()
        age_s = None if snapshot is None else time.monotonic() - snapshot.taken_at
        healthy = age_s is not None and age_s < STALE_AFTER_S
        # Alive, but refusing every new task (its journal's disk nearly full):
        # 200 still, since restarting it would not help, but not "ok", which
        # an alert on the status would miss.
        not_accepting = (
            None if snapshot is None else snapshot.status.get("not_accepting")
        )
        state = "not_accepting" if not_accepting else "ok"
        self._json(
            HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE,
            {
                "status": state if healthy else "stalled",
                "snapshot_age_s": None if age_s is None else round(age_s, 3),
                "not_accepting": not_accepting,
            },
        )

    def _static(self, name: str, content_type: str) -> None:
        body = resources.files("ventilator").joinpath("static", name).read_bytes()
        self._send(HTTPStatus.OK, content_type, body)

    def _json(self, status: HTTPStatus, data: Any) -> None:
        body = json.dumps(data).encode()
        self._send(status, "application/json", body)

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not self._head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # One DEBUG line per request: a dashboard polls every second.
        log.debug("http %s %s", self.address_string(), format % args)

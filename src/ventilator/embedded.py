"""An embedded cluster: a broker and local workers, started and stopped for you.

`local()` is what `ventilator map` uses when no broker is named. The broker and
the worker are real child processes talking over loopback TCP on ports the
broker picks itself, exactly as a deployed cluster would; nothing is
short-circuited, so what works here works across machines.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from . import _lifeline as lifeline
from ._words import how_it_ended
from .client import Client
from .errors import UsageError, VentilatorError
from .policy import check_at_least
from .registry import load_functions
from .security import generate_keys

__all__ = ["LocalCluster", "local"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class LocalCluster:
    """A broker process and one worker process with `workers` task processes.

    Attributes:
        address: the broker's frontend, for `Client(address)`.
        backend: the broker's backend, for more workers.
        client_keys: with ``curve=True``, the key files a client passes:
            ``Client(cluster.address, **cluster.client_keys)``; else empty.
    """

    def __init__(
        self,
        workers: int | None = None,
        modules: Sequence[str] = (),
        *,
        pool: str = "process",
        prefetch: int | None = None,
        allow_pickle: bool = False,
        journal: str | None = None,
        log_level: str = "WARNING",
        log_format: str = "text",
        curve: bool = False,
    ) -> None:
        if not modules:
            raise UsageError(
                "local() needs at least one module for its workers to serve"
            )
        if workers is not None:
            check_at_least("workers", workers, 1)
        if prefetch is not None:
            check_at_least("prefetch", prefetch, 1)
        self.workers = workers or os.cpu_count() or 1
        self.modules = list(modules)
        self._pool = pool
        self._prefetch = prefetch
        self._allow_pickle = allow_pickle
        self._journal = journal
        self._log_level = log_level
        self._log_format = log_format
        self._processes: list[subprocess.Popen[bytes]] = []
        self._curve = curve
        self._keys_dir: Path | None = None
        self.client_keys: dict[str, str] = {}
        self.address = ""
        self.backend = ""

    def start(self) -> LocalCluster:
        """Start the broker, then the worker; return once the worker is serving.

        Raises:
            UsageError: a module does not import; the message says why.
            VentilatorError: a process did not start within its deadline; the
                ones already started are stopped again.
        """
        try:
            if self._curve:
                self._make_keys()
            self._start_broker()
            self._start_worker()
            self._wait_for_capacity(time.monotonic() + START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def _make_keys(self) -> None:
        """A key pair each for the broker, the worker and clients, allowed in
        a private folder that `stop()` removes."""
        self._keys_dir = Path(tempfile.mkdtemp(prefix="ventilator-keys-"))
        for name in ("broker", "worker", "client"):
            generate_keys(name, self._keys_dir / name)
        for role in ("client", "worker"):
            allowed = self._keys_dir / f"{role}s"
            allowed.mkdir()
            shutil.copy(self._keys_dir / role / f"{role}.key", allowed)
        self.client_keys = self._peer_keys("client")

    def _peer_keys(self, name: str) -> dict[str, str]:
        assert self._keys_dir is not None
        return {
            "secret_key": str(self._keys_dir / name / f"{name}.key_secret"),
            "broker_key": str(self._keys_dir / "broker" / "broker.key"),
        }

    def _broker_curve_options(self) -> list[str]:
        if self._keys_dir is None:
            return []
        return [
            "--secret-key",
            str(self._keys_dir / "broker" / "broker.key_secret"),
            "--clients",
            str(self._keys_dir / "clients"),
            "--workers",
            str(self._keys_dir / "workers"),
        ]

    def _worker_curve_options(self) -> list[str]:
        if self._keys_dir is None:
            return []
        keys = self._peer_keys("worker")
        return ["--secret-key", keys["secret_key"], "--broker-key", keys["broker_key"]]

    def _command(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "ventilator",
            "--log-level",
            self._log_level,
            "--log-format",
            self._log_format,
            *args,
        ]

    def _env(self, stop_signal: str) -> dict[str, str]:
        # Children import the same modules the parent can, wherever they live.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        # ... and stop as stop() would stop them if we die without calling it.
        env[lifeline.ENV] = f"{os.getpid()}:{stop_signal}"
        return env

    def _start_broker(self) -> None:
        durability = (
            ["--journal", self._journal]
            if self._journal
            else ["--durability", "memory"]
        )
        broker = subprocess.Popen(
            self._command(
                "broker",
                "--frontend",
                "tcp://127.0.0.1:*",
                "--backend",
                "tcp://127.0.0.1:*",
                *durability,
                *self._broker_curve_options(),
                "--announce",
            ),
            stdout=subprocess.PIPE,
            env=self._env("TERM"),
            # Their own process group: Ctrl-C in a terminal reaches only us, and
            # we stop them in order (see stop()).
            process_group=0,
        )
        self._processes.append(broker)
        assert broker.stdout is not None
        # The broker prints one JSON line once it is bound (or exits on failure).
        line = broker.stdout.readline()
        if not line:
            raise VentilatorError(f"the embedded broker exited with {broker.wait()}")
        endpoints = json.loads(line)
        self.address = endpoints["frontend"]
        self.backend = endpoints["backend"]

    def _start_worker(self) -> None:
        prefetch = "auto" if self._prefetch is None else str(self._prefetch)
        options = ["--pool", self._pool, "--prefetch", prefetch]
        if self._allow_pickle:
            options.append("--allow-pickle")
        options += self._worker_curve_options()
        worker = subprocess.Popen(
            self._command(
                "worker",
                *self.modules,
                "--connect",
                self.backend,
                "--concurrency",
                str(self.workers),
                *options,
            ),
            env=self._env("QUIT"),
            process_group=0,
        )
        self._processes.append(worker)

    def _wait_for_capacity(self, deadline: float) -> None:
        keys = self.client_keys
        with Client(
            self.address,
            secret_key=keys.get("secret_key"),
            broker_key=keys.get("broker_key"),
        ) as client:
            while time.monotonic() < deadline:
                for process in self._processes:
                    if process.poll() is not None:
                        raise self._exited_early(process)
                status = client.status(timeout_s=max(0.1, deadline - time.monotonic()))
                if status["workers"]:
                    return
                # The worker registers within a moment of its children starting;
                # asking again is cheap and this happens once per cluster.
                time.sleep(0.05)
        raise VentilatorError(f"no worker registered within {START_TIMEOUT_S:g}s")

    def _exited_early(self, process: subprocess.Popen[bytes]) -> VentilatorError:
        """The error for a process that exited before the cluster was ready."""
        message = (
            f"an embedded process pid={process.pid} exited with "
            f"{process.returncode} before the cluster was ready"
        )
        if process is self._processes[-1] and process.returncode == 2:
            # The worker's usage error, most likely a module that does not
            # import: it told only its stderr. Importing them here, on this
            # failure alone, puts the cause in the exception too.
            try:
                load_functions(self.modules)
            except UsageError as exc:
                return UsageError(f"{message}: {exc}")
        return VentilatorError(message)

    @property
    def pids(self) -> dict[str, int]:
        """The process ids of the broker and the worker, by those names."""
        names = ("broker", "worker")
        return {n: p.pid for n, p in zip(names, self._processes, strict=False)}

    def exited(self) -> str | None:
        """ "broker" or "worker" if that process has exited, else None."""
        for name, process in zip(("broker", "worker"), self._processes, strict=False):
            if process.poll() is not None:
                ended = how_it_ended(process.returncode)
                return f"{name} (pid {process.pid}, {ended})"
        return None

    def stop(self) -> None:
        """Stop the worker, then the broker: terminate, and kill after a deadline.

        Tasks still running are abandoned: the worker gets SIGQUIT, "leave
        now", rather than SIGTERM, "finish what you hold".
        """
        for process in reversed(self._processes):
            if process.poll() is None and process is not self._processes[0]:
                process.send_signal(signal.SIGQUIT)  # a worker: leave now
            elif process.poll() is None:
                process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning(
                    "embedded process pid=%d ignored SIGTERM; killing it", process.pid
                )
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        self._processes.clear()
        if self._keys_dir is not None:
            shutil.rmtree(self._keys_dir, ignore_errors=True)
            self._keys_dir = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def local(
    workers: int | None = None, modules: Sequence[str] = (), **options: object
) -> LocalCluster:
    """A broker and local workers, started as a `with` block opens and stopped
    as it closes: ``with local(...) as cluster``.

    The cluster is its own context manager, so one entered by hand
    (``cluster = local(...).__enter__()``) runs for as long as the caller
    wants it, until ``cluster.stop()`` or the program's end (its processes
    stop with the program), however its references come and go.

    Args:
        workers: task processes (default: the number of CPUs).
        modules: modules whose public functions the workers serve.
        options: `pool`, `prefetch`, `allow_pickle`, `journal`, `log_level`,
            `log_format`, `curve`, as for `LocalCluster`.

    Returns:
        The cluster, not started yet; entering it starts it and returns it.
        Its `address` is the broker's frontend, on a port of its own: clients
        connect with ``Client(cluster.address)`` (a `Client` given no address
        looks for a broker at tcp://127.0.0.1:5555, not here).

    Raises:
        UsageError: no modules (here); a module that does not import (on
            entering).
    """
    return LocalCluster(workers, modules, **options)  # type: ignore[arg-type]

"""The systems of the side-by-side benchmark, and its four workloads, written once.

Each ``*_system(sizes)`` factory returns the workloads of ``benchmarks.compare``
for one system, keyed A (tiny tasks), B (sequential), C (cpu) and D (bytes), or
raises ``Unavailable`` saying what to install when a peer's package (or, for
Celery, the ``redis-server`` program) is missing.

Every system but the naive broker is driven through a small session with three
calls, so the workloads and their figures exist once for all of them:

    map          submit all, gather in order: the system's own bulk path (A, C)
    call         one round trip (B)
    submit_each  one submission per argument, then gather in order (D); for
                 the peers, whose ``map`` does just that, it is ``map``

Every workload call starts its own cluster with ``sizes.workers`` worker
processes on 127.0.0.1, pushes a few tiny tasks through it, times only the
workload, and stops the cluster before it returns:

    ventilator   ventilator.local() with a journal in a temporary folder, or
                 none (in memory), and a Client
    processpool  concurrent.futures.ProcessPoolExecutor
    dask         LocalCluster(processes=True, one thread per worker) + Client
    celery       redis-server and a prefork celery worker, both started here
                 as subprocesses and ended by PID
    ipyparallel  ipp.Cluster(n=workers) with a load-balanced view
    ray          ray.init(num_cpus=workers), one remote function per workload

Leaving the cluster's context (or ``ray.shutdown()``) is what ends the processes
of every system but Celery. The naive broker measures A, B and D with its own
client (see ``benchmarks.naive_broker``); ``naive_system`` only names them.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import naive_broker, workloads

__all__ = [
    "Result",
    "Sizes",
    "Unavailable",
    "Workloads",
    "celery_system",
    "dask_system",
    "ipyparallel_system",
    "naive_system",
    "process_pool_system",
    "ray_system",
    "ventilator_system",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
WARMUP_TASKS = 100  # As the naive broker: connections and workers exist before timing.
STARTUP_TIMEOUT_S = 60.0
READY_POLL_S = 0.1
RESULT_TIMEOUT_S = 600.0  # A lost task fails the run instead of hanging it.
STOP_GRACE_S = 10.0
INSTALL_HINT = "pip install '.[bench]'"
REPO_ROOT = Path(__file__).resolve().parent.parent
WORKLOADS_MODULE = "benchmarks.workloads"

Result = dict[str, float]
Workloads = dict[str, Callable[[], Result]]


class Unavailable(Exception):
    """A peer cannot run on this machine; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class Sizes:
    """How big each workload is; compare.py holds the full sizes, FULL_SIZES."""

    workers: int
    tiny_tasks: int
    sequential_tasks: int
    cpu_tasks: int
    cpu_task_s: float
    bytes_tasks: int
    bytes_size: int

    def scaled(self, factor: float) -> Sizes:
        """Return these sizes with every task count times ``factor``, at least 1."""
        return replace(
            self,
            tiny_tasks=_scale(self.tiny_tasks, factor),
            sequential_tasks=_scale(self.sequential_tasks, factor),
            cpu_tasks=_scale(self.cpu_tasks, factor),
            bytes_tasks=_scale(self.bytes_tasks, factor),
        )


def _scale(count: int, factor: float) -> int:
    return max(1, round(count * factor))


class _Session(ABC):
    """One running cluster, driven by workload name (a function of `workloads`)."""

    @abstractmethod
    def map(self, workload: str, args: Sequence[Any]) -> list[Any]:
        """Run the workload on every argument; return the results in order."""

    @abstractmethod
    def call(self, workload: str, arg: Any) -> Any:
        """Run the workload once and wait for its result."""

    def submit_each(self, workload: str, args: Sequence[Any]) -> list[Any]:
        """Submit one task per argument, then gather the results in order."""
        return self.map(workload, args)

    def map_each(self, workload: str, args: Sequence[Any]) -> list[Any]:
        """`map` with one task per argument, where `map` would batch them."""
        return self.map(workload, args)


Opener = Callable[[int], AbstractContextManager[_Session]]


# --- the four workloads, written once ---------------------------------------------


def _tiny(session: _Session, sizes: Sizes, each: bool = False) -> Result:
    run = session.map_each if each else session.map
    started = time.perf_counter()
    results = run("square", range(sizes.tiny_tasks))
    elapsed = time.perf_counter() - started
    workloads.check_squares(list(results))
    return {"tasks_per_s": sizes.tiny_tasks / elapsed}


def _sequential(session: _Session, sizes: Sizes) -> Result:
    times = []
    for i in range(sizes.sequential_tasks):
        started = time.perf_counter()
        result = session.call("square", i)
        times.append(time.perf_counter() - started)
        if result != i * i:
            raise RuntimeError(f"square({i}) returned {result!r}")
    return _latency(times)


def _cpu(session: _Session, sizes: Sizes) -> Result:
    started = time.perf_counter()
    session.map("spin", [sizes.cpu_task_s] * sizes.cpu_tasks)
    elapsed = time.perf_counter() - started
    ideal_s = sizes.cpu_tasks * sizes.cpu_task_s / sizes.workers
    return {"efficiency_pct": 100 * ideal_s / elapsed, "wall_s": elapsed}


def _large(session: _Session, sizes: Sizes) -> Result:
    blob = os.urandom(sizes.bytes_size)
    started = time.perf_counter()
    lengths = session.submit_each("length", [blob] * sizes.bytes_tasks)
    elapsed = time.perf_counter() - started
    if set(lengths) != {sizes.bytes_size}:
        raise RuntimeError(f"a payload arrived damaged: lengths {set(lengths)}")
    return {
        "tasks_per_s": sizes.bytes_tasks / elapsed,
        "mb_per_s": sizes.bytes_tasks * sizes.bytes_size / elapsed / 1e6,
    }


def _latency(times_s: list[float]) -> Result:
    ordered = sorted(times_s)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p99_us": ordered[int(len(ordered) * 0.99)] * 1e6,
    }


def _warm_run(
    open_session: Opener,
    workload: Callable[[_Session, Sizes], Result],
    sizes: Sizes,
    warmup_tasks: int,
) -> Result:
    with open_session(sizes.workers) as session:
        session.map("square", range(warmup_tasks))
        return workload(session, sizes)


def _workloads(
    open_session: Opener,
    sizes: Sizes,
    warmup_tasks: int = WARMUP_TASKS,
    batching_map: bool = False,
) -> Workloads:
    """The workloads of one system. A1 (one task per item) only for a system
    whose `map` batches items, where it differs from A."""
    by_key = {"A": _tiny, "B": _sequential, "C": _cpu, "D": _large}
    if batching_map:
        by_key["A1"] = partial(_tiny, each=True)
    return {
        key: partial(_warm_run, open_session, workload, sizes, warmup_tasks)
        for key, workload in by_key.items()
    }


def _require(*modules: str) -> None:
    """Import each module now, so a missing one is reported before any run."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise Unavailable(f"{module} is not installed ({INSTALL_HINT})") from exc


# --- ventilator -------------------------------------------------------------------


class _VentilatorSession(_Session):
    def __init__(self, client: Any) -> None:
        self._client = client

    def map(self, workload: str, args: Sequence[Any]) -> list[Any]:
        # Client.map batches its submissions and takes no timeout.
        return list(self._client.map(f"{WORKLOADS_MODULE}:{workload}", args))

    def call(self, workload: str, arg: Any) -> Any:
        future = self._client.submit(f"{WORKLOADS_MODULE}:{workload}", arg)
        return future.result(timeout=RESULT_TIMEOUT_S)

    def map_each(self, workload: str, args: Sequence[Any]) -> list[Any]:
        name = f"{WORKLOADS_MODULE}:{workload}"
        return list(self._client.map(name, args, chunksize=1))

    def submit_each(self, workload: str, args: Sequence[Any]) -> list[Any]:
        # As D has always run here: the client's thread sends the first payloads
        # while later ones are encoded; map encodes up to 2,048 before sending any.
        name = f"{WORKLOADS_MODULE}:{workload}"
        futures = [self._client.submit(name, arg) for arg in args]
        return [future.result(timeout=RESULT_TIMEOUT_S) for future in futures]


@contextmanager
def _ventilator_session(journal: bool, workers: int) -> Iterator[_Session]:
    import ventilator

    with tempfile.TemporaryDirectory(prefix="bench-ventilator-") as folder:
        path = str(Path(folder) / "journal.db") if journal else None
        with (
            ventilator.local(workers, [WORKLOADS_MODULE], journal=path) as cluster,
            ventilator.Client(cluster.address) as client,
        ):
            yield _VentilatorSession(client)


def ventilator_system(sizes: Sizes, *, journal: bool) -> Workloads:
    """Return ventilator's workloads, its journal in a file or (False) in memory."""
    # One warm-up task, as ventilator's figures have always been measured.
    return _workloads(
        partial(_ventilator_session, journal), sizes, warmup_tasks=1, batching_map=True
    )


# --- concurrent.futures.ProcessPoolExecutor ---------------------------------------


class _ProcessPoolSession(_Session):
    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self._pool = pool

    def map(self, workload: str, args: Sequence[Any]) -> list[Any]:
        function = getattr(workloads, workload)
        pending = self._pool.map(function, args, timeout=RESULT_TIMEOUT_S)
        return list(pending)

    def call(self, workload: str, arg: Any) -> Any:
        future = self._pool.submit(getattr(workloads, workload), arg)
        return future.result(timeout=RESULT_TIMEOUT_S)

    def submit_each(self, workload: str, args: Sequence[Any]) -> list[Any]:
        # map wraps each argument in a one-item chunk; D sends the payloads bare.
        function = getattr(workloads, workload)
        futures = [self._pool.submit(function, arg) for arg in args]
        return [future.result(timeout=RESULT_TIMEOUT_S) for future in futures]


@contextmanager
def _process_pool_session(workers: int) -> Iterator[_Session]:
    with ProcessPoolExecutor(workers) as pool:
        yield _ProcessPoolSession(pool)


def process_pool_system(sizes: Sizes) -> Workloads:
    """Return ProcessPoolExecutor's workloads, the no-network reference."""
    # One warm-up task, as the pool's figures have always been measured.
    return _workloads(_process_pool_session, sizes, warmup_tasks=1)


# --- the naive pyzmq broker -------------------------------------------------------


def naive_system(sizes: Sizes) -> Workloads:
    """Return the naive broker's A, B and D, which it measures with its own client.

    It has no C: its workers run only ``square`` and ``length``.
    """

    def tiny() -> Result:
        figures = naive_broker.throughput_tiny(sizes.tiny_tasks, sizes.workers)
        return {"tasks_per_s": figures["tasks_per_s"]}

    sequential = partial(
        naive_broker.latency_sequential, sizes.sequential_tasks, sizes.workers
    )
    large = partial(
        naive_broker.bytes_throughput,
        sizes.bytes_tasks,
        sizes.bytes_size,
        sizes.workers,
    )
    return {"A": tiny, "B": sequential, "D": large}


# --- dask.distributed -------------------------------------------------------------


class _DaskSession(_Session):
    def __init__(self, client: Any) -> None:
        self._client = client

    def map(self, workload: str, args: Sequence[Any]) -> list[Any]:
        from distributed import wait

        # pure=False: identical arguments (all of C and D) must stay separate tasks.
        futures = self._client.map(getattr(workloads, workload), args, pure=False)
        wait(futures, timeout=RESULT_TIMEOUT_S)
        return list(self._client.gather(futures))

    def call(self, workload: str, arg: Any) -> Any:
        future = self._client.submit(getattr(workloads, workload), arg, pure=False)
        return future.result(timeout=RESULT_TIMEOUT_S)


@contextmanager
def _dask_session(workers: int) -> Iterator[_Session]:
    from distributed import Client, LocalCluster

    # distributed sets its loggers to INFO when imported: a line per start and stop.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host=HOST,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield _DaskSession(client)


def dask_system(sizes: Sizes) -> Workloads:
    """Return dask.distributed's workloads; raise Unavailable if not installed."""
    _require("dask", "distributed")
    return _workloads(_dask_session, sizes)


# --- Celery on Redis --------------------------------------------------------------


class _CelerySession(_Session):
    def __init__(self, app: Any) -> None:
        self._app = app

    def map(self, workload: str, args: Sequence[Any]) -> list[Any]:
        from celery import group

        name = _celery_task_name(workload)
        batch = group(self._app.signature(name, (arg,)) for arg in args)
        return list(batch.apply_async().get(timeout=RESULT_TIMEOUT_S))

    def call(self, workload: str, arg: Any) -> Any:
        pending = self._app.send_task(_celery_task_name(workload), (arg,))
        return pending.get(timeout=RESULT_TIMEOUT_S)


def _celery_task_name(workload: str) -> str:
    from benchmarks import celery_app

    return celery_app.task_name(workload)


def _free_port() -> int:
    # Another process may take the port before redis binds it; redis then exits
    # and the run fails with the end of its log, which names the port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _spawn(label: str, command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group, its output going to a file."""
    with log_path.open("wb") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
    log.info("started %s pid=%d", label, process.pid)
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate by PID; after STOP_GRACE_S, kill its whole process group."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        log.warning("pid=%d ignored SIGTERM; killing its group", process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log.info("stopped pid=%d with code %d", process.pid, process.returncode)


def _await_ready(
    process: subprocess.Popen[bytes],
    log_path: Path,
    is_ready: Callable[[float], bool],
) -> None:
    """Call ``is_ready(wait_s)`` until it says yes, the process dies or time is up."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not is_ready(READY_POLL_S):
        if process.poll() is not None:
            raise RuntimeError(
                f"pid={process.pid} exited with code {process.returncode} before"
                f" it was ready; its log ends: {_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"pid={process.pid} not ready after {STARTUP_TIMEOUT_S} s;"
                f" stopping it. Its log ends: {_tail(log_path)}"
            )


def _tail(log_path: Path, lines: int = 5) -> str:
    return " | ".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def _redis_answers(port: int, wait_s: float) -> bool:
    import redis

    with redis.Redis(host=HOST, port=port, socket_connect_timeout=wait_s) as conn:
        try:
            return bool(conn.ping())
        except redis.ConnectionError:
            return False


def _redis_is_ready(
    port: int, process: subprocess.Popen[bytes]
) -> Callable[[float], bool]:
    def is_ready(wait_s: float) -> bool:
        if _redis_answers(port, wait_s):
            return True
        # Refused at once while it starts: pace the retries on its possible exit.
        with suppress(subprocess.TimeoutExpired):
            process.wait(wait_s)
        return False

    return is_ready


@contextmanager
def _redis_server(program: str, folder: Path) -> Iterator[str]:
    """Run a throwaway redis-server on a free loopback port; yield its URL."""
    port = _free_port()
    command = [program, "--bind", HOST, "--port", str(port)]
    command += ["--save", "", "--appendonly", "no", "--dir", str(folder)]
    log_path = folder / "redis.log"
    process = _spawn("redis-server", command, log_path)
    try:
        _await_ready(process, log_path, _redis_is_ready(port, process))
        yield f"redis://{HOST}:{port}/0"
    finally:
        _stop(process)


def _celery_worker_ready(app: Any) -> Callable[[float], bool]:
    from celery.exceptions import TimeoutError as ResultTimeout

    # Queued before the worker is up; its result is the sign the worker consumes.
    probe = app.send_task(_celery_task_name("square"), (3,))

    def is_ready(wait_s: float) -> bool:
        try:
            return bool(probe.get(timeout=wait_s) == 9)
        except ResultTimeout:
            return False

    return is_ready


@contextmanager
def _celery_worker(app: Any, url: str, workers: int, folder: Path) -> Iterator[None]:
    command = [sys.executable, "-m", "celery", "--app", "benchmarks.celery_app"]
    command += ["--broker", url, "--result-backend", url, "worker"]
    command += ["--concurrency", str(workers), "--pool", "prefork"]
    command += ["--loglevel", "WARNING"]
    # Worker-to-worker chatter: with a single worker it only delays startup.
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    log_path = folder / "celery.log"
    process = _spawn("celery worker", command, log_path)
    try:
        _await_ready(process, log_path, _celery_worker_ready(app))
        yield
    finally:
        _stop(process)


@contextmanager
def _celery_cluster(program: str, workers: int) -> Iterator[_Session]:
    from benchmarks import celery_app

    with tempfile.TemporaryDirectory(prefix="bench-celery-") as name:
        folder = Path(name)
        with (
            _redis_server(program, folder) as url,
            celery_app.make_app(url) as app,
            _celery_worker(app, url, workers, folder),
        ):
            yield _CelerySession(app)


def celery_system(sizes: Sizes) -> Workloads:
    """Return Celery's workloads on a Redis broker and result backend.

    Raises Unavailable if celery or redis (the client) is not installed, or if no
    ``redis-server`` program is on PATH.
    """
    _require("celery", "redis")
    program = shutil.which("redis-server")
    if program is None:
        raise Unavailable("redis-server is not on PATH (apt-get install redis-server)")
    return _workloads(partial(_celery_cluster, program), sizes)


# --- ipyparallel ------------------------------------------------------------------


class _IpyparallelSession(_Session):
    def __init__(self, view: Any) -> None:
        self._view = view

    def map(self, workload: str, args: Sequence[Any]) -> list[Any]:
        pending = self._view.map(getattr(workloads, workload), args, block=False)
        return list(pending.get(timeout=RESULT_TIMEOUT_S))

    def call(self, workload: str, arg: Any) -> Any:
        pending = self._view.apply_async(getattr(workloads, workload), arg)
        return pending.get(timeout=RESULT_TIMEOUT_S)


@contextmanager
def _ipyparallel_session(workers: int) -> Iterator[_Session]:
    import ipyparallel as ipp

    # A throwaway IPython directory keeps the cluster's files out of ~/.ipython;
    # the controller and engines started inside the block inherit it.
    with (
        tempfile.TemporaryDirectory(prefix="bench-ipp-") as folder,
        _environment(IPYTHONDIR=folder),
    ):
        cluster = ipp.Cluster(
            n=workers,
            profile_dir=str(Path(folder) / "profile_bench"),
            controller_ip=HOST,
            engine_timeout=STARTUP_TIMEOUT_S,
            log_level=logging.WARNING,
        )
        with cluster as client:
            yield _IpyparallelSession(client.load_balanced_view())


def ipyparallel_system(sizes: Sizes) -> Workloads:
    """Return ipyparallel's workloads; raise Unavailable if not installed."""
    _require("ipyparallel")
    return _workloads(_ipyparallel_session, sizes)


# --- Ray --------------------------------------------------------------------------


class _RaySession(_Session):
    def __init__(self, ray: Any) -> None:
        self._ray = ray
        self._remote = {
            name: ray.remote(getattr(workloads, name))
            for name in ("square", "spin", "length")
        }

    def map(self, workload: str, args: Sequence[Any]) -> list[Any]:
        refs = [self._remote[workload].remote(arg) for arg in args]
        return list(self._ray.get(refs, timeout=RESULT_TIMEOUT_S))

    def call(self, workload: str, arg: Any) -> Any:
        ref = self._remote[workload].remote(arg)
        return self._ray.get(ref, timeout=RESULT_TIMEOUT_S)


# On Linux Ray swaps a loopback node address for the machine's outward one, unless
# its cluster mode is off; it reads that switch when imported, so this is set
# before the first `import ray`. Ray also reports usage over the network unless
# told not to.
_RAY_ENVIRONMENT = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@contextmanager
def _ray_session(workers: int) -> Iterator[_Session]:
    # A folder of our own, so Ray's session files do not pile up in /tmp/ray.
    with (
        tempfile.TemporaryDirectory(prefix="bench-ray-") as folder,
        _environment(**_RAY_ENVIRONMENT),
    ):
        import ray

        ray.init(
            num_cpus=workers,
            include_dashboard=False,
            logging_level=logging.WARNING,
            _node_ip_address=HOST,
            _temp_dir=folder,
        )
        try:
            _check_ray_on_loopback(ray)
            yield _RaySession(ray)
        finally:
            ray.shutdown()


def _check_ray_on_loopback(ray: Any) -> None:
    address = ray.util.get_node_ip_address()
    if address != HOST:
        raise RuntimeError(
            f"Ray runs on {address}, not {HOST} (was ray imported before"
            " benchmarks.systems set its environment?); stopping it"
        )


@contextmanager
def _environment(**variables: str) -> Iterator[None]:
    """Set environment variables for the processes started inside the block."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ray_system(sizes: Sizes) -> Workloads:
    """Return Ray's workloads; raise Unavailable if ray is not installed."""
    # Found, not imported: _ray_session must import it with its environment set.
    if importlib.util.find_spec("ray") is None:
        raise Unavailable(f"ray is not installed ({INSTALL_HINT})")
    return _workloads(_ray_session, sizes)

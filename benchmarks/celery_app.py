"""The Celery application of the Celery peer, loaded by its worker with ``-A``.

The worker gets its broker and result backend from the command line; the
benchmark builds its own client-side instance with ``make_app(url)``. Both
register the same task names, so a message sent by one is understood by the other.
"""

from __future__ import annotations

from celery import Celery

from benchmarks import workloads

__all__ = ["TASKS", "app", "make_app", "task_name"]

TASKS = {
    "square": workloads.square,
    "spin": workloads.spin,
    "length": workloads.length,
}


def task_name(workload: str) -> str:
    """Return the Celery task name under which ``workload`` is registered."""
    return f"benchmarks.{workload}"


def make_app(url: str | None = None) -> Celery:
    """Return an app with every workload registered, using ``url`` for both
    the broker and the result backend (None: the worker's command line says)."""
    app = Celery("benchmarks", broker=url, backend=url, set_as_current=False)
    for workload, function in TASKS.items():
        app.task(name=task_name(workload))(function)
    return app


app = make_app()

"""What `status` and `failed` print: the broker's report as tables that fit
80 columns (workers, tasks by function, clients and sinks, failures), with
captions that say what a column means and what was left out. rich is
imported by the functions that draw, when a command draws."""

from __future__ import annotations

import shlex
from typing import Any

from ._words import counted
from .status import busiest_first

# Tables of failures show session and task ids from this terminal width on.
WIDE_COLUMNS = 120
# A function's name folds beyond this width, to leave its error room.
FUNCTION_COLUMNS = 32


def without_session(report: dict[str, Any], session: str) -> dict[str, Any]:
    """The broker's status without the session of the connection that asked
    for it, in its list and its counts: a session this command made up to
    ask, which holds nothing and leaves with the answer, is none of the
    clients an operator looks for.

    Left out here rather than by the broker: a program's client that asks is
    one of its clients, and looks itself up in the answer. The broker counts
    every connected session, this one too: connected, and not a sink."""
    clients = [c for c in report["clients"] if c["name"] != session]
    trimmed = {**report, "clients": clients}
    counts = report.get("client_counts")  # an older broker does not count
    if counts is not None:
        trimmed["client_counts"] = {
            **counts,
            "all": max(0, counts["all"] - 1),
            "connected": max(0, counts["connected"] - 1),
            "listed": len(clients),
        }
    return trimmed


def print_status(report: dict[str, Any], connect: str | None = None) -> None:
    """`report` as tables and lines; `connect`, the broker asked, goes into
    the commands the lines suggest."""
    from rich.console import Console

    console = Console()
    if "scope" in report:
        # A key with a .functions file: the broker showed it a part only.
        console.print(
            f"as this key sees it: its own sessions ({report['scope']}*) and the "
            "functions it may submit; totals are the broker's"
        )
    console.print(workers_table(report["workers"], report.get("worker_counts")))
    for line in _worker_problems(report["workers"]):
        console.print(line)
    for line in _long_running(report["workers"], connect):
        console.print(line)
    console.print(queues_table(report))
    console.print(clients_table(report["clients"], report.get("client_counts")))
    totals = report.get("totals", {})
    console.print(
        f"tasks since start: {totals.get('submitted', 0)} submitted "
        f"({totals.get('restored', 0)} of them restored from the journal), "
        f"{totals.get('completed', 0)} completed, {totals.get('failed', 0)} failed, "
        f"{totals.get('cancelled', 0)} cancelled" + _split_totals(totals)
    )
    if totals.get("rejected"):
        console.print(
            f"refused as submitted (never accepted): {totals['rejected']} tasks"
        )
    if report.get("not_accepting"):
        console.print(
            f"[bold red]NOT ACCEPTING NEW TASKS[/]: {report['not_accepting']}"
        )
    if report.get("delivery_held"):
        console.print(f"[bold red]RESULTS HELD BACK[/]: {report['delivery_held']}")
    console.print(_results_line(report))
    if report.get("recent_failures"):
        failures = report["recent_failures"]
        console.print(failures_table(failures, "recent failures", console.width))


def print_failures(failures: list[dict[str, Any]]) -> None:
    """`ventilator failed`'s table, with the ids when the terminal is wide."""
    from rich.console import Console

    console = Console()
    title = f"failed tasks ({len(failures)})"
    console.print(failures_table(failures, title, console.width))


def _split_totals(totals: dict[str, Any]) -> str:
    """The maps' batches that failed whole and were split, when there were any
    (an older broker does not count them apart: they are among the failed)."""
    split = totals.get("split")
    if not split:
        return ""
    return (
        f", {split} map batches split (failed whole: a process died, a worker "
        "was lost, a timeout or a result over the limit; items rerun alone)"
    )


def _results_line(report: dict[str, Any]) -> str:
    """Results waiting, and the tombstones of expired ones apart: both are in
    the clients' pending and unacked columns, only the first in the limits."""
    line = f"results waiting for delivery: {report['results_waiting']}"
    expired = report.get("results_expired")  # an older broker does not say
    if expired:
        line += (
            f"; and {expired} expired or dropped for room (a few bytes each, "
            "kept one more result_ttl_s to tell their clients; not counted in "
            "the limits)"
        )
    return line


def _table(title: str) -> Any:
    """A table made to fit 80 columns: no vertical rules or edges, which
    cost a few columns each that the widest cells need."""
    from rich import box
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False)


def workers_table(workers: list[dict[str, Any]], counts: dict[str, int] | None) -> Any:
    """The workers the broker listed; `counts` (None from an older broker,
    which listed them all) covers those it did not list too."""
    from rich.markup import escape

    every = len(workers) if counts is None else counts["all"]
    table = _table(f"workers ({every})")
    captions = []
    if every > len(workers):
        # The broker lists the most relevant ones only: its answer stays small.
        captions.append(
            f"{len(workers)} listed: serving nothing, then holding the oldest "
            f"task, first; and {every - len(workers)} more"
        )
    if any(w.get("prefetched") for w in workers):
        captions.append("+N: tasks prefetched, waiting on the worker")
    table.caption = "; ".join(captions) or None
    # The id (host.pid.tag) is what an operator looks for: folded whole, never
    # cut; the other columns are short and keep to one line.
    table.add_column("worker", overflow="fold", ratio=1)
    for column in ("state", "running", "oldest", "functions", "last seen"):
        table.add_column(column, no_wrap=True)
    for w in workers:
        table.add_row(
            escape(w["id"]),
            _worker_state(w),
            _worker_load(w),
            _duration(w.get("oldest_running_s")),
            # An older broker lists every function and does not count them.
            str(w.get("service_count", len(w["services"]))),
            f"{w['last_seen_s']:.1f}s ago",
        )
    return table


def _worker_load(worker: dict[str, Any]) -> str:
    """'running of slots', and '+N' prefetched; a broker that predates
    `prefetched`, or a worker without slots, shows its credit instead."""
    slots = worker.get("slots")
    prefetched = worker.get("prefetched")
    if slots is None or prefetched is None:
        return f"{worker['running']} of {worker['capacity']}"
    return f"{worker['running']} of {slots}" + (f" +{prefetched}" if prefetched else "")


def _duration(seconds: float | None) -> str:
    """A short age for a table cell: 4.2s, 12m05s, 3h20m; '-' for none."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _worker_state(worker: dict[str, Any]) -> str:
    if worker.get("draining"):
        return "draining"
    # A worker where no task can run (task processes that cannot start, every
    # slot held by a stuck thread) registers without functions.
    return "serving" if worker["services"] else "not serving"


def _worker_problems(workers: list[dict[str, Any]]) -> list[str]:
    """Why each worker that serves nothing does so, one line each, for below
    the table (a broker that predates `problem` does not say)."""
    from rich.markup import escape

    return [
        f"[bold]{escape(w['id'])}[/bold] serves nothing: {escape(w['problem'])}"
        for w in workers
        if w.get("problem")
    ]


# A task running this long is named below the workers' table, with the command
# that cancels it: one that hangs with no timeout has nothing else to end it.
LONG_RUNNING_S = 60.0


def _long_running(
    workers: list[dict[str, Any]], connect: str | None = None
) -> list[str]:
    """For each listed worker whose oldest task has run LONG_RUNNING_S or
    more, a line naming it and how to cancel it at the broker at `connect`
    (a broker that predates `oldest_task`, or a task of another client's, is
    not named)."""
    from rich.markup import escape

    lines = []
    for worker in workers:
        task = worker.get("oldest_task")
        running_s = worker.get("oldest_running_s")
        if task is None or running_s is None or running_s < LONG_RUNNING_S:
            continue
        argv = ["ventilator", "cancel", task["session"], str(task["task_id"])]
        if connect is not None:
            argv += ["--connect", connect]
        command = shlex.join(argv)
        lines.append(
            f"[bold]{escape(worker['id'])}[/bold] has run {escape(task['function'])} "
            f"for {_duration(running_s)}: task {task['task_id']} of session "
            f"{escape(task['session'])}; `{escape(command)}` ends it"
        )
    return lines


def queues_table(report: dict[str, Any]) -> Any:
    from rich.markup import escape

    table = _table("tasks by function")
    table.add_column("function", overflow="fold", ratio=1)
    # Workers hold prefetched tasks beside those they run: the broker counts
    # both per function (the workers table tells them apart).
    for column in ("queued", "on workers"):
        table.add_column(column, justify="right", no_wrap=True)
    # Busiest first, as the broker chose which to list; an older broker's
    # answer (by name) is put in that order too.
    retrying = report.get("retrying", {})  # an older broker does not say
    unserved = set(report.get("unserved", ()))
    for function in busiest_first(report["queued"], report["running"]):
        queued = str(report["queued"].get(function, 0))
        if function in retrying:
            queued += f" ({retrying[function]} to retry)"
        name = escape(function)
        if function in unserved:
            name += " [bold red](no worker serves it)[/]"
        table.add_row(name, queued, str(report["running"].get(function, 0)))
    captions = []
    if unserved:
        captions.append(
            "no connected worker serves "
            + ", ".join(sorted(unserved))
            + ": their tasks wait until one that does connects"
        )
    counts = report.get("queue_counts")  # an older broker lists every function
    if counts is not None and counts["all"] > counts["listed"]:
        captions.append(
            f"the {counts['listed']} functions with the most tasks listed; and "
            f"{counts['all'] - counts['listed']} more ({counts['queued']} queued "
            f"and {counts['running']} on workers in all)"
        )
    if report.get("next_retry_in_s") is not None:
        # Else a queued task beside an idle worker that serves it looks stuck.
        captions.append(
            f"to retry: {counted(report['queue_counts']['retrying'], 'task')} that "
            "raised, waiting out a backoff; the next runs in "
            f"{report['next_retry_in_s']:.1f}s"
        )
    if captions:
        table.caption = "; ".join(captions)
    return table


def clients_table(clients: list[dict[str, Any]], counts: dict[str, int] | None) -> Any:
    """The clients the broker listed; `counts` (None from an older broker,
    which listed them all) covers those it did not list too."""
    from rich.markup import escape

    if counts is None:
        connected = sum(1 for c in clients if c["connected"])
        counts = {"all": len(clients), "connected": connected}
    table = _table(f"clients and sinks ({counts['connected']} connected)")
    # Short headers: a session's 32-character name stays on one line in 80
    # columns. A busy sink is connected with results unacknowledged.
    table.caption = (
        "tasks: its tasks the broker holds; pending: results not sent yet; "
        "unacked: sent, not acknowledged"
    )
    unlisted = counts["all"] - len(clients)
    if unlisted > 0:
        # The broker lists the most relevant ones only: its answer stays small.
        table.caption = (
            f"{len(clients)} of {counts['all']} listed, owed the most results "
            f"first ({unlisted} more not listed); " + table.caption
        )
    # Only when there are any: each column costs 9 of the 80 columns.
    extra = [
        key
        for key in ("expired", "waiting_for_room", "held_back")
        if _any_of(clients, key)
    ]
    if "expired" in extra:
        table.caption += "; expired: of those, results that expired"
    if "waiting_for_room" in extra:
        table.caption += "; waiting: tasks sent past its window, not yet accepted"
    if "held_back" in extra:
        table.caption += (
            "; held: its unread results fill --client-max-bytes, so its queued "
            "tasks do not run until it collects some"
        )
    if any(not c["connected"] and c["pending"] for c in clients):
        # Most often a client killed mid-run: its results count in the limits
        # for a day, and nothing else says how to let them go.
        table.caption += (
            "; a session not connected keeps its results for result_ttl_s (a "
            "day) for a client that resumes it: `ventilator purge --session "
            "NAME` drops them"
        )
    table.add_column("name", overflow="fold", ratio=1)
    # No kind column: a sink's name says it (sink:NAME), and "tasks" needs
    # the room.
    columns = ("connected", "tasks", "pending", "unacked")
    for column in (*columns, *(_EXTRA_COLUMNS[key] for key in extra)):
        table.add_column(column, no_wrap=True)
    for c in clients:
        cells = [
            escape(c["name"]),
            "yes" if c["connected"] else "no",
            # An older broker does not say.
            str(c.get("tasks", "-")),
            str(c["pending"]),
            # An older broker does not say.
            str(c.get("unacknowledged", "-")),
        ]
        table.add_row(*cells, *(_cell(c[key]) for key in extra))
    return table


# Columns of the clients' table shown only when a client has some.
_EXTRA_COLUMNS = {
    "expired": "expired",
    "waiting_for_room": "waiting",
    "held_back": "held",
}


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _any_of(clients: list[dict[str, Any]], key: str) -> bool:
    # An older broker does not say.
    return any(c.get(key) for c in clients)


def failures_table(failures: list[dict[str, Any]], title: str, width: int) -> Any:
    """Failed tasks; below WIDE_COLUMNS, without the session and task ids
    (32 and up to 19 digits), which `--json` shows and no command here needs:
    `retry` takes tickets."""
    from rich.markup import escape

    wide = width >= WIDE_COLUMNS
    table = _table(title)
    if not wide:
        table.caption = "session and task ids: --json"
    table.add_column("ticket", justify="right", no_wrap=True)
    if wide:
        table.add_column("session", no_wrap=True)
        table.add_column("task", justify="right", no_wrap=True)
    table.add_column("function", overflow="fold", max_width=FUNCTION_COLUMNS)
    table.add_column("outcome", no_wrap=True)
    table.add_column("error", overflow="fold", ratio=1)
    for f in failures:
        ids = [escape(f["session"]), str(f["task_id"])] if wide else []
        table.add_row(
            str(f["ticket"]),
            *ids,
            escape(f["function"]),
            f["outcome"],
            escape(f"{f['type']}: {f['message']}"),
        )
    return table

"""The broker's HTTP face, against real processes: /health, /api, /metrics, and
the dashboard page in a real (headless) Chromium."""

from __future__ import annotations

import json
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import ventilator

from . import broken_child_tasks
from .conftest import (
    MORE_TASKS,
    TASKS,
    BrokerProcess,
    ClusterError,
    Launcher,
    log_of,
    wait_for_workers,
    wait_until,
)

# Callers that hang up before reading their answer.
HANGUPS = 50

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; never a downloaded one
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SETTLE_S = 20.0


@pytest.fixture
def web_broker(launch: Launcher) -> BrokerProcess:
    broker = launch.broker("--http", "127.0.0.1:0")
    assert broker.http is not None and broker.http.startswith("http://127.0.0.1:")
    return broker


def get(broker: BrokerProcess, path: str) -> tuple[int, bytes]:
    assert broker.http is not None
    try:
        with urllib.request.urlopen(broker.http + path, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def api(broker: BrokerProcess, name: str) -> Any:
    status, body = get(broker, f"/api/{name}")
    assert status == 200, body
    return json.loads(body)


SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # (name, sorted labels)


def metrics(broker: BrokerProcess) -> dict[SampleKey, float]:
    """Every sample of /metrics, parsed by prometheus-client's own parser."""
    status, body = get(broker, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def run_tasks(client: ventilator.Client, squares: int, failures: int) -> None:
    futures: list[Future[Any]] = [
        client.submit(f"{TASKS}:square", i) for i in range(squares)
    ]
    futures += [client.submit(f"{TASKS}:fail", f"bad {i}") for i in range(failures)]
    done, _ = wait(futures, timeout=30)
    assert len(done) == len(futures)


def test_health_answers_ok_and_unknown_pages_are_404(web_broker: BrokerProcess) -> None:
    status, body = get(web_broker, "/health")
    missing, _ = get(web_broker, "/nothing-here")

    assert status == 200 and json.loads(body)["status"] == "ok"
    # How long ago the broker's loop published, as docs/operations.md documents it.
    assert 0 <= json.loads(body)["snapshot_age_s"] < 10
    assert missing == 404


def test_callers_that_hang_up_early_cost_no_traceback(
    web_broker: BrokerProcess,
) -> None:
    assert web_broker.http is not None
    host, port = web_broker.http.removeprefix("http://").split(":")
    for _ in range(HANGUPS):
        with socket.create_connection((host, int(port)), timeout=5) as caller:
            # Closed with a reset before the answer is read, as a health
            # check that gave up does.
            caller.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            caller.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")

    assert get(web_broker, "/health")[0] == 200
    assert "Traceback" not in log_of(web_broker.process)


def test_http_on_a_public_address_is_refused_without_allow_remote(
    launch: Launcher,
) -> None:
    with pytest.raises(ClusterError) as refused:
        launch.broker("--http", "0.0.0.0:0")

    assert "--http-allow-remote" in str(refused.value)


def test_metrics_counters_match_the_tasks_run(
    launch: Launcher, web_broker: BrokerProcess
) -> None:
    launch.worker(web_broker, concurrency=2)
    client = launch.client(web_broker)
    wait_for_workers(client, 1)

    run_tasks(client, squares=30, failures=2)

    square = (("function", f"{TASKS}:square"),)
    fail = (("function", f"{TASKS}:fail"),)
    expected = {
        ("ventilator_tasks_submitted_total", square): 30,
        ("ventilator_tasks_submitted_total", fail): 2,
        ("ventilator_tasks_completed_total", square): 30,
        ("ventilator_tasks_failed_total", (*fail, ("outcome", "raised"))): 2,
        ("ventilator_task_duration_seconds_count", square): 30,
        ("ventilator_task_queue_wait_seconds_count", square): 30,
        ("ventilator_workers_connected", ()): 1,
    }

    def counted() -> bool:
        samples = metrics(web_broker)
        return all(samples.get(key) == value for key, value in expected.items())

    wait_until(counted, SETTLE_S, f"/metrics to show {expected}")
    samples = metrics(web_broker)
    assert ("ventilator_tasks_completed_total", fail) not in samples
    duration_sum = samples[("ventilator_task_duration_seconds_sum", square)]
    assert 0 <= duration_sum < 30


def test_a_worker_whose_task_processes_cannot_start_is_not_counted_as_slots(
    launch: Launcher, web_broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tester 36: such a worker's slots counted as usable, so /metrics showed
    # a broker where no task could run as able to run two at once.
    monkeypatch.setenv(broken_child_tasks.BREAK_CHILDREN, "1")
    launch.worker(web_broker, broken_child_tasks.__name__, concurrency=2)
    monkeypatch.delenv(broken_child_tasks.BREAK_CHILDREN)
    client = launch.client(web_broker)
    wait_for_workers(client, 1)
    client.submit(broken_child_tasks.double, 1)  # a child meets the broken deploy

    expected = {
        ("ventilator_workers_connected", ()): 1,
        ("ventilator_workers_not_serving", ()): 1,
        ("ventilator_worker_slots", ()): 0,
        ("ventilator_worker_credit", ()): 0,
    }

    def counted() -> bool:
        samples = metrics(web_broker)
        return all(samples.get(key) == value for key, value in expected.items())

    wait_until(counted, SETTLE_S, f"/metrics to show {expected}")


def test_api_status_is_what_ventilator_status_reports(
    launch: Launcher, web_broker: BrokerProcess
) -> None:
    client = launch.client(web_broker)
    client.submit(f"{MORE_TASKS}:cube", 2)  # no worker serves it: it stays queued

    def agree() -> bool:
        over_http = api(web_broker, "status")
        over_zmq = client.status()
        return over_http["queued"] == over_zmq["queued"] == {f"{MORE_TASKS}:cube": 1}

    wait_until(agree, SETTLE_S, "/api/status and STATUS to agree on the queue")
    assert set(api(web_broker, "status")) == set(client.status()) | {"items"}


def test_metrics_count_each_item_of_a_map_and_its_batches_as_tasks(
    launch: Launcher, web_broker: BrokerProcess
) -> None:
    launch.worker(web_broker, concurrency=2)
    client = launch.client(web_broker)
    wait_for_workers(client, 1)

    squares = list(client.map(f"{TASKS}:square", range(100), chunksize=25))

    assert squares == [i * i for i in range(100)]
    square = (("function", f"{TASKS}:square"),)
    expected = {
        ("ventilator_items_submitted_total", square): 100,
        ("ventilator_items_completed_total", square): 100,
        ("ventilator_tasks_submitted_total", square): 4,
        ("ventilator_tasks_completed_total", square): 4,
    }

    def counted() -> bool:
        samples = metrics(web_broker)
        return all(samples.get(key) == value for key, value in expected.items())

    wait_until(counted, SETTLE_S, f"/metrics to show {expected}")
    assert api(web_broker, "status")["items"]["completed"] == 100


def test_an_item_retried_by_its_map_counts_as_failed_once_when_it_ends(
    launch: Launcher, web_broker: BrokerProcess
) -> None:
    # A tester saw items failed +2 for one item that raised twice with
    # retries=1, where a plain task's retries count nothing.
    launch.worker(web_broker)
    client = launch.client(web_broker)
    wait_for_workers(client, 1)
    reciprocal = f"{TASKS}:reciprocal"

    outcomes = list(client.map_outcomes(reciprocal, [1, 0, 2, 4], retries=1))

    assert [type(o.error).__name__ for o in outcomes if o.error] == ["TaskRaised"]
    function = (("function", reciprocal),)
    expected = {
        ("ventilator_items_submitted_total", function): 5,  # its retry too
        ("ventilator_items_completed_total", function): 3,
        ("ventilator_items_retried_total", function): 1,
        ("ventilator_items_failed_total", (*function, ("outcome", "raised"))): 1,
    }

    def counted() -> bool:
        samples = metrics(web_broker)
        return all(samples.get(key) == value for key, value in expected.items())

    wait_until(counted, SETTLE_S, f"/metrics to show {expected}")
    items = api(web_broker, "status")["items"]
    assert (items["failed"], items["retried"]) == (1, 1)


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


def test_dashboard_shows_what_the_api_reports(
    launch: Launcher, web_broker: BrokerProcess, browser: Any, tmp_path: Path
) -> None:
    launch.worker(web_broker, concurrency=2)
    launch.worker(web_broker, concurrency=1)
    client = launch.client(web_broker)
    wait_for_workers(client, 2)
    run_tasks(client, squares=40, failures=1)
    # Twenty items in two batches: the page counts items, as users do.
    assert len(list(client.map(f"{TASKS}:square", range(20), chunksize=10))) == 20
    for x in range(3):
        client.submit(f"{MORE_TASKS}:cube", x)  # nobody serves it: queued
    wait_until(
        lambda: sum(api(web_broker, "status")["queued"].values()) == 3,
        SETTLE_S,
        "three tasks queued",
    )
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(web_broker.http)

    def page_matches_api() -> bool:
        status = api(web_broker, "status")
        shown = {
            key: page.get_by_test_id(key).inner_text()
            for key in ("workers-count", "queued-total", "completed-total")
        }
        return shown == {
            "workers-count": str(len(status["workers"])),
            "queued-total": str(sum(status["queued"].values())),
            "completed-total": str(status["items"]["completed"]),
        }

    wait_until(page_matches_api, SETTLE_S, "the page to show what /api/status says")
    assert page.get_by_test_id("completed-total").inner_text() == "60"
    assert api(web_broker, "status")["totals"]["completed"] == 42
    failures = page.get_by_test_id("failures-table")
    assert "ValueError: failed on purpose: bad 0" in failures.inner_text()
    assert "raised" in failures.inner_text()
    # Task ids are 64-bit: read as a JavaScript number, one was shown rounded.
    failure = api(web_broker, "failed")["failed"][0]
    assert f"{failure['session']} · {failure['task_id']}" in failures.inner_text()
    # The list is journalled and outlives a restart; the count is this run's.
    note = page.locator("#failed-note").inner_text()
    assert note == "(latest 1; 1 failed since the broker started)"
    # Once the history holds every completion, the next refresh charts it.
    wait_until(
        lambda: (
            sum(s["completed"] for s in api(web_broker, "history")["samples"]) == 60
        ),
        SETTLE_S,
        "the history to count 60 completed items",
    )
    refreshes = int(page.locator("body").get_attribute("data-refreshed") or 0)
    wait_until(
        lambda: (
            int(page.locator("body").get_attribute("data-refreshed") or 0)
            > refreshes + 1
        ),
        SETTLE_S,
        "the page to refresh",
    )
    assert page.locator("#throughput-chart polyline").count() >= 1
    screenshot = tmp_path / "dashboard.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000


def test_dashboard_lists_the_busiest_functions_first_as_status_does(
    launch: Launcher, web_broker: BrokerProcess, browser: Any
) -> None:
    client = launch.client(web_broker)
    # Nobody serves them: queued. Equal ones by name, numbers by value.
    loads = {"job1": 1, "job10": 3, "job2": 3, "job9": 12}
    for name, count in loads.items():
        for _ in range(count):
            client.submit(f"{MORE_TASKS}:{name}")
    wait_until(
        lambda: (
            sum(api(web_broker, "status")["queued"].values()) == sum(loads.values())
        ),
        SETTLE_S,
        "every task queued",
    )
    page = browser.new_page()
    page.goto(web_broker.http)
    rows = page.locator("#queues tr td:first-child code")

    busiest_first = [
        f"{MORE_TASKS}:{name}" for name in ("job9", "job2", "job10", "job1")
    ]
    wait_until(lambda: rows.count() == 4, SETTLE_S, "four functions listed")
    assert rows.all_inner_texts() == busiest_first
    assert list(api(web_broker, "status")["queued"]) == busiest_first
    # No worker serves them: each row says so, as `ventilator status` marks it.
    tags = page.locator("#queues tr td:first-child .tag").all_inner_texts()
    assert tags == ["no worker serves it"] * 4


def test_a_broker_refusing_new_tasks_says_so_in_status_health_and_metrics(
    launch: Launcher, tmp_path: Path
) -> None:
    # A tester's broker refused every task (its journal's disk "nearly
    # full"): only its log said so. status counted nothing, /health said ok,
    # and the metrics had no rejected series, so no alert could fire.
    broker = launch.broker(
        "--http",
        "127.0.0.1:0",
        "--journal-min-free-bytes",
        str(2**62),
        durability="process",
        journal=tmp_path / "journal.db",
    )
    client = launch.client(broker)

    with pytest.raises(ventilator.TaskRejected):
        client.submit(f"{TASKS}:square", 2).result(30)

    status = client.status()
    assert status["totals"]["rejected"] == 1
    assert "--journal-min-free-bytes" in status["not_accepting"]

    # The page's snapshot is a moment behind the broker.
    def refusing() -> dict[str, Any] | None:
        health: dict[str, Any] = json.loads(get(broker, "/health")[1])
        return health if health["status"] == "not_accepting" else None

    health = wait_until(refusing, SETTLE_S, "/health to say it is not accepting")
    assert health["not_accepting"] == status["not_accepting"]
    # From the same snapshot or a later one: a gauge to alert on (tester 36).
    assert metrics(broker)[("ventilator_not_accepting", ())] == 1
    wait_until(
        lambda: metrics(broker).get(("ventilator_tasks_refused_total", ())) == 1,
        SETTLE_S,
        "the metrics to count the refused task",
    )

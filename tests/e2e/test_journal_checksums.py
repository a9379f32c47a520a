"""A journal whose segment bytes changed while the broker was down: a real
broker restarted on it fails the damaged task, and serves the others."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ventilator.errors import TaskRejected

from .conftest import MORE_TASKS, Launcher, status_when

PAYLOAD_BYTES = 100_000  # well over the 8 KiB kept inline in a row


def test_a_payload_changed_while_the_broker_was_down_fails_that_task_alone(
    launch: Launcher, restartable: dict[str, Any]
) -> None:
    journal = restartable["journal"]
    broker = launch.broker(**restartable)
    client = launch.client(broker)
    # No worker yet: both payloads wait in the first segment, one after the other.
    damaged_payload, intact_payload = (
        os.urandom(PAYLOAD_BYTES),
        os.urandom(PAYLOAD_BYTES),
    )
    damaged = client.submit(f"{MORE_TASKS}:identity", damaged_payload)
    intact = client.submit(f"{MORE_TASKS}:identity", intact_payload)
    status_when(client, lambda s: sum(s["queued"].values()) == 2, 10, "2 queued")
    launch.processes.stop(broker.process)

    segment = Path(f"{journal}.blobs") / "00000001.seg"
    with segment.open("r+b") as changed:
        changed.seek(PAYLOAD_BYTES // 2)  # inside the first payload
        changed.write(b"not the bytes the client sent")

    restarted = launch.broker(**restartable)
    launch.worker(restarted, MORE_TASKS)
    assert intact.result(30) == intact_payload
    with pytest.raises(TaskRejected, match="checksum mismatch") as rejected:
        damaged.result(30)
    assert segment.name in str(rejected.value)
    [failure] = client.failed()
    assert failure["type"] == "JournalDamaged"
    assert "checksum mismatch" in failure["message"]

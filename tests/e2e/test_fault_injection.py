"""The fault-injection scenarios at a small scale: nothing lost, nothing doubled.

`python -m tests.fault_injection` runs the same scenarios at full size and
prints the table of counts.
"""

from __future__ import annotations

import pytest

from tests import fault_injection

SCALE = 0.25


@pytest.mark.parametrize("name", list(fault_injection.SCENARIOS))
def test_scenario_loses_and_duplicates_nothing(name: str) -> None:
    tally = fault_injection.SCENARIOS[name](SCALE)

    assert tally.lost == 0, tally.row()
    assert tally.duplicated == 0, tally.row()
    assert tally.failed == tally.expected_failures, tally.row()


def test_poison_task_ran_exactly_max_attempts_times() -> None:
    tally = fault_injection.poison_task(SCALE)

    assert tally.executions[-1] == 3

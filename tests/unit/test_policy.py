"""Backoff and limits: small immutable values."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ventilator.errors import UsageError
from ventilator.policy import Backoff, Limits, Prefetch

unit_randoms = st.floats(0.0, 1.0, exclude_max=True)


def test_delay_doubles_with_each_attempt_without_jitter() -> None:
    backoff = Backoff(base_s=0.5, cap_s=100.0, jitter=0.0)

    delays = [backoff.delay_s(attempt, 0.7) for attempt in range(1, 6)]

    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_delay_is_capped() -> None:
    backoff = Backoff(base_s=1.0, cap_s=5.0, jitter=0.0)

    assert backoff.delay_s(10, 0.0) == 5.0


def test_attempt_zero_or_below_waits_the_base_delay() -> None:
    backoff = Backoff(base_s=0.5, cap_s=10.0, jitter=0.0)

    assert backoff.delay_s(0, 0.0) == backoff.delay_s(-3, 0.0) == 0.5


@given(attempt=st.integers(1, 60), unit_random=unit_randoms)
def test_jitter_keeps_the_delay_within_its_range(
    attempt: int, unit_random: float
) -> None:
    backoff = Backoff(base_s=0.25, cap_s=30.0, jitter=0.5)
    ceiling = min(30.0, 0.25 * 2 ** (attempt - 1))

    delay = backoff.delay_s(attempt, unit_random)

    assert 0.5 * ceiling <= delay <= ceiling


@given(attempt=st.integers(1, 60), unit_random=unit_randoms)
def test_delay_is_never_over_the_cap(attempt: int, unit_random: float) -> None:
    assert 0 < Backoff(cap_s=7.0).delay_s(attempt, unit_random) <= 7.0


@given(attempt=st.integers(1, 20), unit_random=unit_randoms)
def test_delay_never_shrinks_from_one_attempt_to_the_next(
    attempt: int, unit_random: float
) -> None:
    backoff = Backoff(base_s=0.1, cap_s=5.0, jitter=0.0)

    assert backoff.delay_s(attempt + 1, unit_random) >= backoff.delay_s(
        attempt, unit_random
    )


def test_full_jitter_can_reach_almost_zero() -> None:
    backoff = Backoff(base_s=1.0, cap_s=1.0, jitter=1.0)

    assert backoff.delay_s(1, 0.999) == pytest.approx(0.001)


def test_delay_of_a_very_late_attempt_is_the_cap() -> None:
    assert Backoff(base_s=0.5, cap_s=30.0, jitter=0.0).delay_s(1100, 0.0) == 30.0


def test_backoff_and_limits_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Backoff().cap_s = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Limits().max_attempts = 9  # type: ignore[misc]


def test_limits_default_to_a_worker_death_budget_and_a_fresh_backoff() -> None:
    limits = Limits()

    assert limits.max_attempts >= 1
    assert limits.heartbeat_interval_s * limits.liveness > 0
    assert limits.retry_backoff == Backoff()


def test_fixed_prefetch_ignores_task_length() -> None:
    assert Prefetch(fixed=3).per_slot(None) == 3
    assert Prefetch(fixed=3).per_slot(0.000001) == 3


def test_adaptive_prefetch_holds_one_task_per_slot_until_tasks_are_known_short() -> (
    None
):
    policy = Prefetch()

    assert policy.per_slot(None) == 1
    assert policy.per_slot(2.0) == 1


def test_adaptive_prefetch_holds_about_its_buffer_of_short_tasks() -> None:
    policy = Prefetch(buffer_s=0.02, most=256)

    assert policy.per_slot(0.005) == 1 + 4
    assert policy.per_slot(0.1) == 2
    assert policy.per_slot(0.000001) == 256


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("heartbeat_interval_s", 0.0),
        ("heartbeat_interval_s", -1.0),
        ("heartbeat_interval_s", float("nan")),
        ("heartbeat_interval_s", float("inf")),
        ("max_payload_bytes", -5),
        ("client_window", 0),
        ("max_attempts", 0),
        ("liveness", 0),
        ("max_queued_tasks", 0),
        ("max_queued_bytes", 0),
        ("client_max_bytes", 0),
        ("delivery_window", 0),
        ("max_peers", 0),
        ("result_ttl_s", -1.0),
        ("orphan_grace_s", -1.0),
        ("orphan_grace_s", float("nan")),
        ("failed_kept", -1),
    ],
)
def test_limits_refuse_nonsense_naming_the_setting(setting: str, value: float) -> None:
    with pytest.raises(UsageError, match=setting):
        Limits(**{setting: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "settings",
    [{"base_s": -1.0}, {"cap_s": float("nan")}, {"jitter": 1.5}, {"jitter": -0.1}],
)
def test_backoff_refuses_nonsense(settings: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        Backoff(**settings)


def test_prefetch_refuses_a_fixed_count_below_one() -> None:
    with pytest.raises(UsageError, match="prefetch"):
        Prefetch(fixed=0)

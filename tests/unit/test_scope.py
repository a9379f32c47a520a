"""Scope: what a client with limited rights sees and reaches."""

from __future__ import annotations

from ventilator import protocol as p
from ventilator.scope import RETRY_SESSION, Scope
from ventilator.tasks import PICKLE_QUEUE


def only_plain(function: str, flags: int) -> bool:
    return not flags & int(p.Flags.PICKLED) and function.startswith("m:")


def test_a_scope_owns_the_sessions_under_its_prefix() -> None:
    scope = Scope("k1.", only_plain)
    assert scope.owns("k1.s")
    assert not scope.owns("k2.s")


def test_the_pickle_queue_is_shown_only_to_a_client_that_may_pickle() -> None:
    scope = Scope("k1.", only_plain)
    assert scope.shows_queue("m:f")
    assert not scope.shows_queue(PICKLE_QUEUE)


def test_retries_run_inside_the_clients_own_sessions() -> None:
    scope = Scope("k1.", only_plain)
    assert scope.retry_session == "k1." + RETRY_SESSION
    assert scope.owns(scope.retry_session)

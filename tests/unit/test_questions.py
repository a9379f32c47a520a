"""QuestionQuota: how many questions one connection may ask in a second."""

from __future__ import annotations

from ventilator._questions import QuestionQuota

PEER = b"\x00peer"
OTHER = b"\x00other"


def test_questions_within_the_quota_are_allowed() -> None:
    quota = QuestionQuota(per_s=3)
    assert all(quota.allows(PEER, 10.0) for _ in range(3))


def test_a_question_past_the_quota_is_refused() -> None:
    quota = QuestionQuota(per_s=3)
    for _ in range(3):
        quota.allows(PEER, 10.0)
    assert not quota.allows(PEER, 10.5)


def test_one_connection_past_its_quota_leaves_others_theirs() -> None:
    quota = QuestionQuota(per_s=1)
    quota.allows(PEER, 10.0)
    assert not quota.allows(PEER, 10.0)
    assert quota.allows(OTHER, 10.0)


def test_the_quota_comes_back_the_next_second() -> None:
    quota = QuestionQuota(per_s=1)
    quota.allows(PEER, 10.0)
    assert not quota.allows(PEER, 10.9)
    assert quota.allows(PEER, 11.0)


def test_the_refusal_names_the_limit() -> None:
    assert "7 questions" in QuestionQuota(per_s=7).refusal()

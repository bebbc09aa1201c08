"""The leadership rules (controller/cluster/leadership.py), one field of the situation varied at a time."""

from __future__ import annotations

from dataclasses import replace

from controller.cluster.leadership import DEFAULT_MARGIN, Term, acting_until, standing

TERM = Term(lease=0xABC, ttl_seconds=3.0, confirmed_sent_at=100.0)


def test_a_leader_acts_until_ttl_less_the_margin_after_its_last_confirmed_renewal_was_sent() -> None:
    assert acting_until(TERM) == 100.0 + 3.0 * (1 - DEFAULT_MARGIN)
    assert standing(TERM, 100.0, "me").acting
    assert standing(TERM, 102.69, "me").acting
    s = standing(TERM, 102.71, "me")
    assert not s.acting and "another replica may lead" in s.reason


def test_a_newer_confirmed_renewal_extends_it_and_only_that() -> None:
    assert not standing(TERM, 103.0, "me").acting
    assert standing(replace(TERM, confirmed_sent_at=101.0), 103.0, "me").acting
    assert not standing(replace(TERM, ttl_seconds=2.0), 102.0, "me").acting  # a shorter lease: sooner


def test_the_margin_only_ever_shortens_acting() -> None:
    assert standing(TERM, 102.9, "me", margin=0.0).acting
    assert not standing(TERM, 102.9, "me", margin=0.1).acting


def test_without_a_term_nobody_acts_and_the_reason_says_who_leads() -> None:
    assert standing(None, 0.0, "r2") == standing(None, 1e9, "r2")
    assert not standing(None, 0.0, "r2").acting and "following r2" in standing(None, 0.0, "r2").reason
    assert "campaigning" in standing(None, 0.0, "").reason

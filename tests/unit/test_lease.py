"""The lease protocol's safety: with any interleaving of renewals, votes and restarts, the old owner's
lease has run out before the coordinator lets the new owner add the address."""

from __future__ import annotations

import random

from shadowplane.lease import (
    ObserverLease,
    address_expiry_seconds,
    majority,
    owner_valid_until,
    renew,
    renewing,
    vote,
)
from shadowplane.lease_observer import LeaseObserver

LEASE = 0.3


def test_renew_and_vote_basics() -> None:
    st = ObserverLease()
    assert not renew(st, 1, "p1", now=1.0, started_at=0.0, lease=LEASE).granted  # never voted for
    assert vote(st, 1, "p1", now=0.05, started_at=0.0, lease=LEASE).granted
    assert not renew(st, 1, "p1", now=0.1, started_at=0.0, lease=LEASE).granted  # start-up grace
    assert renew(st, 1, "p1", now=1.0, started_at=0.0, lease=LEASE).granted
    assert not renew(st, 1, "s1", now=1.0, started_at=0.0, lease=LEASE).granted  # token belongs to p1
    v = vote(st, 2, "s1", now=1.1, started_at=0.0, lease=LEASE)
    assert v.granted and abs(v.wait - 0.2) < 1e-9  # p1's renewal at 1.0 runs until 1.3
    d = renew(st, 1, "p1", now=1.15, started_at=0.0, lease=LEASE)
    assert not d.granted and d.promised == 2  # after the vote the old token is refused
    assert not vote(st, 2, "s2", now=1.2, started_at=0.0, lease=LEASE).granted  # token 2 is s1's
    assert vote(st, 2, "s1", now=1.2, started_at=0.0, lease=LEASE).granted  # a repeat is fine
    assert not vote(st, 1, "p1", now=1.2, started_at=0.0, lease=LEASE).granted
    # a renewal never teaches an observer a newer token: only votes do
    d = renew(st, 5, "s2", now=2.0, started_at=0.0, lease=LEASE)
    assert not d.granted and d.promised == 2 and "never voted" in d.reason
    assert (st.promised, st.holder) == (2, "s1")


def test_rogue_renewals_change_nothing_and_the_owner_keeps_its_lease() -> None:
    """Whatever token and holder a host (any certificate) sends, an observer grants only the token it voted
    for to its candidate; the real owner's renewals keep being granted."""
    rng = random.Random(11)
    for _ in range(500):
        st = ObserverLease()
        assert vote(st, 4, "p1", now=0.5, started_at=0.0, lease=LEASE).granted
        t = 1.0
        for _ in range(20):
            token = rng.choice([0, 1, 3, 4, 5, 2**62, 2**64 - 1])
            holder = rng.choice(["p1", "s1", "rogue", ""])
            before = (st.promised, st.holder, st.granted_token)
            d = renew(st, token, holder, now=t, started_at=0.0, lease=LEASE)
            assert d.granted == (token == 4 and holder == "p1")
            assert (st.promised, st.holder) == before[:2]
            assert renew(st, 4, "p1", now=t, started_at=0.0, lease=LEASE).granted
            t += 0.01


def test_a_shorter_lease_never_shortens_what_was_granted() -> None:
    """After a config change shortens the lease, a vote still waits out renewals granted under the old one."""
    st = ObserverLease()
    vote(st, 1, "p1", now=0.0, started_at=-10.0, lease=2.0)
    assert renew(st, 1, "p1", now=1.0, started_at=-10.0, lease=2.0).granted  # holds until 3.0
    v = vote(st, 2, "s1", now=1.5, started_at=-10.0, lease=0.25)
    assert abs(v.wait - 1.5) < 1e-9


def test_address_wait_covers_the_kernel_lifetime_after_the_last_grant() -> None:
    st = ObserverLease()
    vote(st, 1, "p1", now=0.0, started_at=-10.0, lease=LEASE)
    renew(st, 1, "p1", now=1.0, started_at=-10.0, lease=LEASE)
    v = vote(st, 2, "s1", now=1.1, started_at=-10.0, lease=LEASE)
    assert abs(v.wait - 0.2) < 1e-9
    assert abs(v.address_wait - (0.2 + address_expiry_seconds(LEASE))) < 1e-9
    # long after the last grant, nothing is left to wait for
    v = vote(st, 3, "s2", now=10.0, started_at=-10.0, lease=LEASE)
    assert v.wait == 0 and v.address_wait == 0


def test_restarted_observer_waits_out_what_it_forgot() -> None:
    st = ObserverLease()  # state lost in a restart at t=10
    v = vote(st, 7, "s1", now=10.1, started_at=10.0, lease=LEASE)
    assert v.granted and abs(v.wait - 0.2) < 1e-9
    assert abs(v.address_wait - (0.2 + address_expiry_seconds(LEASE))) < 1e-9


def test_renewing_means_a_granted_renewal_of_that_token_less_than_a_lease_ago() -> None:
    st = ObserverLease()
    vote(st, 1, "p1", now=0.0, started_at=0.0, lease=LEASE)
    assert renewing(st, "p1", 1, now=0.5, started_at=0.0, lease=LEASE) is None  # just started: unknown
    assert renewing(st, "p1", 1, now=1.0, started_at=0.0, lease=LEASE) is False  # never granted
    renew(st, 1, "p1", now=1.0, started_at=0.0, lease=LEASE)
    assert renewing(st, "p1", 1, now=1.2, started_at=0.0, lease=LEASE) is True
    assert renewing(st, "p1", 1, now=1.31, started_at=0.0, lease=LEASE) is False  # a lease without one
    assert renewing(st, "s1", 1, now=1.2, started_at=0.0, lease=LEASE) is False  # not the holder
    # after a vote for a newer token neither the old owner nor the candidate is renewing it, although a
    # renewal was granted a moment ago: a grant counts for its own token only
    vote(st, 2, "s1", now=1.25, started_at=0.0, lease=LEASE)
    assert renewing(st, "p1", 1, now=1.26, started_at=0.0, lease=LEASE) is False
    assert renewing(st, "s1", 2, now=1.26, started_at=0.0, lease=LEASE) is False
    # a refused renewal keeps nothing alive
    assert not renew(st, 1, "p1", now=1.27, started_at=0.0, lease=LEASE).granted
    assert renewing(st, "p1", 1, now=1.28, started_at=0.0, lease=LEASE) is False
    renew(st, 2, "s1", now=1.4, started_at=0.0, lease=LEASE)
    assert renewing(st, "s1", 2, now=1.5, started_at=0.0, lease=LEASE) is True


def test_one_observer_for_controller_and_agents() -> None:
    t = [10.0]
    o = LeaseObserver("s2", LEASE, clock=lambda: t[0])
    d = o.renew("web", 1, "p1")
    assert not d.granted and d.promised == 0, "a service it does not observe: no grant, no newer token"
    o.observe(["web"], lease_seconds=0.5)
    assert o.lease_seconds == 0.5
    assert o.vote("web", 1, "p1").granted
    assert not o.renew("web", 1, "p1").granted  # start-up grace: one lease
    t[0] += 0.6
    assert o.renew("web", 1, "p1").granted
    assert o.renewing("web", "p1", 1) is None  # two leases after its start it can tell
    t[0] += 0.5
    assert o.renew("web", 1, "p1").granted and o.renewing("web", "p1", 1) is True
    # the controller restores its promises from the store; grants are not restored
    c = LeaseObserver("controller", LEASE, clock=lambda: t[0])
    c.observe(["web"])
    c.restore("web", 7, "s1")
    assert c.vote("web", 7, "p1").granted is False and c.vote("web", 8, "p1").granted


def test_majority() -> None:
    assert [majority(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


def test_no_two_owners_under_random_schedules() -> None:
    """Simulate an owner renewing with 3 observers (some renewals lost), a rogue host renewing random
    tokens, a lease length that may change, one observer that may restart (and is caught up by the
    coordinator), and a coordinator voting a new token at a random time via a random majority. The old
    owner's lease ends before the new owner may add the address, and a hung old owner's address has
    expired in its kernel before the new owner may add it without a confirmed release."""
    rng = random.Random(7)
    for _ in range(2000):
        observers = [ObserverLease() for _ in range(3)]
        started = [0.0, 0.0, rng.uniform(0, 2.0)]  # one observer may restart late
        for i in range(3):
            if started[i] == 0.0:
                vote(observers[i], 1, "p1", 0.0, 0.0, LEASE)
        caught_up = False
        t, owner_valid, address_gone = 1.0, float("-inf"), float("-inf")
        vote_at = rng.uniform(1.2, 3.0)
        voters = rng.sample(range(3), 2)
        new_owner_may_add = None
        hung_owner_gone_by = None
        lease = LEASE
        while t < 4.0:
            if rng.random() < 0.02:
                lease = rng.choice([LEASE, LEASE / 2, LEASE * 2])  # the controller's config changed
            if not caught_up and t >= started[2] and new_owner_may_add is None:
                vote(observers[2], 1, "p1", t, started[2], lease)  # the coordinator catches it up
                caught_up = True
            if new_owner_may_add is None and t >= vote_at:
                waits = [vote(observers[i], 2, "s1", t, started[i], lease) for i in voters]
                assert all(w.granted for w in waits)
                new_owner_may_add = t + max(w.wait for w in waits)
                hung_owner_gone_by = t + max(w.address_wait for w in waits)
            for i in range(3):
                rogue = rng.choice([1, 2, 3, 2**62])
                renew(observers[i], rogue, rng.choice(["rogue", "s1", "p1"]), t, started[i], lease)
            sent = t
            replies = [
                renew(observers[i], 1, "p1", t + rng.uniform(0, 0.01), started[i], lease)
                for i in range(3)
                if rng.random() > 0.2  # lost renewals
            ]
            if sum(r.granted for r in replies) >= majority(3):
                # the owner keeps the lease length the observers promised (RenewReply.valid_for_ms), and
                # refreshes its address's lifetime for that length
                owner_valid = owner_valid_until(sent, lease, 0.05)
                address_gone = owner_valid + address_expiry_seconds(lease)
            t += 0.05
        assert new_owner_may_add is not None and hung_owner_gone_by is not None
        assert owner_valid < new_owner_may_add + 1e-9, "old owner still valid when the new one adds"
        # a hung owner refreshes its address's lifetime at the latest when its lease ends
        assert address_gone <= hung_owner_gone_by + 1e-9


def test_health_check_specs_survive_the_trip_to_an_observer() -> None:
    from shadowplane.healthcheck import CheckSpec, spec_from_proto, spec_to_proto

    s = CheckSpec("web", "p1", "10.0.0.1", "exec", 8080, "/h", 204, ("check", "--fast"), 0.05, 0.1, 2, 3)
    assert spec_from_proto(spec_to_proto(s)) == s

"""The fault-injection suite as pass/fail tests: every scenario of `lab chaos` (short faults) on one shared
lab running with mutual TLS. In every scenario: no sample with two owners of the VIP, no daemon died,
no event or telemetry interval lost, and the lab comes back (the primary owns the VIP, every agent
connected and healthy); where the owner stays healthy (controller partition, CPU and I/O
saturation, rogue hosts) nothing moves, no rogue renewal is granted and the client is answered again; where
the lab's derived bound applies (`Timings.max_failover_outage_seconds`), the client's outage is within it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from lab.chaos import SCENARIOS, Chaos, Figures, ids_missing, longest_outage, row, scenario
from lab.poller import Record
from tests.support import need, need_root, remove_leftover_lab

# ---- pure: the figures' arithmetic ----


def test_event_id_holes_are_counted() -> None:
    assert ids_missing([], 10) == 0
    assert ids_missing([11, 12, 13], 10) == 0
    assert ids_missing([11, 13, 16], 10) == 3


def test_longest_outage_after_the_fault_and_never_ended() -> None:
    def rec(t: float, ok: bool) -> Record:
        return Record(sent=t, ok=ok, responder="p1" if ok else "")

    records = [
        rec(0.0, True),
        rec(0.1, False),
        rec(0.2, True),
        rec(1.0, True),
        rec(1.1, False),
        rec(1.5, True),
    ]
    assert longest_outage(records, 0.5) == pytest.approx(0.5)  # the outage before 0.5 s is not the fault's
    assert longest_outage([*records, rec(2.0, False)], 0.5) is None  # the client was never answered again
    assert longest_outage(records[:1], 0.0) == 0.0


def test_a_figure_with_two_owners_or_a_granted_rogue_renewal_is_not_safe() -> None:
    ok = Figures("x", 1.0, 100, 0, 0.2, 0.3, 1, 0, 0, 0, ())
    assert ok.safe() and ok.outage_within_bound() is True
    assert not Figures("x", 1.0, 100, 3, 0.2, None, 1, 0, 0, 0, ()).safe()
    assert not Figures("x", 1.0, 100, 0, 0.2, None, 1, 0, 0, 0, (), rogue_grants=1).safe()
    assert Figures("x", 1.0, 100, 0, None, 0.3, 1, 0, 0, 0, ()).outage_within_bound() is False
    assert "never" in row(Figures("x", 1.0, 100, 0, None, 0.3, 1, 0, 0, 0, ()))


# ---- the scenarios, on a real lab ----


@pytest.fixture(scope="module")
def chaos() -> Iterator[Chaos]:
    need_root()
    for tool, package in (("stress-ng", "stress-ng"), ("iptables-legacy", "iptables")):
        need(shutil.which(tool), f"{tool} missing", f"apt-get install {package} (make setup installs it)")
    remove_leftover_lab()
    with Chaos(quick=True) as c:
        yield c


@pytest.mark.root
@pytest.mark.lab
@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_scenario(chaos: Chaos, name: str) -> None:
    sc = scenario(name)
    f = chaos.run(sc)
    print(row(f))
    assert f.two_owner_samples == 0, f"{name}: two hosts held the VIP in {f.two_owner_samples} samples ({f})"
    assert f.settled, f"{name}: the lab did not come back to the primary with every agent healthy: {f.note}"
    assert f.daemons_died == (), f"{name}: daemons died: {f.daemons_died}"
    assert f.events_lost == 0 and f.telemetry_lost == 0, f
    assert f.rogue_grants == 0, f"{name}: observers granted a rogue host {f.rogue_grants} renewals"
    if not sc.move_allowed:
        assert f.false_failovers == 0, f"{name}: the service moved off a healthy owner ({f})"
        assert f.outage_seconds is not None, f"{name}: the healthy owner never served again ({f})"
    if f.outage_bound_seconds is not None:
        assert f.outage_within_bound(), (
            f"{name}: client outage {f.outage_seconds} s over the bound {f.outage_bound_seconds} s"
            " (Timings.max_failover_outage_seconds)"
        )

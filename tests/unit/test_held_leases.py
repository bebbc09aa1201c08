"""What a restarted agent may resume (agentd/held_leases.py): the pure rule, one field at a time, and the
record file's round trip. Whether the observers still grant the token is theirs to say (tests/failover/
test_restart_resume.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agentd import held_leases
from agentd.held_leases import HeldLease, StateFileError, resume_problem

NOW = 1000.0
BOOT = "6a1f0f0e-0000-4000-8000-000000000001"


def held(**changes: object) -> HeldLease:
    base = HeldLease(
        service="web",
        token=7,
        host="p1",
        vip="10.0.0.100/24",
        interface="eth0",
        observers=("10.0.0.2:7400", "10.0.0.21:7401", "10.0.0.22:7401"),
        observer_names=("controller", "s1", "s2"),
        lease_ms=5000,
        renew_interval_ms=100,
        drift_margin=0.05,
        garp_count=3,
        garp_interval_ms=20,
        valid_until=NOW - 1.0,
        stopped_at=NOW - 1.5,
        boot_id=BOOT,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_record_of_this_host_and_boot_is_resumed() -> None:
    assert resume_problem(held(), "p1", BOOT, NOW) is None


def test_a_record_past_its_deadline_is_still_asked_for() -> None:
    # The observers decide: a token nobody voted past is still this host's, however long the pause was.
    assert resume_problem(held(valid_until=NOW - 3600, stopped_at=NOW - 3600), "p1", BOOT, NOW) is None


@pytest.mark.parametrize(
    ("changes", "host", "boot", "words"),
    [
        ({"boot_id": "another-boot"}, "p1", BOOT, "another boot"),
        ({}, "p1", "", "another boot"),  # this boot's id unreadable: nothing can be matched
        ({}, "s1", BOOT, "recorded by host 'p1'"),
        ({"token": 0}, "p1", BOOT, "token 0"),
        ({"observers": ()}, "p1", BOOT, "observer"),
        ({"observer_names": ("controller",)}, "p1", BOOT, "observer"),
        ({"stopped_at": NOW + 5}, "p1", BOOT, "future"),
        ({"valid_until": NOW + 60}, "p1", BOOT, "future"),
    ],
)
def test_what_is_not_resumed(changes: dict[str, object], host: str, boot: str, words: str) -> None:
    problem = resume_problem(held(**changes), host, boot, NOW)
    assert problem is not None and words in problem, problem


def test_pause_is_measured_from_the_stop() -> None:
    assert held_leases.paused_seconds(held(), NOW) == pytest.approx(1.5)


def test_the_file_round_trips_and_is_taken_once(tmp_path: Path) -> None:
    path = tmp_path / "run" / "leases.json"
    records = [held(), held(service="api", token=3, vip="", interface="")]
    held_leases.save(path, records)
    assert path.stat().st_mode & 0o077 == 0, "the record is root's alone"
    assert held_leases.peek(path) == records and path.exists(), "release-all reads and leaves it"
    assert held_leases.take(path) == records
    assert not path.exists() and held_leases.take(path) == [], "a record is resumed at most once"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{", "not JSON"),
        ('{"format": 99, "leases": []}', "format 99"),
        ('{"format": 1, "leases": [{"service": "web"}]}', "leases[0]"),
    ],
)
def test_a_bad_file_is_refused(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "leases.json"
    path.write_text(text)
    with pytest.raises(StateFileError) as e:
        held_leases.take(path)
    assert words in str(e.value)
    assert not path.exists(), "a bad record is not read again"


def test_boot_id_is_this_kernels() -> None:
    assert held_leases.boot_id() == held_leases.BOOT_ID_FILE.read_text().strip() != ""
    assert held_leases.boot_id(Path("/nonexistent")) == ""

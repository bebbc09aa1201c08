from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agentd.actuate.hooks import run_hook


def write_hook(d: Path, service: str, phase: str, body: str) -> Path:
    p = d / service / phase
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def test_hook_gets_the_transition_in_its_environment(tmp_path: Path) -> None:
    write_hook(
        tmp_path,
        "web",
        "before-takeover",
        'echo "$SHADOWPLANE_PHASE $SHADOWPLANE_SERVICE $SHADOWPLANE_OLD_OWNER->$SHADOWPLANE_NEW_OWNER '
        '$SHADOWPLANE_TOKEN"\n',
    )
    env = {
        "SHADOWPLANE_OLD_OWNER": "p1",
        "SHADOWPLANE_NEW_OWNER": "s1",
        "SHADOWPLANE_TOKEN": "7",
        "EVIL": "x",
    }
    r = asyncio.run(run_hook(tmp_path, "web", "before-takeover", env, 5))
    assert r.ok and r.found and r.exit_code == 0
    assert r.output_tail.strip() == "before-takeover web p1->s1 7"


def test_missing_hook_is_fine_failing_and_slow_ones_are_not(tmp_path: Path) -> None:
    assert asyncio.run(run_hook(tmp_path, "web", "after-release", {}, 5)).ok
    write_hook(tmp_path, "web", "after-takeover", "echo nope; exit 3\n")
    r = asyncio.run(run_hook(tmp_path, "web", "after-takeover", {}, 5))
    assert not r.ok and r.exit_code == 3 and "nope" in r.output_tail
    write_hook(tmp_path, "web", "before-release", "sleep 10\n")
    r = asyncio.run(run_hook(tmp_path, "web", "before-release", {}, 0.3))
    assert not r.ok and r.timed_out and r.seconds < 2


def test_hook_names_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown hook phase"):
        asyncio.run(run_hook(tmp_path, "web", "whenever", {}, 1))
    with pytest.raises(ValueError, match="cannot name a hook directory"):
        asyncio.run(run_hook(tmp_path, "../etc", "before-takeover", {}, 1))

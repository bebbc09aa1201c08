"""The README's main job, start to end (with a shorter day): it must finish, measure, and leave nothing."""

from __future__ import annotations

import json
import subprocess
import sys

from lab.spec import Timings
from tests.support import ROOT, need_root


def test_demo_runs_start_to_end_and_cleans_up() -> None:
    need_root()
    out = subprocess.run(
        [sys.executable, "-m", "lab", "demo", "--day", "20", "--hold", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=170,
        cwd=ROOT,  # `python -m lab` runs from a checkout's root
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["failover_to"] in ("s1", "s2")
    # the demo's failure timings are the lab's: the same bound as the lab failover test
    bound = Timings().max_failover_outage_seconds()
    assert 0 < summary["failover_outage_seconds"] < bound, (summary["failover_outage_seconds"], bound)
    assert summary["failback_after_seconds"] >= 2.0
    assert summary["split_brain_samples"] == 0 and summary["vip_samples"] > 100
    assert summary["scaling_changes"] > 0 and summary["points"] >= 30
    assert summary["left_behind"] == []
    for step in ("building the lab", "cutting p1's link", "failback", "summary"):
        assert step in out.stdout, step
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "splab-" not in left

"""The README's "first hour" walkthrough, as the VM suite runs it: the shell blocks of that section, split
into steps at each comment line that follows a blank line (blank lines inside a heredoc stay in their
step), each run in the guest with bash exactly as written, from the directory holding the .deb. The test
follows the README, so the README cannot drift from what works on a stock host.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from tests.vm.guest import ROOT, Guest, Result

SECTION = "## The first hour"


@dataclass(frozen=True)
class Step:
    script: str
    result: Result
    seconds: float

    @property
    def first_line(self) -> str:
        return next((line for line in self.script.splitlines() if not line.startswith("#")), self.script)


@dataclass(frozen=True)
class Walk:
    steps: tuple[Step, ...]
    expected_steps: int

    def failed(self) -> Step | None:
        return next((s for s in self.steps if s.result.rc != 0), None)

    def step(self, needle: str) -> Step:
        """The step whose script contains `needle` (the README's own words)."""
        found = [s for s in self.steps if needle in s.script]
        assert len(found) == 1, f"{len(found)} walkthrough steps contain {needle!r}"
        return found[0]


def walkthrough_steps(readme: Path = ROOT / "README.md") -> list[str]:
    text = readme.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end > 0 else len(text)]
    steps: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        # A step starts with a comment line after a blank line; blank lines inside a heredoc stay in its step.
        for chunk in re.split(r"\n\s*\n(?=#)", block):
            if chunk.strip():
                steps.append(chunk.strip("\n"))
    return steps


def run_walkthrough(guest: Guest, dist: Path) -> Walk:
    steps = walkthrough_steps()
    done: list[Step] = []
    here = guest.host_path(dist)
    for script in steps:
        t = time.monotonic()
        r = guest.run("/bin/bash", "-euo", "pipefail", "-c", f"cd {here}\n{script}", timeout=600)
        done.append(Step(script, r, time.monotonic() - t))
        step = done[-1]
        print(f"[first hour] {step.first_line[:70]!r}: exit {r.rc} in {step.seconds:.1f} s", flush=True)
        if r.rc != 0:
            break
    return Walk(tuple(done), len(steps))

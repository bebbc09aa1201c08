"""Transition hooks: operator executables run around a takeover or release (the place for data sync).

A hook is `<hooks_dir>/<service>/<phase>` (phases: before-takeover, after-takeover, before-release,
after-release). It runs with the transition in its environment and a timeout; a missing hook is not a
failure. Hooks live on the host that runs them, never in what the controller sends: the controller can ask
for a phase, not for a command.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

PHASES = ("before-takeover", "after-takeover", "before-release", "after-release")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
OUTPUT_TAIL = 2000


@dataclass(frozen=True)
class HookOutcome:
    phase: str
    found: bool
    exit_code: int
    timed_out: bool
    output_tail: str
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.found or (self.exit_code == 0 and not self.timed_out)


def hook_path(hooks_dir: Path, service: str, phase: str) -> Path:
    if phase not in PHASES:
        raise ValueError(f"unknown hook phase {phase!r}: one of {', '.join(PHASES)}")
    if not _SAFE.match(service):
        raise ValueError(f"service name {service!r} cannot name a hook directory")
    return hooks_dir / service / phase


async def run_hook(
    hooks_dir: Path, service: str, phase: str, env: dict[str, str], timeout: float
) -> HookOutcome:
    path = hook_path(hooks_dir, service, phase)
    if not path.exists():
        return HookOutcome(phase, False, 0, False, "", 0.0)
    if not os.access(path, os.X_OK):
        return HookOutcome(phase, True, 126, False, f"{path} is not executable (chmod +x it)", 0.0)
    t0 = time.monotonic()
    full_env = dict(os.environ, SHADOWPLANE_PHASE=phase, SHADOWPLANE_SERVICE=service)
    full_env.update({k: v for k, v in env.items() if k.startswith("SHADOWPLANE_")})
    proc = await asyncio.create_subprocess_exec(
        str(path),
        env=full_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # so a timeout kills the hook's children too
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        timed_out = False
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        out = b""
        await proc.wait()
        timed_out = True
    code = proc.returncode if proc.returncode is not None else -1
    tail = out.decode(errors="replace")[-OUTPUT_TAIL:]
    return HookOutcome(phase, True, code, timed_out, tail, time.monotonic() - t0)

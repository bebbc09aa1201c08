"""An operator's hold on one shadow workload's limits: pin to values, bound to a range, freeze as is, clear.

`shadowctl pin|bound|freeze|unfreeze` sets one through the Fleet API; the store keeps it; the planner honours
it every cycle (controller/scaling/planner.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Kind = Literal["pin", "bound", "freeze", "clear"]
KINDS: tuple[Kind, ...] = ("pin", "bound", "freeze", "clear")


@dataclass(frozen=True)
class Override:
    host: str
    workload: str
    kind: str  # one of KINDS; anything else is refused by `check`
    cpu_cores: float = 0.0  # pin (0: CPU left to the forecast)
    memory_bytes: int = 0  # pin (0: memory left to the forecast)
    cpu_min: float = 0.0  # bound (0: none)
    cpu_max: float = 0.0
    memory_min: int = 0
    memory_max: int = 0
    reason: str = ""
    by: str = ""  # who set it (from the operator's certificate)
    unix_ms: int = 0

    def check(self, known: Mapping[tuple[str, str], str], shadows: tuple[str, ...] = ()) -> str | None:
        """Why this override cannot be accepted (None if it can): `known` is every (host, workload) with its
        role ("primary" or "shadow"), `shadows` the HOST/WORKLOAD shadows of this workload's service."""
        if self.kind not in KINDS:
            return f"kind must be pin, bound, freeze or clear, not {self.kind!r}"
        role = known.get((self.host, self.workload))
        if role is None:
            return f"no workload {self.workload!r} on host {self.host!r} (see shadowctl plan)"
        if role != "shadow" and self.kind != "clear":
            # The scaling cycle sizes shadows only: a hold on anything else would be stored and shown, and
            # never applied. (clear stays allowed: it removes a hold whatever it is on.)
            example = f"e.g. shadowctl {self.kind} {shadows[0]}" if shadows else "see shadowctl plan"
            return (
                f"{self.host}/{self.workload} is "
                + (f"a {role}" if role else "announced without a role by its agent")
                + f": {self.kind} applies "
                f"to shadows, whose limits the controller sizes; {self.kind} one of its service's shadows "
                f"instead ({example})"
            )
        if self.kind == "pin" and self.cpu_cores <= 0 and self.memory_bytes == 0:
            return "pin needs a CPU and/or a memory value"
        if self.cpu_cores < 0 or self.cpu_min < 0 or self.cpu_max < 0:
            return "CPU values must not be negative"
        if self.kind == "bound" and self.cpu_max and self.cpu_min > self.cpu_max:
            return "bound: the CPU minimum is above the maximum"
        if self.kind == "bound" and self.memory_max and self.memory_min > self.memory_max:
            return "bound: the memory minimum is above the maximum"
        return None

"""Wall-clock time as the API carries it: unix milliseconds. (Leases use monotonic time, never this.)"""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)

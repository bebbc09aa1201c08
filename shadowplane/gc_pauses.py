"""Keep Python's full garbage collections off the lease loop's critical path.

A full (generation 2) collection walks every tracked object while the event loop waits. A controller with
2,000 agent streams holds about 250,000 of them (each stream's tasks, coroutines, futures, queues): one
full collection took 150-250 ms of CPU on the lab's VM and ran about nine times a minute, each a loop
stall longer than a lab lease's renewal interval (measured with a gc callback under bench/fleet_sim.py).

What lives that long is mostly long-lived (the streams of connected agents), so it is frozen
(`gc.freeze`: moved out of the collector's generations; reference counting still frees it) shortly after
start and then every `every_seconds`, each time after a collection of what is not frozen yet (so no
garbage is frozen; that collection walks only what was created since the last freeze: short). A full
collection then walks only what is new, and runs rarely (the collector starts one when the objects that
survived since outnumber a quarter of those the last full one kept).

What is frozen and later becomes unreachable *in a cycle* (a stream's tasks after its agent left) is
collected only when everything is unfrozen: once every `full_seconds`, one full collection's pause.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)

FIRST_FREEZE_SECONDS = 30.0  # after start: agents have reconnected and their streams are long-lived
REFREEZE_SECONDS = 60.0
FULL_SECONDS = 3600.0


def refreeze(full: bool) -> tuple[int, float]:
    """Collect (everything if `full`, else what is not frozen), then freeze what survived: (objects
    frozen, seconds the pause took)."""
    t0 = time.perf_counter()
    if full:
        gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count(), time.perf_counter() - t0


async def freeze_forever(
    first_seconds: float = FIRST_FREEZE_SECONDS,
    every_seconds: float = REFREEZE_SECONDS,
    full_seconds: float = FULL_SECONDS,
) -> None:
    await asyncio.sleep(first_seconds)
    last_full = time.monotonic()
    frozen, took = refreeze(full=True)
    while True:
        log.debug("garbage collector: %d objects frozen, the collection took %.0f ms", frozen, took * 1e3)
        await asyncio.sleep(every_seconds)
        full = time.monotonic() - last_full >= full_seconds
        if full:
            last_full = time.monotonic()
        frozen, took = refreeze(full)

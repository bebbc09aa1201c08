"""Self-fencing that does not depend on the agent's event loop.

An owner may hold a service's address only until its lease runs out. That deadline is kept here, on a thread
of its own: the thread removes the address when the deadline passes even if the event loop is busy or
blocked (a slow netlink call, a long telemetry read, a stalled callback). Only if the whole process stops
(SIGSTOP, a frozen host) does it wait, and then the kernel's lifetime of the address removes it; the
coordinator waits that lifetime out for any owner that cannot confirm it let go (shadowplane.lease).

Adding or refreshing an address and removing it at the deadline happen under one lock, and an address is
only added or refreshed while its deadline is still ahead, checked again on the netlink thread right before
the kernel call and right after it (`Addresses.hold`): a process paused between the check and the call
(before this check the lab's `owner-agent-sigstop` scenario saw two owners for two 10 ms samples in one
CI run: a SIGSTOP that lands between a check and the call lets the resumed agent add the address its
successor holds) removes it again at once. The kernel has no conditional add, so a pause that lands inside
the call itself (a window of tens of microseconds per renewal) still puts the address back until the check
after it removes it: the add and the removal together took 1.4 ms median, 2.9 ms p99 on this machine
(2026-12-02). That residue is what the kernel's address API leaves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agentd.actuate.address import Addresses, Vip

log = logging.getLogger(__name__)

OnExpiry = Callable[[bool], None]  # called on the fence's thread with "the address was removed"


@dataclass(frozen=True)
class _Held:
    vip: Vip | None  # None: a DNS-only service, only the deadline matters
    deadline: float  # time.monotonic() (the asyncio loop's clock)
    on_expiry: OnExpiry


class Fence:
    def __init__(self, addresses: Addresses | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.addresses, self.clock = addresses, clock
        self._cond = threading.Condition()
        self._held: dict[str, _Held] = {}  # service -> what it holds until when
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="fence", daemon=True)
        self._thread.start()

    def hold(
        self,
        service: str,
        vip: Vip | None,
        deadline: float,
        lifetime: int,
        on_expiry: OnExpiry,
        wanted: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Add (or refresh) `vip` with a kernel lifetime of `lifetime` s and keep it until `deadline`.
        False, and nothing changes, if the deadline has passed already (the lease ran out while the caller
        was held up), the holder no longer wants it (`wanted`, asked under the lock, so a drop that came
        first is never undone), or the fence is closed. Blocks for a netlink round trip: callers on an
        event loop run it in a thread."""
        with self._cond:
            if self._stopped or self.clock() >= deadline or not wanted():
                return False
            if vip is not None:
                assert self.addresses is not None, "a fence without netlink holds no address"
                if not self.addresses.hold(vip, lifetime, deadline, self.clock):
                    return False  # the deadline passed on the way to the kernel (agentd/actuate/address.py)
            self._held[service] = _Held(vip, deadline, on_expiry)
            self._cond.notify()
            return True

    def holds(self, service: str) -> bool:
        with self._cond:
            return service in self._held

    def drop(self, service: str) -> bool:
        """Remove `service`'s address now (the lease was lost or released); True if it was there."""
        with self._cond:
            held = self._held.pop(service, None)
            self._cond.notify()
            return held is not None and self._remove(service, held)

    def forget(self, service: str) -> bool:
        """Stop keeping `service`'s deadline and leave its address to the kernel's lifetime (an agent that
        stops and means to resume the lease: agentd/held_leases.py); True if it was held."""
        with self._cond:
            held = self._held.pop(service, None)
            self._cond.notify()
            return held is not None

    def close(self) -> None:
        """Stop the thread. Addresses stay: whoever closes the fence has dropped or released them."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _remove(self, service: str, held: _Held) -> bool:
        if held.vip is None or self.addresses is None:
            return False
        try:
            return self.addresses.remove(held.vip)
        except Exception:  # the thread must survive: the next deadline matters as much
            log.exception("service %s: could not remove %s", service, held.vip.address)
            return False

    def _run(self) -> None:
        while True:
            expired: list[tuple[_Held, bool]] = []
            with self._cond:
                if self._stopped:
                    return
                now = self.clock()
                for service in [s for s, h in self._held.items() if h.deadline <= now]:
                    held = self._held.pop(service)
                    expired.append((held, self._remove(service, held)))
                if not expired:
                    nearest = min((h.deadline for h in self._held.values()), default=None)
                    self._cond.wait(None if nearest is None else max(0.0, nearest - now))
                    continue
            for held, removed in expired:
                try:
                    held.on_expiry(removed)
                except Exception:
                    log.exception("fence: expiry callback failed")

"""The HA loop, as Patroni runs its: every tick, read a snapshot of each service, decide (a pure
function), act (a transition task), and record each decision with its reason.

It also keeps the observers fed: each observer agent gets the health checks it must run (a Watch), and the
controller runs its own checks of every target.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from controller.config import ControllerConfig, ServiceConfig
from controller.event_log import EventLog
from controller.failover.board import ObservationBoard
from controller.failover.decide import Decision, Request, Snapshot, Tally, decide, tally
from controller.failover.orchestrator import Orchestrator
from controller.pool.zones import ZoneHealth, degraded_hosts, zone_health
from controller.registry import AgentRegistry, AgentSession
from controller.status import ObserverView, ServiceView
from controller.store import ServiceRecord, Store
from shadowplane.clock import now_ms
from shadowplane.healthcheck import (
    CheckSpec,
    Tracker,
    detection_seconds,
    local_probe,
    run_check,
    spec_to_proto,
)
from shadowplane.lease_observer import LeaseObserver
from shadowplane.v1 import agent_pb2 as apb

log = logging.getLogger(__name__)

# How often a sharded replica looks again at which service-less hosts' shards it holds (20: once a second)
PLAIN_HOSTS_EVERY_TICKS = 20

CATCH_UP_RETRY_SECONDS = 1.0
# How long one slice of an HA tick holds the event loop before renewals and timers get their turn
TICK_SLICE_SECONDS = 0.002
# How long one answer of `alive()` is reused within one (sliced) tick
TICK_ALIVE_REUSE_MS = 50
# How long one answer of `alive()` is reused: small next to any heartbeat timeout (the lab's is 500 ms).
ALIVE_REUSE_MS = 5


@dataclass
class ServiceRuntime:
    cfg: ServiceConfig
    task: asyncio.Task[ServiceRecord] | None = None
    primary_up_since_ms: int | None = None
    renewing_down_since_ms: int | None = None  # since when a majority says the owner stopped renewing
    stable_since: float = field(default_factory=time.monotonic)
    last_noted: str = ""
    failed_placements: int = 0  # transitions in a row that ended without an owner (decide.retry_wait_ms)
    last_failed: float = 0.0  # when the last of them ended (time.monotonic())

    def failed(self) -> None:
        self.failed_placements, self.last_failed = self.failed_placements + 1, time.monotonic()

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def targets(self) -> list[str]:
        return [self.cfg.primary, *self.cfg.shadows]


class FailoverLoop:
    def __init__(
        self,
        cfg: ControllerConfig,
        store: Store,
        registry: AgentRegistry,
        events: EventLog,
        observer: LeaseObserver,
        orchestrator: Orchestrator,
        tracks: Callable[[str], bool] = lambda service: True,
        hears: Callable[[str], bool] = lambda service: True,
    ) -> None:
        self.cfg, self.store, self.registry, self.events = cfg, store, registry, events
        self.observer, self.orchestrator = observer, orchestrator
        self.board = ObservationBoard()
        self.services = {s.name: ServiceRuntime(s) for s in cfg.service}
        self._checks: dict[tuple[str, str], Tracker] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._watched: dict[str, str] = {}  # host -> instance id that got its Watch
        # (service, observer) -> (instance id, token, when) the observer was last asked to catch up to: an
        # observer grants renewals only of a token it voted for, so one that missed the vote is brought up
        self._caught_up: dict[tuple[str, str], tuple[str, int, float]] = {}
        self.started = time.monotonic()
        self.not_leading = orchestrator.not_leading  # replicas: "" only while this one leads the service
        self.tracks = tracks  # sharded replicas: services it acts for or is taking over (heartbeats, views)
        self.hears = hears  # ... and those it is next in line for (telemetry: the history it would forecast)
        self._alive: tuple[int, frozenset[str]] | None = None  # (when, who): see alive()
        # zone health (controller/pool/zones.py): each zoned host's zone, what made the last answer, the
        # answer, and the hosts of degraded zones (what `decide` keeps failovers off)
        self._zoned = {h.name: h.zone for h in cfg.host if h.zone}
        self._seen_down: dict[str, dict[str, str]] = {}  # host -> service whose observers see it down -> why
        self._zones_dirty = False  # _seen_down changed since the zones were judged
        self._zone_judge = min((s.name for s in cfg.service), default="")  # see _update_zones
        self._zones_alive: frozenset[str] | None = None  # who was alive when the zones were judged
        self.zones: tuple[ZoneHealth, ...] = ()
        self.degraded: dict[str, str] = {}
        self.on_zones_changed: Callable[[], None] = lambda: None  # the scaling loop pre-warms (server.py)
        self._in_tick = False
        # host -> the services whose lease quorum it sits in (each agent's Watch, as it connects)
        self._seated: dict[str, list[ServiceRuntime]] = {}
        for rt in self.services.values():
            for h in cfg.lease_quorum(rt.cfg):
                self._seated.setdefault(h, []).append(rt)
        # host -> the services it serves or observes: whether this replica wants its heartbeats and views
        self._serves: dict[str, list[str]] = {}
        for rt in self.services.values():
            for h in dict.fromkeys([rt.cfg.primary, *rt.cfg.shadows, *rt.cfg.observer_names()]):
                self._serves.setdefault(h, []).append(rt.cfg.name)
        # the services this replica tracked, and heard, and the service-less hosts it hears, at the last tick
        self._tracked: tuple[frozenset[str], frozenset[str], frozenset[str] | None] | None = None
        self._plain = [h.name for h in cfg.host if h.name not in self._serves]
        self._plain_tracked: frozenset[str] | None = None
        self._ticks = 0
        self._told: dict[str, AgentSession] = {}  # host -> the stream its interest was decided for
        self._told_version = -1  # the registry's version when the streams were last walked

    # ---- the loop ----

    async def run(self) -> None:
        for rt in self.services.values():
            if "controller" not in rt.cfg.observer_names():
                # Its observer hosts judge its health; a probe of ours would never be asked (at fleet
                # sizes, thousands of connections a second: bench/fleet_sim.py --observers agents).
                continue
            for target in rt.targets():
                spec = self._check_spec(rt.cfg, target)
                tracker = self._checks[(rt.cfg.name, target)] = Tracker(spec.fall, spec.rise)
                probe = local_probe(spec, self.cfg.checks, "controller.toml")
                if isinstance(probe, str):
                    # check-config refuses this when the controller observes the service; otherwise its
                    # view is never asked for.
                    tracker.detail = probe
                    continue
                self._tasks.append(asyncio.create_task(run_check(spec, probe, self._on_controller_probe)))
        try:
            while True:
                for _ in self._tick_slices():
                    await asyncio.sleep(0)  # renewals, heartbeats and timers run between the slices
                await asyncio.sleep(self.cfg.failover.loop_interval_seconds)
        finally:
            for t in self._tasks:
                t.cancel()
            for rt in self.services.values():
                if rt.task is not None:
                    rt.task.cancel()

    def tick(self) -> None:
        """One whole tick without a pause (tests, bench/ha_tick.py)."""
        for _ in self._tick_slices():
            pass

    def _tick_slices(self) -> Iterator[None]:
        """One tick, pausing (a yield) whenever a slice has held the loop TICK_SLICE_SECONDS: at 2,000 hosts
        and 500 services a whole tick is 8 ms on an idle core and 20-50 ms on a busy one, each a stall of
        every renewal and timer on the loop (the loop-lag target is 20 ms at the 99th percentile). Each
        service is decided and started within one slice, from its own state at that moment.

        Within a tick one answer to alive() serves up to TICK_ALIVE_REUSE_MS (see alive())."""
        self._alive = None
        self._update_zones()
        self._in_tick = True
        try:
            tracked: set[str] = set()
            heard: set[str] = set()
            was = self._tracked[0] if self._tracked is not None else frozenset()
            # first each new stream's Watch (2,000 at once when a restarted controller's agents come back),
            # then each service, then each agent whose interest changed
            steps: Iterator[Callable[[], None]] = itertools.chain(
                (
                    functools.partial(self._push_watch, h, s)
                    for h, s in self.registry.connected().items()
                    if self._watched.get(h) != s.instance_id
                ),
                (
                    functools.partial(self._tick_service, rt, was, tracked, heard)
                    for rt in list(self.services.values())
                ),
                self._interest_steps(tracked, heard),  # last: what the services' steps leave in the sets
            )
            slice_ends = time.perf_counter() + TICK_SLICE_SECONDS
            for step in steps:
                step()
                if time.perf_counter() > slice_ends:
                    self._in_tick = False
                    yield
                    self._in_tick = True
                    slice_ends = time.perf_counter() + TICK_SLICE_SECONDS
        finally:
            self._in_tick = False

    def _tick_service(
        self, rt: ServiceRuntime, was: frozenset[str], tracked: set[str], heard: set[str]
    ) -> None:
        """Read one service's state, decide, act (a transition task), and note the decision's reason."""
        now = now_ms()
        if not self.tracks(rt.cfg.name):
            # Sharded replicas: another replica leads it. What this one knew of it goes stale: taking it
            # over again starts every watch afresh, as after a restart.
            if rt.cfg.name in was:
                self._let_go(rt)
            if self.hears(rt.cfg.name):
                heard.add(rt.cfg.name)
            return
        tracked.add(rt.cfg.name)
        primary = self._health(rt, rt.cfg.primary)
        if primary.majority_up:
            rt.primary_up_since_ms = rt.primary_up_since_ms or now
        else:
            rt.primary_up_since_ms = None
        if rt.busy or self.not_leading(rt.cfg.name):
            return
        rec = self.orchestrator.service_state(rt.cfg.name)
        if rec.owner:
            rt.failed_placements = 0  # placed, by this replica or by one that led it meanwhile
        if rec.phase == "acquiring":
            self._recover(rt, rec)
            return
        self._catch_up_observers(rt)
        d = decide(self.snapshot(rt, primary_health=primary))
        if d.accepted:
            self._start(rt, d)
        elif d.reason and d.reason != rt.last_noted:
            self.events.record("decision", rt.cfg.name, d.target, d.reason, damped=d.damped)
        rt.last_noted = d.reason

    def _let_go(self, rt: ServiceRuntime) -> None:
        """A service another replica now acts for: forget the timers that would judge it on return (a
        renewal miss counted from minutes ago would skip the wait for the health checks), and stop retrying
        its DNS record (the replica acting for it now points it)."""
        rt.primary_up_since_ms = rt.renewing_down_since_ms = None
        rt.stable_since, rt.last_noted, rt.failed_placements = time.monotonic(), "", 0
        self.orchestrator.dns_updates.cancel(
            rt.cfg.name, "another controller replica acts for the service now", self.events.record
        )

    def interest(self, host: str, tracked: frozenset[str], heard: frozenset[str]) -> apb.Interest:
        """What this replica wants of `host`: heartbeats and views while it tracks one of the services the
        host serves or observes (with one shard, always); telemetry also while it is next in line for one.
        A host of no service: everything while this replica holds the shard its name hashes to."""
        serves = self._serves.get(host)
        if not serves:
            mine = self.tracks(f"host {host}")
            why = "serves no service" + ("" if mine else "; another replica hears it")
            return apb.Interest(full=mine, skip_telemetry=not mine, reason=why)
        ours = [s for s in serves if s in tracked]
        if ours:
            return apb.Interest(full=True, reason=f"this replica acts for {', '.join(ours)}")
        why = f"other replicas act for {', '.join(serves)}"
        if any(s in heard for s in serves):
            return apb.Interest(full=False, reason=f"{why}; this one is next in line")
        return apb.Interest(full=False, skip_telemetry=True, reason=why)

    def _interest_steps(self, tracked_now: set[str], heard_now: set[str]) -> Iterator[Callable[[], None]]:
        """Telling each agent whose interest changed (a shard gained or handed over, a new stream), one step
        per agent; the sets as the tick's services left them (read when the first step is asked for)."""
        tracked, heard = frozenset(tracked_now), frozenset(tracked_now | heard_now)
        self._ticks += 1
        if self._ticks % PLAIN_HOSTS_EVERY_TICKS == 1 or self._plain_tracked is None:
            # hosts that serve no service follow their name's shard, which may move without a service
            self._plain_tracked = frozenset(h for h in self._plain if self.tracks(f"host {h}"))
        key = (tracked, heard, self._plain_tracked)
        changed, self._tracked = key != self._tracked, key
        if not changed and self.registry.version == self._told_version:
            return  # no stream came or went: nothing to tell (a walk of every stream per tick otherwise)
        self._told_version = self.registry.version
        for host, session in self.registry.connected().items():
            if changed or self._told.get(host) is not session:
                yield functools.partial(self._tell_interest, host, session, tracked, heard)

    def _tell_interest(
        self, host: str, session: AgentSession, tracked: frozenset[str], heard: frozenset[str]
    ) -> None:
        if self.registry.get(host) is not session:
            return  # the stream ended since the tick began: its successor is told next tick
        self._told[host] = session
        want = self.interest(host, tracked, heard)
        if (want.full, want.skip_telemetry) != (session.full, session.skip_telemetry):
            if session.full and not want.full:
                # its views stop coming here: forgotten, not kept to be read stale on a return (the agent
                # sends them all again when it is told full)
                self.board.forget_observer(host)
            session.full, session.skip_telemetry = want.full, want.skip_telemetry
            with contextlib.suppress(asyncio.QueueFull):
                session.outbox.put_nowait(apb.ControllerMessage(interest=want))

    def _recover(self, rt: ServiceRuntime, rec: ServiceRecord) -> None:
        """A takeover left half done (this controller restarted, or the replica that led it died or lost
        leadership): whoever it reached, ownership is unknown. The next placement uses a newer token, which
        fences whatever the interrupted one did."""

        async def go() -> ServiceRecord:
            try:
                out = await self.orchestrator.book.save(
                    replace(rec, owner="", phase="no-owner", candidate="")
                )
            finally:
                rt.stable_since = time.monotonic()
            self.events.record(
                "recovered",
                rt.cfg.name,
                rec.candidate,
                f"a takeover to {rec.candidate} (token {rec.token}) was cut short by a controller restart "
                "or a change of leader; re-placing with a newer token",
            )
            return out

        rt.task = asyncio.create_task(go())

    def request(self, service: str, req: Request) -> Decision:
        """An operator's failover or failback: decided now, carried out in the background."""
        rt = self.services.get(service)
        if rt is None:
            return Decision("none", "", f"no service {service!r} (see shadowctl services)")
        why = self.not_leading(service)
        if why:
            return Decision(
                "none", "", f"this controller replica does not act for {service} ({why}): ask its leader"
            )
        if rt.busy:
            return Decision("none", "", "a transition of this service is already running")
        d = decide(self.snapshot(rt, req))
        if d.accepted:
            self._start(rt, d)
        else:
            self.events.record("request-refused", service, d.target, d.reason, request=req.kind)
        return d

    def _start(self, rt: ServiceRuntime, d: Decision) -> None:
        async def go() -> ServiceRecord:
            try:
                rec = await self.orchestrator.run(rt.cfg, d)
                # (an owner resets the count at the next tick; a replica that lost the service counts nothing)
                if not rec.owner and not self.not_leading(rt.cfg.name):
                    rt.failed()
                return rec
            except Exception as e:  # a failed transition is an event; the loop goes on
                if not self.not_leading(rt.cfg.name):
                    rt.failed()
                log.exception("transition of %s failed", rt.cfg.name)
                self.events.record("transition-error", rt.cfg.name, d.target, f"{type(e).__name__}: {e}")
                raise
            finally:
                rt.stable_since = time.monotonic()

        rt.task = asyncio.create_task(go())

    # ---- the snapshot ----

    def snapshot(
        self, rt: ServiceRuntime, request: Request | None = None, primary_health: Tally | None = None
    ) -> Snapshot:
        """What `decide` sees of a service now. `primary_health`: the primary's tally, when the caller has
        just made it from the same views (the tick makes it for every service, and no await lies between)."""
        svc = rt.cfg
        rec = self.orchestrator.service_state(svc.name)
        health = {
            h: primary_health if h == svc.primary and primary_health is not None else self._health(rt, h)
            for h in rt.targets()
        }
        # a host seen down by a service's observers counts for its zone at once, before this decision: a zone
        # whose hosts fail together is known degraded by the decision that their failure starts
        if self._zoned:
            for h, t in health.items():
                self._note_health(svc.name, h, t)
            if self._zones_dirty:
                self._update_zones()
        renewing, now = self._renewing(rt, rec), now_ms()
        if not renewing.majority_down:
            rt.renewing_down_since_ms = None
        elif rt.renewing_down_since_ms is None:
            rt.renewing_down_since_ms = now
        return Snapshot(
            name=svc.name,
            primary=svc.primary,
            shadows=tuple(svc.shadows),
            failback=svc.failback,
            failback_hold_ms=int(svc.failback_hold_seconds * 1000),
            flap_window_ms=int(svc.flap_window_seconds * 1000),
            owner=rec.owner,
            token=rec.token,
            last_failover_ms=rec.last_failover_ms,
            health=health,
            renewing=renewing,
            connected=self.alive(),
            primary_up_since_ms=rt.primary_up_since_ms,
            now_ms=now,
            primary_grace_over=time.monotonic() - self.started > self.cfg.failover.placement_grace_seconds,
            request=request,
            renewing_down_for_ms=now - rt.renewing_down_since_ms if rt.renewing_down_since_ms else 0,
            detection_ms=_detection_ms(svc),
            last_transition_ms=rec.last_transition_ms,
            failed_placements=rt.failed_placements,
            failed_ago_ms=int((time.monotonic() - rt.last_failed) * 1000),
            degraded=self.degraded,
        )

    # ---- zones ----

    def _note_health(self, service: str, host: str, t: Tally) -> None:
        per = self._seen_down.get(host)
        if t.majority_down:
            if per is None:
                per = self._seen_down[host] = {}
            if service not in per:
                per[service] = f"{service}'s observers see it down ({t.describe()})"
                self._zones_dirty = True
        elif per is not None and service in per:
            del per[service]
            if not per:
                del self._seen_down[host]
            self._zones_dirty = True

    def _update_zones(self) -> None:
        """Zone health from who is alive and which hosts the services' observers see down; an event when a
        zone becomes degraded or recovers. Only after the placement grace: before it, agents are still
        connecting and every zone would look down. A host is known down as fast as the first of: its
        service's health checks (0.8 s shipped, for a host some service targets), its agent's silence
        (heartbeat_timeout_seconds, 3 s shipped)."""
        if not self._zoned or time.monotonic() - self.started <= self.cfg.failover.placement_grace_seconds:
            return
        alive = self.alive()
        if alive == self._zones_alive and not self._zones_dirty:
            return
        self._zones_alive, self._zones_dirty = alive, False
        down = {h: "its agent is not heard from" for h in self._zoned if h not in alive}
        for h, per in self._seen_down.items():
            down.setdefault(h, next(iter(per.values())))
        pool = self.cfg.pool
        health = zone_health(self._zoned, down, pool.zone_degraded_share, pool.zone_degraded_min_hosts)
        was = {z.zone for z in self.zones if z.degraded}
        # Every replica judges the zones for its own decisions; one says so in the shared history: the one
        # leading the first service (one replica at a time leads a service), or the single controller.
        if not self._zone_judge or not self.not_leading(self._zone_judge):
            for z in health:
                if z.degraded and z.zone not in was:
                    self.events.record("zone-degraded", "", "", z.reason, zone=z.zone)
                elif not z.degraded and z.zone in was:
                    self.events.record("zone-recovered", "", "", f"zone {z.zone}: {z.reason}", zone=z.zone)
        changed = {z.zone for z in health if z.degraded} != was
        self.zones, self.degraded = health, degraded_hosts(health)
        if changed:
            self.on_zones_changed()

    def service_views(self) -> tuple[ServiceView, ...]:
        """Every service as the HA loop sees it now: owner, token, phase, each observer's view of each
        target (the read model's part that this loop owns)."""
        out = []
        for rt in self.services.values():
            svc = rt.cfg
            rec = self.orchestrator.service_state(svc.name)
            observers = tuple(
                ObserverView(observer, target, up, detail)
                for target in rt.targets()
                for observer, (up, detail) in self.views(rt, target).items()
            )
            out.append(
                ServiceView(
                    name=svc.name,
                    vip=svc.vip,
                    primary=svc.primary,
                    shadows=tuple(svc.shadows),
                    failback=svc.failback,
                    owner=rec.owner,
                    token=rec.token,
                    phase="transition" if rt.busy else rec.phase,
                    primary_healthy_since_ms=rt.primary_up_since_ms,
                    observers=observers,
                )
            )
        return tuple(out)

    def alive(self) -> frozenset[str]:
        """Hosts heard from within the heartbeat timeout. A tick asks this for every observer of every
        service, and the answer walks every connected host: computed once per tick (outside a tick, reused
        for ALIVE_REUSE_MS), it costs O(hosts) per tick instead of O(services x observers x hosts) (at
        2,000 hosts and 500 services, the difference between microseconds and most of a tick). Within a
        tick it is reused for TICK_ALIVE_REUSE_MS: at 2,000 hosts a tick outlasts ALIVE_REUSE_MS (the walk
        then ran a dozen times per tick), and a tick that a busy loop spreads over hundreds of milliseconds
        must not judge hosts by heartbeats that old (timeouts are half a second and more)."""
        now = now_ms()
        cached = self._alive
        reuse_ms = TICK_ALIVE_REUSE_MS if self._in_tick else ALIVE_REUSE_MS
        if cached is None or not 0 <= now - cached[0] <= reuse_ms:
            cached = self._alive = (
                now,
                self.registry.alive(now, int(self.cfg.failover.heartbeat_timeout_seconds * 1000)),
            )
        return cached[1]

    def views(self, rt: ServiceRuntime, target: str) -> dict[str, tuple[bool | None, str]]:
        """Each observer's view of `target`: (up, detail); up None = unknown."""
        out: dict[str, tuple[bool | None, str]] = {}
        alive, reports = self.alive(), self.board.health(rt.cfg.name, target)
        for o in rt.cfg.observer_names():
            if o == target:
                continue
            if o == "controller":
                out[o] = self._controller_view(rt.cfg.name, target)
            else:
                v = reports.get(o)
                out[o] = (v.up, v.detail) if v is not None and o in alive else (None, "no report")
        return out

    def _health(self, rt: ServiceRuntime, target: str) -> Tally:
        views = {o: up for o, (up, _) in self.views(rt, target).items() if up is not None}
        return tally(rt.cfg.observer_names(), views, exclude=target)

    def _controller_view(self, service: str, target: str) -> tuple[bool | None, str]:
        """The controller's own view: its health check, and the target agent's heartbeats."""
        tracker = self._checks.get((service, target))
        if tracker is None or tracker.up is None:
            return None, tracker.detail if tracker is not None else "no result yet"
        session = self.registry.get(target)
        silent_ms = now_ms() - session.last_heard_ms if session else None
        timeout = self.cfg.failover.heartbeat_timeout_seconds
        if session is None and time.monotonic() - self.started < timeout:
            # Just (re)started: agents have not reconnected yet, which says nothing about them. An agent
            # that is really gone is counted down one heartbeat timeout after this controller started.
            return None, "agent not connected yet (the controller just started)"
        if silent_ms is None or silent_ms > timeout * 1000:
            return False, "agent not connected" if session is None else f"agent silent for {silent_ms} ms"
        return tracker.up, tracker.detail

    def _renewing(self, rt: ServiceRuntime, rec: ServiceRecord) -> Tally:
        if not rec.owner or time.monotonic() - rt.stable_since < 2 * self.cfg.failover.lease_seconds:
            return Tally()  # too early after a transition to judge
        views: dict[str, bool] = {}
        alive = self.alive()
        for o in rt.cfg.observer_names():
            if o == "controller":
                v = self.observer.renewing(rt.cfg.name, rec.owner, rec.token)
                if v is not None:
                    views[o] = v
            elif o in alive:
                lv = self.board.lease(rt.cfg.name).get(o)
                if lv is not None and lv.up is not None and lv.target == rec.owner and lv.token == rec.token:
                    views[o] = lv.up
        return tally(rt.cfg.observer_names(), views, exclude=rec.owner)

    # ---- observers ----

    def _catch_up_observers(self, rt: ServiceRuntime) -> None:
        """Vote the current owner's token again at every observer agent that has not voted for it: one that
        restarted (a new instance), or one whose lease reports show an older token (it missed the vote).
        At most once a second per observer while it stays behind."""
        rec = self.orchestrator.service_state(rt.cfg.name)
        if not rec.owner or rec.phase != "stable":
            return
        alive, reports = self.alive(), self.board.lease(rt.cfg.name)
        now = time.monotonic()
        for o in self.cfg.lease_quorum(rt.cfg):
            session = self.registry.get(o)  # not connected(): a copy of every session, per service per tick
            if o == "controller" or session is None or o not in alive:
                continue
            key = (rt.cfg.name, o)
            asked = self._caught_up.get(key)
            report = reports.get(o)
            behind = report is not None and report.token < rec.token
            same = asked is not None and asked[:2] == (session.instance_id, rec.token)
            if same and asked is not None and (not behind or now - asked[2] < CATCH_UP_RETRY_SECONDS):
                continue
            self._caught_up[key] = (session.instance_id, rec.token, now)
            self._background(self._catch_up(rt.cfg, o, rec.token, rec.owner))

    async def _catch_up(self, svc: ServiceConfig, observer: str, token: int, owner: str) -> None:
        if await self.orchestrator.catch_up(svc, observer, token, owner):
            log.info("service %s: observer %s caught up to token %d (%s)", svc.name, observer, token, owner)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(coro))

    def on_observation(self, observer: str, o: apb.Observation) -> None:
        prev = self.board.put(observer, o)
        up = None if o.unknown else o.up
        if o.kind == "health" and (prev is None or prev.up != up) and not self.not_leading(o.service):
            # An observer that cannot check says why itself ("cannot check p1: ...").
            said = f"sees {o.target} {'up' if up else 'DOWN'}: " if up is not None else ""
            self.events.record(
                "health", o.service, o.target, f"{observer} {said}{o.detail}", observer=observer
            )

    def on_lease_event(self, host: str, e: apb.LeaseEvent) -> None:
        if e.what in ("lost", "released", "resumed") and not self.not_leading(e.service):
            self.events.record(f"lease-{e.what}", e.service, host, e.reason, token=e.token)

    def on_disconnect(self, host: str) -> None:
        self.board.forget_observer(host)
        self._watched.pop(host, None)
        self._told.pop(host, None)

    def _on_controller_probe(self, spec: CheckSpec, tracker: Tracker, changed: bool) -> None:
        self._checks[(spec.service, spec.target)] = tracker
        if changed and not self.not_leading(spec.service):  # replicas: the leader's view is the one recorded
            self.events.record(
                "health",
                spec.service,
                spec.target,
                f"controller sees {spec.target} {'up' if tracker.up else 'DOWN'}: {tracker.detail}",
                observer="controller",
            )

    def _check_spec(self, svc: ServiceConfig, target: str) -> CheckSpec:
        h = svc.health
        return CheckSpec(
            service=svc.name,
            target=target,
            address=self.cfg.host_entry(target).address,
            kind=h.kind,
            port=h.port,
            path=h.path,
            expect_status=h.expect_status,
            check=h.check,
            interval=h.interval_seconds,
            timeout=h.timeout_seconds,
            fall=h.fall,
            rise=h.rise,
        )

    def watch_for(self, host: str) -> apb.Watch:
        checks, observed = [], []
        for rt in self._seated.get(host, ()):
            observed.append(rt.cfg.name)
            if host not in rt.cfg.observer_names():
                continue  # a lease witness: it checks nothing
            for target in rt.targets():
                if target == host:
                    continue
                checks.append(spec_to_proto(self._check_spec(rt.cfg, target)))
        return apb.Watch(
            checks=checks, observed_services=observed, lease_ms=int(self.cfg.failover.lease_seconds * 1000)
        )

    def _push_watch(self, host: str, session: AgentSession) -> None:
        """A new stream's Watch (the tick asks it only of streams not yet told): the checks its agent runs
        and the services whose leases it observes."""
        if self.registry.get(host) is not session:
            return  # the stream ended since the tick began (its successor: the next tick)
        watch = self.watch_for(host)
        if not watch.observed_services:
            self._watched[host] = session.instance_id  # observes nothing: nothing to say
            return
        with contextlib.suppress(Exception):
            if self.registry.send(host, apb.Command(watch=watch)):
                self._watched[host] = session.instance_id


def controller_lease_observer(cfg: ControllerConfig, store: Store) -> LeaseObserver:
    """The controller as one of its services' observers. Its promises (tokens voted for) survive restarts in
    the store; its grants do not, which the start-up grace of `shadowplane.lease` covers."""
    observer = LeaseObserver("controller", cfg.failover.lease_seconds)
    observer.observe(s.name for s in cfg.service)
    for svc in cfg.service:
        rec = store.service_state(svc.name)
        if rec is not None:
            observer.restore(svc.name, rec.token, rec.candidate if rec.phase == "acquiring" else rec.owner)
    return observer


def _detection_ms(svc: ServiceConfig) -> int:
    h = svc.health
    return int(detection_seconds(h.fall, h.interval_seconds, h.timeout_seconds) * 1000)

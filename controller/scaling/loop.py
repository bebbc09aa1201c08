"""The scaling cycle: once per forecast step (the model's own step, 300 s for the packaged model), forecast
every service's demand in one batch from the history on that step, plan each shadow's limits with the
planner's one path (controller/scaling/planner.py, which `shadowctl backtest` replays), send them to the
shadows' agents, and record every decision with what the kernel then reports. Between steps the loop still
wakes every interval: new shadows, overrides, lost limits and memory in use are acted on at once, but the
rule moves a limit only once per step, as the backtest scores it.

An agent that cannot be reached keeps its last limits (the agent fails static); the controller marks that
shadow not ready instead of pretending it was resized.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from controller import telemetry_schema as schema
from controller.config import ControllerConfig, ServiceConfig
from controller.event_log import EventLog
from controller.predict.allocation import AllocationState
from controller.predict.engine import Forecast, PredictionEngine, judge_in_child, lower_priority
from controller.predict.model import DEFAULT_MODEL, OnnxForecaster, load_model_bytes
from controller.predict.series import SeriesBatch, series_from_store
from controller.predict.step_history import StepHistory
from controller.registry import AgentRegistry, CommandError
from controller.scaling.decision import IN_PLACE, AppliedLimits, Readiness, ScalingDecision, held
from controller.scaling.planner import (
    RESOURCES,
    ShadowNow,
    Sizing,
    Target,
    decide_resource,
    forecast_target,
    io_weight,
    recent_changes,
    tier_sizing,
)
from controller.status import DemandView, ForecastView, ScalingView, ShadowView
from controller.store import ServiceRecord, Store
from controller.store.worker import StoreWorker
from shadowplane.clock import now_ms
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb

log = logging.getLogger(__name__)
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ServiceForecast:
    """One service's demand forecast from the last complete step."""

    key: str  # whose demand: "host/workload"
    origin_s: float  # end of the last complete step, unix seconds
    quantiles: tuple[float, ...]
    curves: dict[str, F64]  # resource -> (horizon, quantiles)
    last: dict[str, float]  # resource -> the demand in that step (NaN: unknown)
    source: str


# Kept in each stored decision's forecast record, for `ScalingLoop.restore`.
MISS_LOG_PRICE, RULED_STEP, CHANGED_STEP = "miss_log_price", "ruled_step_s", "changed_step_s"
CHANGES_PREFIX = "change_in_day_s_"  # + 0, 1, ...: the steps of the day's changes (the change budget)

# How long one slice of a cycle's planning holds the event loop before renewals and timers get their turn,
# and how many decisions one store write takes (1,000 in one transaction were a stall of their own)
PLAN_SLICE_SECONDS = 0.002
DECISIONS_PER_WRITE = 100


def settle_seconds(step_seconds: float) -> float:
    """How long after a step ends its last samples are waited for (agents send batches every few seconds)."""
    return min(10.0, step_seconds / 5)


def forecast_from(
    history: StepHistory, engine: PredictionEngine, until_ms: int, keys: list[str]
) -> tuple[SeriesBatch, Forecast | None]:
    """A cycle's forecast: the workloads' history up to the step holding `until_ms`, cut from memory, and
    the engine's one batched forecast of it (None when none of them has history yet)."""
    # The model takes one grid step for one of its own (a compressed lab day is still 288 steps).
    h = history.batch(until_ms, keys)
    b = replace(h, step_seconds=engine.step_seconds, grid_seconds=history.step_seconds)
    return b, engine.forecast(b) if b.keys else None


class ScalingLoop:
    def __init__(
        self,
        cfg: ControllerConfig,
        store: Store,
        registry: AgentRegistry,
        events: EventLog,
        engine: PredictionEngine | None = None,
        worker: StoreWorker | None = None,
        not_leading: Callable[[str], str] = lambda service: "",
        records: Callable[[str], ServiceRecord | None] | None = None,
    ) -> None:
        self.cfg, self.store, self.registry, self.events = cfg, store, registry, events
        # Replicas: why this one may not scale now ("" while it leads; always "" alone)
        self.not_leading = not_leading
        self.last_cycle_seconds = self.max_cycle_seconds = 0.0
        # Who owns each service (whose demand sizes the shadows): the store's records, or the replicas'
        # copy of etcd's
        self.service_state = records or store.service_state
        # History reads and forecasts run here, off the event loop (controller/store/worker.py).
        self.worker = worker or StoreWorker(store)
        self.engine = engine or PredictionEngine(cfg.scaling.model or DEFAULT_MODEL)
        self.policy = cfg.scaling.allocation_policy()
        # per shadow resource (host, workload, resource): the calibration state and the step's target
        self.states: dict[tuple[str, str, str], AllocationState] = {}
        self.shadow_targets: dict[tuple[str, str, str], Target] = {}
        self.ruled_origin: dict[tuple[str, str], float] = {}  # shadow -> the step its rule last ran for
        self.changed_at: dict[tuple[str, str, str], float] = {}  # shadow resource -> step of its last change
        self.changes: dict[tuple[str, str, str], tuple[float, ...]] = {}  # -> steps of its changes in a day
        self.forecasts: dict[str, ServiceForecast] = {}
        self.targets: dict[str, dict[str, Target]] = {}  # service -> resource -> target (shown)
        self.demand: dict[str, str] = {}  # service -> "host/workload" whose forecast drives it
        self.applied: dict[tuple[str, str], AppliedLimits] = {}
        self.readiness: dict[tuple[str, str], Readiness] = {}
        # the tiers (docs/pool.md): how each shadow is sized now, and the hosts of degraded zones (the HA
        # loop's zone health, wired in by the server) that pre-warm a cold tier's shadows
        self.sizing: dict[tuple[str, str], Sizing] = {}
        self.degraded_hosts: Callable[[], Mapping[str, str]] = dict
        # service -> the shadow a takeover raised (before_takeover), until the records say who owns it: a
        # cycle in between must not take a cold shadow back to the floor as it takes the traffic
        self.takeovers: dict[str, str] = {}
        self.reapplied_seen: dict[tuple[str, str], int] = {}  # the agent's limits_reapplied, last seen
        self.next_cycle_ms = 0
        self._model_mtime: float | None = None
        # The forecast's input, on its step, fed by ingest (`on_telemetry`) from the start; seeded from the
        # store before the first forecast (batches arriving meanwhile are held, none counts twice).
        self.history = self._new_history()
        self._seeded = False
        self._restored = False
        self.led: frozenset[str] = frozenset()  # the services this replica scaled in its last cycle
        # While a cycle plans (in slices, the loop free between them) a preview (`plan`) must not run a
        # step's rules itself: the cycle would then find them run and hold, and the step's change would
        # never be applied. A preview then gets the last complete plan.
        self._planning = False
        self._last_plan: list[ScalingDecision] = []
        self.wake = asyncio.Event()

    @property
    def step_seconds(self) -> float:
        """Real seconds per forecast step: the model's own unless the lab compresses time."""
        return self.cfg.scaling.forecast_step_seconds or float(self.engine.step_seconds)

    @property
    def time_compression(self) -> float:
        """Model seconds per real second: 1 in production, more in a lab that compresses time."""
        return self.engine.step_seconds / self.step_seconds

    def last_complete_step(self, now: int) -> float:
        """End (unix seconds) of the newest step whose samples have all arrived."""
        step = self.step_seconds
        return math.floor((now / 1000 - settle_seconds(step)) / step) * step

    # ---- the loop ----

    async def run(self) -> None:
        interval = self.cfg.scaling.interval_seconds
        while True:
            # every interval, and just after each step ends: the limit for a step is set as it begins
            step = self.step_seconds
            next_step_ms = int((self.last_complete_step(now_ms()) + step + settle_seconds(step)) * 1000)
            self.next_cycle_ms = min(now_ms() + int(interval * 1000), next_step_ms + 1)
            # Cleared before the cycle, not after: an override stored while a cycle runs (the cycle awaits
            # agents and threads) wakes the next one instead of waiting a whole interval.
            self.wake.clear()
            try:
                t0 = time.monotonic()
                await self.cycle()
                self.last_cycle_seconds = time.monotonic() - t0
                self.max_cycle_seconds = max(self.max_cycle_seconds, self.last_cycle_seconds)
            except Exception:  # a bad cycle is logged; the next one starts from scratch
                log.exception("scaling cycle failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(0.0, (self.next_cycle_ms - now_ms()) / 1000))

    async def cycle(self, now: int | None = None) -> list[ScalingDecision]:
        """One cycle at `now` (unix ms; default: the clock), for the services this replica leads."""
        led = frozenset(s.name for s in self.cfg.service if not self.not_leading(s.name))
        # Another replica scaled the services this one leads anew: it restores them from the decisions the
        # others made (copied into its store by the journal), as after a restart; the others keep theirs.
        fresh = led - self.led if self._restored else led
        self.led = led
        if not led and self.cfg.service:
            return []  # another replica scales every service
        await self.consider_new_model()
        if fresh or not self._restored:
            # a window query over every stored decision: the worker reads it, off the event loop
            latest = await self.worker.run(lambda store: store.decisions(last=1))
            self.restore([d for d in latest if d.service in fresh or not self.cfg.service])
        await self.forecast(now or now_ms())
        planned: list[ScalingDecision] = []
        self._planning = True
        try:
            for _ in self._plan_slices(now or now_ms(), planned):
                await asyncio.sleep(0)  # renewals, heartbeats and the HA loop run between the slices
            self._last_plan = planned
        finally:
            self._planning = False
        by_shadow: dict[tuple[str, str], list[ScalingDecision]] = {}
        for d in planned:
            by_shadow.setdefault((d.host, d.workload), []).append(d)
        done = await asyncio.gather(*(self._apply(k, ds) for k, ds in by_shadow.items()))
        decided = [d for ds in done for d in ds]
        stored: list[ScalingDecision] = []
        for i in range(0, len(decided), DECISIONS_PER_WRITE):
            if i:
                await asyncio.sleep(0)
            stored += self.store.add_decisions(decided[i : i + DECISIONS_PER_WRITE])
        for d in stored:
            if d.result.startswith("failed") or (d.result == "applied" and d.changed):
                unit = "cores" if d.resource == "cpu" else "bytes"
                self.events.record(
                    "scale",
                    d.service,
                    d.host,
                    f"{d.workload} {d.resource} {d.old:.6g} -> {d.new:.6g} {unit} ({d.branch}"
                    f"{', ' + d.clamps if d.clamps else ''}; predicted {d.predicted:.6g}): {d.result}",
                    decision=d.id,
                )
        return stored

    # ---- the model ----

    async def consider_new_model(self) -> None:
        """A model file that changed (e.g. `shadowctl train --store ... --out` onto it) is a challenger: it
        replaces the running model only if it forecasts the last day of this fleet better. Reading that day
        (the store worker) and backtesting both models (a child process) take seconds: off the event loop;
        only the swap happens on it."""
        path = Path(self.cfg.scaling.model or DEFAULT_MODEL)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return
        if self._model_mtime is None or mtime == self._model_mtime:
            self._model_mtime = mtime
            return
        self._model_mtime = mtime
        since_ms = now_ms() - 24 * 3600 * 1000
        step = self.engine.step_seconds
        recent = await self.worker.run(
            lambda store: series_from_store(store.resource_series(since_ms=since_ms), step)
        )
        champion = self.engine.forecaster
        running = champion.model_bytes if isinstance(champion, OnnxForecaster) else None
        # A process, not a thread: loading models and featurising hold the GIL for tens of milliseconds at
        # a time, which a thread would take from the loop. Spawned (not forked: gRPC's threads), niced.
        pool = ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=lower_priority
        )
        try:
            d, promoted = await asyncio.get_running_loop().run_in_executor(
                pool,
                judge_in_child,
                running,
                self.engine.model_version,
                str(path),
                recent,
                {s.name: since_ms / 1000 for s in recent},
            )
        finally:
            pool.shutdown(wait=False)
        if promoted is not None:
            threads = self.engine.threads
            self.engine.adopt(await self.worker.run(lambda _: load_model_bytes(promoted, path, threads)))
        self.events.record("model", "", "", f"champion/challenger: {d.reason}", promoted=d.promote)

    # ---- history ----

    def _grid(self) -> tuple[float, int, int]:
        """(real seconds per step, steps the model reads, steps of signals it reads)."""
        return self.step_seconds, self.engine.history_steps, self.engine.forecaster.spec.window

    def _new_history(self) -> StepHistory:
        h = StepHistory(*self._grid())
        h.begin_seed()
        return h

    def on_telemetry(self, host: str, instance_id: str, batch: apb.TelemetryBatch, now: int) -> None:
        """A batch the store has just accepted at `now` (ingest calls this on the event loop)."""
        self.history.add_batch(host, instance_id, batch, now)

    async def _history(self, now: int, first: list[str]) -> StepHistory:
        """The history on the model's grid, seeded from the store once (at start, and when a new model
        reads another grid): a restart or a new model does not forget. Reading and binning a day for the
        fleet takes seconds at thousands of workloads: the store worker does it. The workloads `first`
        (those each cycle forecasts) take the first rows, so cutting them is a view."""
        h = self.history
        grid = (h.step_seconds, h.steps, h.signal_steps)
        if grid != self._grid():
            log.info("forecast grid %s -> %s: history seeded again from the store", grid, self._grid())
            h = self.history = self._new_history()
            self._seeded = False
        if not self._seeded:
            since = h.seed_since_ms(now)

            def load(store: Store) -> dict[tuple[str, str], int]:
                aggregates, seqs = store.step_aggregates(since, h.step_ms)
                h.load(aggregates, now, first)
                return seqs

            try:
                seqs = await self.worker.run(load)
            except BaseException:
                # Start over next cycle: every batch held so far is in the store, so the next seed has it.
                self.history = self._new_history()
                raise
            h.end_seed(seqs)
            self._seeded = True
            log.info("forecast history seeded from the store: %d workloads", len(h.rows))
        return h

    # ---- forecasting ----

    async def forecast(self, now_ms: int) -> None:
        """Once per step: one batched forecast of every service's demand from the history on the model's step
        (as long as the model's lags and day-ago features need), ending with the last complete step. Reading
        the history and featurising it take from milliseconds to seconds with the fleet's size: the store
        worker does them, off the event loop."""
        self._pick_demand()
        if not self.demand:
            return
        origin = self.last_complete_step(now_ms)
        fresh = [
            (f := self.forecasts.get(svc)) is not None and f.origin_s >= origin and f.key == key
            for svc, key in self.demand.items()
        ]
        if all(fresh):
            return
        keys = sorted(set(self.demand.values()))  # only the workloads whose demand sizes a shadow
        history = await self._history(now_ms, keys)
        until = int(origin * 1000)
        # Forecasting takes tens of milliseconds for a big fleet, and every SPARE_STEPS steps the history's
        # window moves (a copy of the whole fleet's history): the niced worker thread does both
        # (worker.py), ingest holding its batches during a move instead of the event loop waiting.
        move = history.needs_move(now_ms)

        def run(_: Store) -> tuple[SeriesBatch, Forecast | None]:
            if move:
                history.move_ahead(now_ms)
            return forecast_from(history, self.engine, until, keys)

        if move:
            history.hold()
        try:
            batch, fc = await self.worker.run(run)
        finally:
            if move:
                history.release()
        if fc is None:
            return
        source = fc.source if not fc.reason else f"{fc.source} ({fc.reason})"
        index = {k: i for i, k in enumerate(batch.keys)}
        for service, key in self.demand.items():
            if key not in index:
                continue
            i = index[key]
            self.forecasts[service] = ServiceForecast(
                key=key,
                origin_s=origin,
                quantiles=fc.quantiles,
                curves={r: fc.curve(key, r) for r in batch.resources},
                last={r: float(batch.values[i, j, -1]) for j, r in enumerate(batch.resources)},
                source=source,
            )

    def _pick_demand(self) -> None:
        """Whose demand sizes each service's shadows: the primary's, or the owner's while a shadow serves."""
        self.demand = {}
        for svc in self.cfg.service:
            if self.not_leading(svc.name):
                continue  # another replica scales it
            rec = self.service_state(svc.name)
            host = rec.owner if rec is not None and rec.owner in svc.shadows else svc.primary
            workload = self.workload_of(host, svc.name)
            if workload:
                self.demand[svc.name] = f"{host}/{workload}"

    def demand_peaks(self, q: float) -> dict[str, tuple[float, int]]:
        """Each forecast service's demand for the resource pool: quantile `q` of its last forecast (between
        the model's quantiles, linearly), at its peak over the model's horizon: (cores, bytes)."""
        out = {}
        for service, fc in self.forecasts.items():
            peaks = []
            for resource in ("cpu", "memory"):
                curve = fc.curves.get(resource)
                if curve is None or not len(curve):
                    break
                at_q = [float(np.interp(q, fc.quantiles, row)) for row in np.asarray(curve)]
                peaks.append(max(0.0, max(at_q)))
            if len(peaks) == 2 and all(math.isfinite(v) for v in peaks):
                out[service] = (peaks[0], int(peaks[1]))
        return out

    # ---- planning ----

    def plan(self, now_ms: int) -> list[ScalingDecision]:
        """Decisions for every shadow of every service (nothing applied). A shadow whose rule has not run for
        the newest forecast step gets its step now: calibration on the limit it had, target, rule; the
        others only their bounds and overrides. While a cycle is planning: that cycle's last complete plan
        (see `_planning`)."""
        if self._planning:
            return list(self._last_plan)
        out: list[ScalingDecision] = []
        for _ in self._plan_slices(now_ms, out):
            pass
        return out

    def _plan_slices(self, now_ms: int, out: list[ScalingDecision]) -> Iterator[None]:
        """`plan` into `out`, pausing (a yield) whenever a slice has held the loop PLAN_SLICE_SECONDS: a
        step's rules for 1,000 shadow resources take 100 ms and more, a stall of every renewal on the
        loop. Each service is planned whole within one slice."""
        overrides = self.store.overrides()
        degraded = self.degraded_hosts()
        slice_ends = time.perf_counter() + PLAN_SLICE_SECONDS
        for svc in list(self.cfg.service):
            if time.perf_counter() > slice_ends:
                yield  # before the next service: planned whole, one at a time
                slice_ends = time.perf_counter() + PLAN_SLICE_SECONDS
            fc = self.forecasts.get(svc.name)
            if fc is None or self.not_leading(svc.name):
                continue
            shown = self.targets.setdefault(svc.name, {})
            if "io" in fc.curves:
                shown["io"] = self._io_target(svc.name, fc)
            rec = self.service_state(svc.name)
            owner = rec.owner if rec is not None else ""
            if owner and owner == self.takeovers.get(svc.name):
                del self.takeovers[svc.name]  # the records have it now
            for host in svc.shadows:
                s = self._shadow_now(svc, host)
                if s is None:
                    self.readiness[(host, "")] = Readiness(
                        False, f"no workload of service {svc.name} on {host}"
                    )
                    continue
                serving = host in (owner, self.takeovers.get(svc.name))
                sizing = tier_sizing(svc.tier, serving, degraded.get(svc.primary, ""))
                was = self.sizing.get((host, s.workload))
                flipped = was is not None and was.warm != sizing.warm
                if flipped and self._planning:  # a cycle's, not an operator's preview (`plan`)
                    self.events.record("scale", svc.name, host, f"{s.workload}: {sizing.reason}")
                # A shadow that starts or stops being warm is ruled at once, not at the next step: a
                # pre-warm is for a failure that may come before it.
                due = self.ruled_origin.get((host, s.workload), -math.inf) < fc.origin_s or flipped
                for resource in RESOURCES:
                    if resource not in fc.curves:
                        continue
                    key = (host, s.workload, resource)
                    current = s.cpu_cores if resource == "cpu" else float(s.memory_bytes)
                    if due or key not in self.shadow_targets:
                        # Calibration learns only from a limit that was meant to hold the demand: not from
                        # a cold shadow's floor, nor from the step its sizing changed.
                        value, forecast, state = forecast_target(
                            fc.curves[resource],
                            fc.quantiles,
                            self.states.get(key, AllocationState.initial(self.policy)),
                            fc.last[resource],
                            current if sizing.warm and not flipped else 0.0,
                            self.policy,
                        )
                        self.states[key] = state
                        self.shadow_targets[key] = Target(value, forecast, fc.source)
                    target = self.shadow_targets[key]
                    shown[resource] = target  # the forecast's: a takeover raises a cold shadow to it
                    if not sizing.warm:
                        floor = (
                            self.cfg.scaling.cpu_floor_cores
                            if resource == "cpu"
                            else float(self.cfg.scaling.memory_floor_bytes)
                        )
                        target = Target(floor, {**target.forecast, "target": floor}, target.source)
                    changes = recent_changes(self.changes.get(key, ()), fc.origin_s, self.time_compression)
                    out.append(
                        decide_resource(
                            self.cfg.scaling,
                            s,
                            resource,
                            self.demand.get(svc.name, ""),
                            target,
                            overrides.get((host, s.workload)),
                            now_ms,
                            # a cold shadow keeps room for what it holds itself, not for the demand's
                            last_demand=fc.last[resource] if sizing.warm else math.nan,
                            due=due,
                            # in the model's time: a lab that compresses time holds limits as long in steps
                            since_change_s=(fc.origin_s - self.changed_at.get(key, -math.inf))
                            * self.time_compression,
                            changes_in_day=len(changes),
                        )
                    )
                    if out[-1].new != out[-1].old:
                        self.changed_at[key] = fc.origin_s
                        changes = (*changes, fc.origin_s)
                    self.changes[key] = changes
                    # what a restarted controller needs to go on as this one would (`restore`)
                    kept = {MISS_LOG_PRICE: self.states[key].log_price, RULED_STEP: fc.origin_s}
                    if key in self.changed_at:
                        kept[CHANGED_STEP] = self.changed_at[key]
                    kept.update({f"{CHANGES_PREFIX}{i}": t for i, t in enumerate(changes)})
                    out[-1] = replace(out[-1], forecast={**out[-1].forecast, **kept})
                    if svc.tier == "cold":  # why this shadow is sized as it is, in the decision's record
                        out[-1] = replace(
                            out[-1], clamps=", ".join(c for c in (out[-1].clamps, sizing.reason) if c)
                        )
                self.ruled_origin[(host, s.workload)] = fc.origin_s
                if self._planning:
                    self.sizing[(host, s.workload)] = sizing

    def restore(self, latest: list[ScalingDecision]) -> None:
        """Once, before the first plan: each shadow resource's calibration (its miss price), the step its
        rule last ran for with the target it chose then, and when its limit changed (the lower hold, the
        change budget),
        from its latest stored decision (`latest`: `Store.decisions(last=1)`). A restart (a package
        upgrade) neither forgets what calibration learned nor lets a held limit drop at once, nor runs a
        step's rule twice."""
        for d in latest:
            f, key = d.forecast, (d.host, d.workload, d.resource)
            if MISS_LOG_PRICE not in f:
                continue  # recorded by an older controller
            self.states[key] = replace(AllocationState.initial(self.policy), log_price=f[MISS_LOG_PRICE])
            if CHANGED_STEP in f:
                self.changed_at[key] = f[CHANGED_STEP]
            self.changes[key] = tuple(sorted(v for k, v in f.items() if k.startswith(CHANGES_PREFIX)))
            shadow = (d.host, d.workload)
            if f[RULED_STEP] >= self.ruled_origin.get(shadow, -math.inf):
                self.ruled_origin[shadow] = f[RULED_STEP]
            recorded = {
                k: v
                for k, v in f.items()
                if k not in (MISS_LOG_PRICE, RULED_STEP, CHANGED_STEP) and not k.startswith(CHANGES_PREFIX)
            }
            self.shadow_targets[key] = Target(d.predicted, recorded, d.forecast_source)
        self._restored = True

    def _io_target(self, service: str, fc: ServiceForecast) -> Target:
        """The I/O weight's target: a weight has no limit to calibrate against, so against its own pick."""
        key = ("", service, "io")
        state = self.states.get(key, AllocationState.initial(self.policy))
        if key in self.shadow_targets and state.allocation is not None:
            prev = self.shadow_targets[key]
            if prev.forecast.get("origin") == fc.origin_s:
                return prev
        value, forecast, state = forecast_target(
            fc.curves["io"], fc.quantiles, state, fc.last["io"], state.allocation or 0.0, self.policy
        )
        self.states[key] = state
        t = Target(value, {**forecast, "origin": fc.origin_s}, fc.source)
        self.shadow_targets[key] = t
        return t

    def _hello(self, host: str) -> apb.Hello | None:
        """What the host's agent said when it connected: now, or at its last connection (the store)."""
        session = self.registry.get(host)
        if session is not None:
            return session.hello
        last = self.store.agent(host)
        return last.hello if last is not None else None

    def workload_of(self, host: str, service: str) -> str:
        hello = self._hello(host)
        for w in hello.workloads if hello is not None else ():
            if w.service == service:
                return w.name
        return ""

    def _shadow_now(self, svc: ServiceConfig, host: str) -> ShadowNow | None:
        workload = self.workload_of(host, svc.name)
        if not workload:
            return None
        applied = self.applied.get((host, workload))
        rows = self.store.samples(host, workload, limit=1)
        sample = rows[-1][1] if rows else tpb.WorkloadSample()
        hello = self._hello(host)
        info = hello.host_info if hello is not None else apb.HostInfo()
        if applied is not None:
            cpu, mem, in_use = applied.cpu_cores, applied.memory_bytes, applied.memory_in_use_bytes
        else:
            r = sample.resources
            cpu, mem, in_use = r.cpu_limit_cores, r.memory_limit_bytes, r.memory_bytes
        return ShadowNow(
            svc.name,
            host,
            workload,
            cpu,
            mem,
            max(in_use, sample.resources.memory_bytes),
            float(info.cpu_cores),
            int(info.memory_bytes),
        )

    # ---- applying ----

    async def _apply(self, key: tuple[str, str], ds: list[ScalingDecision]) -> list[ScalingDecision]:
        """Send one shadow's planned limits to its agent; the decisions with how that went."""
        host, workload = key
        if any(self.not_leading(d.service) for d in ds):
            # handed to another replica since the plan (this cycle awaited agents and threads)
            return [replace(d, result="failed: this replica no longer acts for the service") for d in ds]
        if not any(d.changed for d in ds) and key in self.applied:
            rows = self.store.samples(host, workload, limit=1)
            newest = rows[-1][1] if rows else None
            if newest is not None:
                self._note_reapplied(key, newest.resources.limits_reapplied)
            now = held(self.applied[key], newest)
            if now.ready:
                self.readiness[key] = now
                return [replace(d, result="unchanged", applied=d.old) for d in ds]
            # The kernel lost them and the agent could not write them again: ask once more (its answer, read
            # back from the kernel, decides readiness again).
            self._not_ready(key, now.reason)
        cpu = next((d.new for d in ds if d.resource == "cpu"), 0.0)
        mem = next((d.new for d in ds if d.resource == "memory"), 0.0)
        service = ds[0].service
        io = self.targets.get(service, {}).get("io")
        msg = apb.SetLimits(
            workload=workload,
            cpu_cores=cpu,
            memory_bytes=int(mem),
            io_weight=io_weight(io.predicted) if io is not None and self.cfg.scaling.io_weight else 0,
        )
        result = await self._send(host, msg)
        if isinstance(result, str):
            return [replace(d, result=f"failed: {result}", applied=d.old) for d in ds]
        return [
            replace(
                d,
                result="applied",
                applied=result.cpu_cores if d.resource == "cpu" else float(result.memory_bytes),
            )
            for d in ds
        ]

    async def _send(self, host: str, msg: apb.SetLimits) -> AppliedLimits | str:
        key = (host, msg.workload)
        try:
            r = await self.registry.call(
                host, apb.Command(set_limits=msg), self.cfg.scaling.command_timeout_seconds
            )
        except CommandError as e:
            self._not_ready(key, f"agent unreachable, limits not applied: {e}")
            return str(e)
        if not r.ok:
            self._not_ready(key, f"agent could not apply limits: {r.error}")
            return r.error
        limits = AppliedLimits(
            r.limits.cpu_cores,
            r.limits.memory_bytes,
            r.limits.io_weight,
            r.limits.memory_in_use_bytes,
            at_ms=now_ms(),
        )
        self.applied[key] = limits
        if not self.readiness.get(key, IN_PLACE).ready:
            self.events.record("shadow-ready", "", host, f"{msg.workload}: limits applied again")
        self.readiness[key] = IN_PLACE
        return limits

    def _note_reapplied(self, key: tuple[str, str], count: int) -> None:
        """An event when the shadow's agent wrote its limits again since the last look (its count is
        cumulative per agent run: lower means it restarted)."""
        seen = self.reapplied_seen.get(key)
        self.reapplied_seen[key] = count
        if seen is not None and count > seen:
            self.events.record(
                "shadow-limits-reapplied",
                "",
                key[0],
                f"{key[1]}: the kernel had lost its limits (reset e.g. by `systemctl daemon-reload`); the "
                f"agent applied them again ({count - seen} time{'s' if count - seen > 1 else ''})",
            )

    def _not_ready(self, key: tuple[str, str], reason: str) -> None:
        was = self.readiness.get(key)
        self.readiness[key] = Readiness(False, reason)
        if was is None or was.ready:
            self.events.record("shadow-not-ready", "", key[0], f"{key[1]}: {reason}")

    # ---- the status view ----

    def status(self, now: int) -> ScalingView:
        """Forecasts, fresh demand and every shadow's readiness and limits, for the Fleet API and /metrics."""
        forecasts = tuple(
            ForecastView(
                service,
                resource,
                {float(k[1:]): v for k, v in t.forecast.items() if k.startswith("q")},
                t.predicted,
            )
            for service, targets in self.targets.items()
            for resource, t in targets.items()
        )
        shadows = []
        for svc in self.cfg.service:
            for host in svc.shadows:
                w = self.workload_of(host, svc.name)
                rd = self.readiness.get((host, w))
                applied = self.applied.get((host, w))
                shadows.append(
                    ShadowView(
                        service=svc.name,
                        host=host,
                        workload=w,
                        ready=bool(rd and rd.ready),
                        reason=rd.reason if rd else "not sized yet",
                        cpu_cores=applied.cpu_cores if applied else None,
                        memory_bytes=applied.memory_bytes if applied else None,
                    )
                )
        return ScalingView(
            model_source=self.engine.source,
            model_version=self.engine.model_version,
            next_cycle_ms=self.next_cycle_ms,
            forecasts=forecasts,
            demand=tuple(d for d in (self._demand(s, k, now) for s, k in self.demand.items()) if d),
            shadows=tuple(shadows),
            last_cycle_seconds=self.last_cycle_seconds,
            max_cycle_seconds=self.max_cycle_seconds,
        )

    def _demand(self, service: str, key: str, now: int) -> DemandView | None:
        """The latest sample of the workload that drives the service's forecast; None once it is as stale
        as the fleet view calls a host (a silent agent's last sample is not today's demand)."""
        host, _, workload = key.partition("/")
        rows = self.store.samples(host, workload, limit=1)
        if not rows:
            return None
        smp = rows[-1][1]
        if now - smp.end_unix_ms > self.cfg.stale_after_intervals * (smp.end_unix_ms - smp.start_unix_ms):
            return None
        return DemandView(service, key, schema.named("cpu").of(smp), schema.named("memory").of(smp))

    # ---- failover callbacks ----

    async def before_takeover(self, svc: ServiceConfig, host: str) -> None:
        """Raise the new owner's limits to the demand's forecast before it takes the traffic."""
        self.takeovers[svc.name] = host
        targets = self.targets.get(svc.name)
        s = self._shadow_now(svc, host)
        if not targets or s is None:
            self.events.record(
                "scale", svc.name, host, "takeover without a forecast: limits left as they are"
            )
            return
        cpu = max(s.cpu_cores, targets["cpu"].predicted) if "cpu" in targets else s.cpu_cores
        mem = (
            max(float(s.memory_bytes), targets["memory"].predicted) if "memory" in targets else s.memory_bytes
        )
        if not s.cpu_cores:
            cpu = 0.0  # no limit stays no limit: raising means never lowering
        result = await self._send(
            host,
            apb.SetLimits(workload=s.workload, cpu_cores=cpu, memory_bytes=int(mem) if s.memory_bytes else 0),
        )
        what = (
            result
            if isinstance(result, str)
            else f"cpu {result.cpu_cores:.3g} cores, memory {result.memory_bytes}"
        )
        self.events.record("scale", svc.name, host, f"takeover: {s.workload} raised to the forecast: {what}")

    async def after_release(self, svc: ServiceConfig, host: str) -> None:
        """The old owner goes back to the plan: plan again now rather than at the next interval."""
        if self.takeovers.get(svc.name) == host:
            del self.takeovers[svc.name]
        self.wake.set()

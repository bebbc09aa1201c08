"""The controller's /metrics: fleet and stream health, each service's owner, token, observers and
transitions, and the scaling loop's forecast vs actual demand and each shadow's allocation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from controller.store import EventRecord
from shadowplane.clock import now_ms

if TYPE_CHECKING:
    from controller.server import Controller

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TRANSITIONS = ("failover", "failback", "move", "place", "reacquire")


class EventCounters:
    """Counts events as they are recorded (an EventLog listener)."""

    def __init__(self) -> None:
        self.by_kind: Counter[str] = Counter()
        self.transitions: Counter[tuple[str, str]] = Counter()
        self.durations: dict[str, list[int]] = {}  # service -> bucket counts (+Inf last)
        self.duration_sums: dict[str, float] = {}

    def __call__(self, e: EventRecord) -> None:
        self.by_kind[e.kind] += 1
        kind = e.kind.removesuffix("-complete")
        if e.kind.endswith("-complete") and kind in TRANSITIONS:
            self.transitions[(e.service, kind)] += 1
            seconds = int(e.detail.get("took_ms", "0")) / 1000
            counts = self.durations.setdefault(e.service, [0] * (len(DURATION_BUCKETS) + 1))
            for i, le in enumerate(DURATION_BUCKETS):
                if seconds <= le:
                    counts[i] += 1
            counts[-1] += 1
            self.duration_sums[e.service] = self.duration_sums.get(e.service, 0.0) + seconds


class ControllerCollector(Collector):
    def __init__(self, c: Controller, counters: EventCounters) -> None:
        self.c, self.counters = c, counters

    def collect(self) -> Iterator[Metric]:
        c, now = self.c, now_ms()
        yield GaugeMetricFamily(
            "shadowplane_controller_agents_connected",
            "Agents with a live stream",
            value=len(c.registry.connected()),
        )
        seen = GaugeMetricFamily(
            "shadowplane_controller_agent_last_seen_seconds",
            "Seconds since each agent was last heard",
            labels=["host"],
        )
        for host, s in list(c.registry.connected().items()):
            seen.add_metric([host], max(0.0, (now - s.last_heard_ms) / 1000))
        yield seen
        yield from self._services()
        yield from self._events()
        if c.scaling is not None:
            yield from self._scaling()

    def _services(self) -> Iterator[Metric]:
        owner = GaugeMetricFamily(
            "shadowplane_service_owner_info",
            "1 for the host that owns the service",
            labels=["service", "owner"],
        )
        token = GaugeMetricFamily(
            "shadowplane_service_fencing_token", "The service's newest fencing token", labels=["service"]
        )
        up = GaugeMetricFamily(
            "shadowplane_service_observer_up",
            "1 if the observer sees the target up, 0 if down (absent: unknown)",
            labels=["service", "observer", "target"],
        )
        for name, rt in list(self.c.failover.services.items()):
            rec = self.c.failover.orchestrator.record(name)
            owner.add_metric([name, rec.owner or "none"], 1)
            token.add_metric([name], rec.token)
            for target in rt.targets():
                for observer, (is_up, _) in self.c.failover.views(rt, target).items():
                    if is_up is not None:
                        up.add_metric([name, observer, target], int(is_up))
        yield from (owner, token, up)

    def _events(self) -> Iterator[Metric]:
        k = self.counters
        total = CounterMetricFamily("shadowplane_events", "Events recorded, by kind", labels=["kind"])
        for kind, n in sorted(k.by_kind.items()):
            total.add_metric([kind], n)
        trans = CounterMetricFamily(
            "shadowplane_service_transitions", "Completed ownership transitions", labels=["service", "kind"]
        )
        for (service, kind), n in sorted(k.transitions.items()):
            trans.add_metric([service, kind], n)
        dur = HistogramMetricFamily(
            "shadowplane_service_transition_duration_seconds",
            "From decision to the new owner holding the address",
            labels=["service"],
        )
        for service, counts in sorted(k.durations.items()):
            buckets = [(repr(le), float(n)) for le, n in zip(DURATION_BUCKETS, counts, strict=False)]
            dur.add_metric([service], [*buckets, ("+Inf", float(counts[-1]))], k.duration_sums[service])
        yield from (total, trans, dur)

    def _scaling(self) -> Iterator[Metric]:
        s = self.c.scaling
        assert s is not None
        # The forecast's quantile is `q`, not `quantile`: Prometheus reserves that label for summaries
        # (promtool rejects it on a gauge). The allocation target is no quantile: it has its own gauge.
        fc_cpu = GaugeMetricFamily(
            "shadowplane_forecast_cpu_cores",
            "Forecast CPU demand of the next step, by forecast quantile q",
            labels=["service", "q"],
        )
        fc_mem = GaugeMetricFamily(
            "shadowplane_forecast_memory_bytes",
            "Forecast memory demand of the next step, by forecast quantile q",
            labels=["service", "q"],
        )
        tg_cpu = GaugeMetricFamily(
            "shadowplane_forecast_target_cpu_cores",
            "CPU the allocation policy chose from the forecast (what shadows are sized towards)",
            labels=["service"],
        )
        tg_mem = GaugeMetricFamily(
            "shadowplane_forecast_target_memory_bytes",
            "Memory the allocation policy chose from the forecast (what shadows are sized towards)",
            labels=["service"],
        )
        demand_cpu = GaugeMetricFamily(
            "shadowplane_demand_cpu_cores", "Actual CPU demand (latest sample)", labels=["service"]
        )
        demand_mem = GaugeMetricFamily(
            "shadowplane_demand_memory_bytes", "Actual memory (latest sample)", labels=["service"]
        )
        for service, targets in list(s.targets.items()):
            for resource, fam, target in (("cpu", fc_cpu, tg_cpu), ("memory", fc_mem, tg_mem)):
                t = targets.get(resource)
                if t is None:
                    continue
                for q, v in t.forecast.items():
                    if q.startswith("q"):
                        fam.add_metric([service, q[1:]], v)
                target.add_metric([service], t.predicted)
            key = s.demand.get(service, "")
            host, _, workload = key.partition("/")
            rows = self.c.store.samples(host, workload, limit=1) if key else []
            smp = rows[-1][1] if rows else None
            interval_ms = smp.end_unix_ms - smp.start_unix_ms if smp else 0
            # A silent agent's last sample is not today's demand: leave the series absent (Grafana shows
            # the gap) once it is as stale as the fleet view calls a host.
            if smp and now_ms() - smp.end_unix_ms <= self.c.cfg.stale_after_intervals * interval_ms:
                secs = max(1e-3, interval_ms / 1000)
                demand_cpu.add_metric([service], smp.resources.cpu_seconds / secs)
                demand_mem.add_metric([service], smp.resources.memory_bytes)
        yield from (fc_cpu, fc_mem, tg_cpu, tg_mem, demand_cpu, demand_mem)
        cpu = GaugeMetricFamily(
            "shadowplane_shadow_cpu_limit_cores",
            "Shadow CPU limit as its agent reported it",
            labels=["service", "host"],
        )
        mem = GaugeMetricFamily(
            "shadowplane_shadow_memory_limit_bytes",
            "Shadow memory limit as reported",
            labels=["service", "host"],
        )
        ready = GaugeMetricFamily(
            "shadowplane_shadow_ready", "1 if the shadow's limits are in place", labels=["service", "host"]
        )
        for svc in self.c.cfg.service:
            for host in svc.shadows:
                w = s.workload_of(host, svc.name)
                applied = s.applied.get((host, w))
                if applied is not None:
                    cpu.add_metric([svc.name, host], applied.cpu_cores)
                    mem.add_metric([svc.name, host], applied.memory_bytes)
                rd = s.readiness.get((host, w))
                ready.add_metric([svc.name, host], int(bool(rd and rd.ready)))
        yield from (cpu, mem, ready)
        model = GaugeMetricFamily(
            "shadowplane_forecast_model_info", "The forecaster in use", labels=["source", "version"]
        )
        model.add_metric([s.engine.source, s.engine.model_version], 1)
        yield model

"""The controller's /metrics: fleet and stream health, each service's owner, token, observers and
transitions, and the scaling loop's forecast vs actual demand and each shadow's allocation.

A Prometheus collector of the read model (controller/status.py), plus the event counters it keeps itself."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from controller.status import ClusterView, ControllerStatus, ScalingView
from controller.store import EventRecord

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
    """Renders the controller's read model (controller/status.py) and the event counters at each scrape."""

    def __init__(self, status: Callable[[], ControllerStatus], counters: EventCounters) -> None:
        self.status, self.counters = status, counters

    def collect(self) -> Iterator[Metric]:
        st = self.status()
        yield GaugeMetricFamily(
            "shadowplane_controller_agents_connected", "Agents with a live stream", value=len(st.agents)
        )
        seen = GaugeMetricFamily(
            "shadowplane_controller_agent_last_seen_seconds",
            "Seconds since each agent was last heard",
            labels=["host"],
        )
        for a in st.agents:
            seen.add_metric([a.host], max(0.0, (st.now_ms - a.last_heard_ms) / 1000))
        yield seen
        rejected = CounterMetricFamily(
            "shadowplane_controller_agent_messages_rejected",
            "Messages refused on agent streams, by host, kind (hello, telemetry, result, ...) and reason",
            labels=["host", "kind", "reason"],
        )
        for r in st.rejected:
            rejected.add_metric([r.host, r.kind, r.reason], r.count)
        yield rejected
        if st.cluster is not None:
            yield from self._cluster(st.cluster)
        yield from self._services(st)
        yield from self._zones(st)
        yield from self._events()
        if st.scaling is not None:
            yield from self._scaling(st.scaling)

    def _cluster(self, c: ClusterView) -> Iterator[Metric]:
        for name, help_text, value in (
            (
                "shadowplane_controller_replica_leader",
                "1 while this replica acts as leader (of at least one shard)",
                c.acting,
            ),
            (
                "shadowplane_controller_replica_shards_acting",
                "How many of the services' shards this replica acts for",
                c.shards_acting,
            ),
            (
                "shadowplane_controller_etcd_reachable",
                "1 while this replica reads and writes etcd",
                c.etcd_reachable,
            ),
            (
                "shadowplane_controller_journal_pending_entries",
                "Events, decisions and overrides recorded here and not yet in etcd",
                c.journal_pending,
            ),
        ):
            g = GaugeMetricFamily(name, help_text, labels=["replica"])
            g.add_metric([c.name], float(value))
            yield g

    def _zones(self, st: ControllerStatus) -> Iterator[Metric]:
        if not st.zones:
            return
        hosts = GaugeMetricFamily("shadowplane_zone_hosts", "Hosts configured in the zone", labels=["zone"])
        down = GaugeMetricFamily(
            "shadowplane_zone_hosts_down", "Hosts of the zone down or cut off", labels=["zone"]
        )
        degraded = GaugeMetricFamily(
            "shadowplane_zone_degraded",
            "1 while the zone is degraded (pool.zone_degraded_share of its hosts down): nothing lands there",
            labels=["zone"],
        )
        for z in st.zones:
            hosts.add_metric([z.zone], len(z.hosts))
            down.add_metric([z.zone], len(z.down))
            degraded.add_metric([z.zone], 1.0 if z.degraded else 0.0)
        yield from (hosts, down, degraded)

    def _services(self, st: ControllerStatus) -> Iterator[Metric]:
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
        for svc in st.services:
            owner.add_metric([svc.name, svc.owner or "none"], 1)
            token.add_metric([svc.name], svc.token)
            for o in svc.observers:
                if o.up is not None:
                    up.add_metric([svc.name, o.observer, o.target], int(o.up))
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

    def _scaling(self, s: ScalingView) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "shadowplane_scaling_cycle_seconds",
            "Wall time of the latest scaling cycle (history, forecast, plan, limits applied)",
            value=s.last_cycle_seconds,
        )
        yield GaugeMetricFamily(
            "shadowplane_scaling_cycle_max_seconds",
            "The longest scaling cycle since the controller started",
            value=s.max_cycle_seconds,
        )
        # The forecast's quantile is `q`, not `quantile`: Prometheus reserves that label for summaries
        # (promtool rejects it on a gauge). The allocation target is no quantile: it has its own gauge.
        forecast = {
            "cpu": GaugeMetricFamily(
                "shadowplane_forecast_cpu_cores",
                "Forecast CPU demand of the next step, by forecast quantile q",
                labels=["service", "q"],
            ),
            "memory": GaugeMetricFamily(
                "shadowplane_forecast_memory_bytes",
                "Forecast memory demand of the next step, by forecast quantile q",
                labels=["service", "q"],
            ),
        }
        target = {
            "cpu": GaugeMetricFamily(
                "shadowplane_forecast_target_cpu_cores",
                "CPU the allocation policy chose from the forecast (what shadows are sized towards)",
                labels=["service"],
            ),
            "memory": GaugeMetricFamily(
                "shadowplane_forecast_target_memory_bytes",
                "Memory the allocation policy chose from the forecast (what shadows are sized towards)",
                labels=["service"],
            ),
        }
        for f in s.forecasts:
            if f.resource not in forecast:
                continue  # I/O is forecast for the I/O weight, not exported
            for q, v in f.quantiles.items():
                forecast[f.resource].add_metric([f.service, f"{q:g}"], v)
            target[f.resource].add_metric([f.service], f.target)
        demand_cpu = GaugeMetricFamily(
            "shadowplane_demand_cpu_cores", "Actual CPU demand (latest sample)", labels=["service"]
        )
        demand_mem = GaugeMetricFamily(
            "shadowplane_demand_memory_bytes", "Actual memory (latest sample)", labels=["service"]
        )
        for d in s.demand:  # a stale sample is absent from the view: Grafana shows the gap
            demand_cpu.add_metric([d.service], d.cpu_cores)
            demand_mem.add_metric([d.service], d.memory_bytes)
        yield from (forecast["cpu"], forecast["memory"], target["cpu"], target["memory"])
        yield from (demand_cpu, demand_mem)
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
        for sh in s.shadows:
            if sh.cpu_cores is not None and sh.memory_bytes is not None:
                cpu.add_metric([sh.service, sh.host], sh.cpu_cores)
                mem.add_metric([sh.service, sh.host], sh.memory_bytes)
            ready.add_metric([sh.service, sh.host], int(sh.ready))
        yield from (cpu, mem, ready)
        model = GaugeMetricFamily(
            "shadowplane_forecast_model_info", "The forecaster in use", labels=["source", "version"]
        )
        model.add_metric([s.model_source, s.model_version], 1)
        yield model

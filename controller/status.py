"""The controller's read model: one status view of the fleet that the Fleet API and /metrics render.

Each part is made by the component that owns the state (the registry: connected agents; the HA loop: each
service's owner, phase and observers' views; the scaling loop: forecasts, demand and shadows), as plain frozen
data, so renderers need no access to the objects that keep it and see one consistent moment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from controller.pool.zones import ZoneHealth


@dataclass(frozen=True)
class CaptureFeatureView:
    """One thing an agent's kernel lets its capture see, or not (and why)."""

    name: str
    captured: bool
    detail: str


@dataclass(frozen=True)
class CaptureView:
    """What an agent last said about its own capture."""

    bpf_active: bool = False
    bpf_unavailable_reason: str = ""
    dropped_events: Mapping[str, int] | None = None
    telemetry_batches_dropped: int = 0
    features: tuple[CaptureFeatureView, ...] = ()


@dataclass(frozen=True)
class AgentView:
    """An agent with a live stream."""

    host: str
    instance_id: str
    last_heard_ms: int
    capture: CaptureView


@dataclass(frozen=True)
class RejectedView:
    """Messages of one kind an agent's streams had refused for one reason, since the controller started."""

    host: str  # "" for a stream refused before it named a known host
    kind: str  # the AgentMessage body: "hello", "telemetry", "observation", "result", ...
    reason: str  # the reason code, e.g. "not_finite", "unknown_workload", "wrong_answer"
    count: int
    last_field: str  # of the latest one, e.g. "samples[0].resources.cpu_seconds"
    last_detail: str
    last_ms: int


@dataclass(frozen=True)
class ObserverView:
    """One observer's view of one target of a service: up True/False, or None when it has none."""

    observer: str
    target: str
    up: bool | None
    detail: str


@dataclass(frozen=True)
class ServiceView:
    name: str
    vip: str
    primary: str
    shadows: tuple[str, ...]
    failback: str
    owner: str  # "" when nobody owns it
    token: int
    phase: str  # stable, acquiring, no-owner; "transition" while the HA loop carries one out
    primary_healthy_since_ms: int | None
    observers: tuple[ObserverView, ...]


@dataclass(frozen=True)
class ForecastView:
    """A service's demand forecast for one resource, as the last scaling cycle made it."""

    service: str
    resource: str
    quantiles: Mapping[float, float]  # quantile level -> value of the next step
    target: float  # what the allocation policy chose: what shadows are sized towards


@dataclass(frozen=True)
class DemandView:
    """A service's actual demand: the latest sample of the workload whose forecast sizes its shadows."""

    service: str
    workload: str  # "host/workload"
    cpu_cores: float
    memory_bytes: float


@dataclass(frozen=True)
class ShadowView:
    service: str
    host: str
    workload: str  # "" when no workload of the service is on the host
    ready: bool
    reason: str
    cpu_cores: float | None  # the limits its agent reported after applying them; None before any
    memory_bytes: int | None


@dataclass(frozen=True)
class ScalingView:
    model_source: str  # "model" or "fallback"
    model_version: str
    next_cycle_ms: int
    forecasts: tuple[ForecastView, ...]
    demand: tuple[DemandView, ...]  # only where the latest sample is fresh
    shadows: tuple[ShadowView, ...]
    last_cycle_seconds: float = 0.0  # wall time of the latest cycle (forecast, plan, limits applied)
    max_cycle_seconds: float = 0.0  # the longest since the controller started


@dataclass(frozen=True)
class ClusterView:
    """What every replica shows of the cluster (status line, `shadowctl services`, /metrics)."""

    name: str
    acting: bool
    leader: str  # "" unknown
    etcd_reachable: bool
    state: str  # one line: leader / following X / etcd unreachable, no moves
    journal_pending: int  # entries not yet in etcd
    shards: int = 1  # [cluster] shards
    shards_acting: int = 0  # how many of them this replica acts for now


@dataclass(frozen=True)
class ControllerStatus:
    now_ms: int
    agents: tuple[AgentView, ...]
    services: tuple[ServiceView, ...]
    scaling: ScalingView | None  # None when scaling is disabled
    rejected: tuple[RejectedView, ...] = ()  # what agent streams had refused, by host, kind and reason
    cluster: ClusterView | None = None  # replicas only
    zones: tuple[ZoneHealth, ...] = ()  # zone health, as the HA loop last judged it

    def service(self, name: str) -> ServiceView | None:
        return next((s for s in self.services if s.name == name), None)

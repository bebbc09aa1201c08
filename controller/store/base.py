"""What the controller keeps, as an interface: callers never see SQL, so another backend (replicated)
can replace SQLite without touching them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from controller.scaling.decision import ScalingDecision
from controller.scaling.override import Override
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb


@dataclass(frozen=True)
class AgentRecord:
    host: str
    instance_id: str
    hello: apb.Hello
    peer: str
    last_seq: int
    first_seen_ms: int
    last_seen_ms: int
    last_telemetry_ms: int


@dataclass(frozen=True)
class ServiceRecord:
    """A service's ownership as the controller last decided it. The token only ever grows."""

    name: str
    owner: str = ""
    token: int = 0
    phase: str = "no-owner"
    candidate: str = ""
    last_failover_ms: int = 0
    last_transition_ms: int = 0


@dataclass(frozen=True)
class EventRecord:
    kind: str
    service: str
    host: str
    reason: str
    unix_ms: int
    detail: dict[str, str] = field(default_factory=dict)
    id: int = 0


@dataclass(frozen=True)
class StepAggregate:
    """One workload's stored samples per step of a grid, as `Store.step_aggregates` returns them."""

    steps: npt.NDArray[np.int64]  # step ids: a sample ending at t (ms) is in step ceil(t / step_ms)
    counts: npt.NDArray[np.int64]  # samples per step
    values: npt.NDArray[np.float64]  # (len(telemetry_schema.SERIES), steps): mean or max, per the schema


class Store(Protocol):
    def register_agent(self, hello: apb.Hello, peer: str, now_ms: int) -> int:
        """Record an agent's (re)connection; return the highest batch seq stored for this instance."""
        ...

    def append_batch(self, host: str, instance_id: str, batch: apb.TelemetryBatch, now_ms: int) -> bool:
        """Store a batch atomically, at most once per (host, instance, seq); False if it was a duplicate."""
        ...

    def touch_agent(self, host: str, instance_id: str, now_ms: int) -> None: ...

    def agents(self) -> list[AgentRecord]:
        """The latest instance of every host."""
        ...

    def agent(self, host: str) -> AgentRecord | None:
        """The latest instance of one host (None: never heard from): one indexed read, not the fleet."""
        ...

    def samples(
        self, host: str, workload: str = "", cgroup: str = "", since_ms: int = 0, limit: int = 60
    ) -> list[tuple[str, tpb.WorkloadSample]]:
        """(host, sample) pairs, the newest `limit` per workload, oldest first."""
        ...

    def sample_blobs(
        self, host: str, workload: str = "", cgroup: str = "", since_ms: int = 0, limit: int = 60
    ) -> list[tuple[str, bytes]]:
        """`samples`, each still serialized (tpb.WorkloadSample): what a reply passes on without reading."""
        ...

    def resource_series(
        self, since_ms: int = 0, host: str = "", workload: str = ""
    ) -> dict[tuple[str, str], dict[str, list[float]]]:
        """Every workload's telemetry series since the bound, for the prediction engine: per (host, workload),
        the columns end_ms, weight and one per `controller.telemetry_schema.SERIES`, oldest first. A row is
        a sample (weight 1) or a compacted step (`compact`: its end, weight = the samples it holds, each
        series their mean or max; only steps that begin at the bound or after it). Empty host/workload =
        all."""
        ...

    def step_aggregates(
        self, since_ms: int, step_ms: int
    ) -> tuple[dict[tuple[str, str], StepAggregate], dict[tuple[str, str], int]]:
        """Every workload's samples ending after `since_ms`, aggregated per step of `step_ms` (mean or max
        per `telemetry_schema.SERIES`), and, from the same snapshot, the last batch seq stored per
        (host, instance): a reader can tell which later batches the aggregates already hold."""
        ...

    def compact(self, older_than_ms: int, step_ms: int) -> int:
        """Fold the samples of every whole step of `step_ms` ending by the bound into one row per workload
        and step (the schema's mean or max, with the number of samples), which `resource_series` and
        `step_aggregates` read as the samples would have been; return how many samples were folded. In short
        transactions with pauses: the store worker runs it."""
        ...

    def prune(self, older_than_ms: int) -> int:
        """Delete telemetry (samples and compacted steps) older than the bound; return how many rows went.
        Deletes in short transactions with pauses (a week's backlog takes seconds): the store worker runs
        it."""
        ...

    def service_state(self, name: str) -> ServiceRecord | None: ...

    def save_service_state(self, rec: ServiceRecord) -> None: ...

    def add_event(self, ev: EventRecord) -> EventRecord:
        """Append an event; returns it with its id."""
        ...

    def events(self, service: str = "", after_id: int = 0, limit: int = 100) -> list[EventRecord]:
        """Events oldest first: the first `limit` after `after_id`, or the newest `limit` if after_id is 0."""
        ...

    def add_decisions(self, decisions: list[ScalingDecision]) -> list[ScalingDecision]:
        """Record scaling decisions; return them with their ids."""
        ...

    def decisions(
        self, host: str = "", workload: str = "", service: str = "", last: int = 5
    ) -> list[ScalingDecision]:
        """The newest `last` decisions per (host, workload, resource), oldest first."""
        ...

    def set_override(self, o: Override) -> None:
        """Store an operator's override; kind "clear" removes it."""
        ...

    def overrides(self) -> dict[tuple[str, str], Override]: ...

    def another_connection(self) -> Store:
        """The same store for another thread (the store worker): its own connection where the backend
        allows one, else this store."""
        ...

    def close(self) -> None: ...

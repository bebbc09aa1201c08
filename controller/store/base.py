"""What the controller keeps, as an interface: callers never see SQL, so another backend (replicated)
can replace SQLite without touching them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

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


class Store(Protocol):
    def register_agent(self, hello: apb.Hello, peer: str, now_ms: int) -> int:
        """Record an agent's (re)connection; return the highest batch seq stored for this instance."""
        ...

    def append_batch(self, host: str, instance_id: str, batch: apb.TelemetryBatch, now_ms: int) -> bool:
        """Store a batch atomically, at most once per (host, instance, seq); False if it was a duplicate."""
        ...

    def skip_batch(self, host: str, instance_id: str, seq: int, now_ms: int) -> None:
        """Mark a rejected batch as handled, so a resumed agent does not resend it."""
        ...

    def touch_agent(self, host: str, instance_id: str, now_ms: int) -> None: ...

    def agents(self) -> list[AgentRecord]:
        """The latest instance of every host."""
        ...

    def samples(
        self, host: str, workload: str = "", cgroup: str = "", since_ms: int = 0, limit: int = 60
    ) -> list[tuple[str, tpb.WorkloadSample]]:
        """(host, sample) pairs, the newest `limit` per workload, oldest first."""
        ...

    def prune(self, older_than_ms: int) -> int:
        """Delete telemetry older than the bound; return how many samples went."""
        ...

    def close(self) -> None: ...

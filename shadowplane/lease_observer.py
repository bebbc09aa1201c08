"""One observer of service leases, as the controller and every observer agent run it.

The rules are `shadowplane.lease` (pure); this is their state and clock, and the gRPC `Lease` service owners
renew with. Both daemons use this one class, so a renewal means the same thing whoever answers it, and so
does "the owner is renewing": its last renewal of that token was *granted* by this observer less than one
lease ago (`lease.renewing`). A refused renewal keeps no lease alive, so it does not count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from shadowplane import lease as leases
from shadowplane.config import NAME_RE
from shadowplane.tls import check_renewer, peer_identity
from shadowplane.v1 import lease_pb2 as lpb
from shadowplane.v1 import lease_pb2_grpc as lgrpc


class LeaseObserver:
    """The leases one observer keeps, one per service it observes."""

    def __init__(self, name: str, lease_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name  # how this observer signs its replies ("controller" or its host name)
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.started_at = clock()
        self.observed: frozenset[str] = frozenset()
        self.leases: dict[str, leases.ObserverLease] = {}

    def observe(self, services: Iterable[str], lease_seconds: float | None = None) -> None:
        """The services this observer answers renewals for (others are refused), and the lease length."""
        self.observed = frozenset(services)
        if lease_seconds:
            self.lease_seconds = lease_seconds

    def restore(self, service: str, promised: int, holder: str) -> None:
        """A promise kept in durable storage across a restart. Grants are never restored: what this
        observer granted before it started is covered by the start-up grace (`lease.renew`)."""
        st = self.leases.setdefault(service, leases.ObserverLease())
        st.promised, st.holder = promised, holder

    def state(self, service: str) -> leases.ObserverLease | None:
        return self.leases.get(service)

    def renew(self, service: str, token: int, holder: str) -> leases.RenewDecision:
        if service not in self.observed:
            # Promised token 0: a refusal from an observer that is not asked about this service must not
            # look like a newer token to the owner.
            return leases.RenewDecision(False, 0, f"{self.name} does not observe {service!r}")
        st = self.leases.setdefault(service, leases.ObserverLease())
        return leases.renew(st, token, holder, self.clock(), self.started_at, self.lease_seconds)

    def vote(self, service: str, token: int, candidate: str) -> leases.VoteDecision:
        st = self.leases.setdefault(service, leases.ObserverLease())
        return leases.vote(st, token, candidate, self.clock(), self.started_at, self.lease_seconds)

    def renewing(self, service: str, holder: str, token: int) -> bool | None:
        """Is `holder` keeping `token` alive with this observer? None while it cannot tell (just started)."""
        st = self.leases.get(service, leases.ObserverLease())
        return leases.renewing(st, holder, token, self.clock(), self.started_at, self.lease_seconds)

    def since_grant(self, service: str) -> float:
        """Seconds since this observer last granted a renewal of `service` (inf: never)."""
        st = self.leases.get(service)
        return self.clock() - st.last_grant if st is not None else float("inf")


class LeaseServicer(lgrpc.LeaseServicer):
    """The `Lease` gRPC service: owners renew here. Served by the controller and by each agent's peer port."""

    def __init__(self, observer: LeaseObserver) -> None:
        self.observer = observer

    async def Renew(
        self, request: lpb.RenewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lpb.RenewReply:
        # The request's fields, before anything else reads them (so no error quotes a huge value whole; fuzzed
        # by tests/integration/test_fuzz_fleet_lease.py): names that can be names, a token the stores'
        # 64-bit columns can hold.
        for name in ("service", "holder"):
            v = getattr(request, name)
            if not NAME_RE.match(v):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{name}: must be a name of 1-63 letters, digits, '_', '.', '-', got {v[:40]!r}",
                )
        if not 0 < request.token < 2**63:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token: must be 1 to 2^63-1 (the fencing token this owner was granted), got {request.token}",
            )
        problem = check_renewer(peer_identity(context), request.holder)
        if problem:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
        d = self.observer.renew(request.service, request.token, request.holder)
        return lpb.RenewReply(
            granted=d.granted,
            valid_for_ms=int(self.observer.lease_seconds * 1000),
            promised_token=d.promised,
            observer=self.observer.name,
        )

"""The controller as one of a service's observers: it answers lease renewals like an observer agent."""

from __future__ import annotations

import time
from typing import Any

import grpc

from controller.store import Store
from shadowplane import lease as leases
from shadowplane.tls import check_renewer, peer_identity
from shadowplane.v1 import lease_pb2 as lpb
from shadowplane.v1 import lease_pb2_grpc as lgrpc


class ControllerObserver:
    def __init__(self, store: Store, services: list[str], lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self.started_at = time.monotonic()
        self.leases: dict[str, leases.ObserverLease] = {}
        self.last_request: dict[str, tuple[float, str, int]] = {}  # service -> (when, holder, token)
        for name in services:
            rec = store.service_state(name)
            st = leases.ObserverLease()
            if rec is not None:
                # Our promises survive restarts in the store; our grants do not (hence the start-up grace).
                st.promised = rec.token
                st.holder = rec.candidate if rec.phase == "acquiring" else rec.owner
            self.leases[name] = st

    def renew(self, req: lpb.RenewRequest) -> lpb.RenewReply:
        st = self.leases.get(req.service)
        if st is None:
            return lpb.RenewReply(granted=False, observer="controller")
        now = time.monotonic()
        self.last_request[req.service] = (now, req.holder, req.token)
        d = leases.renew(st, req.token, req.holder, now, self.started_at, self.lease_seconds)
        return lpb.RenewReply(
            granted=d.granted,
            valid_for_ms=int(self.lease_seconds * 1000),
            promised_token=d.promised,
            observer="controller",
        )

    def vote(self, service: str, token: int, candidate: str) -> leases.VoteDecision:
        st = self.leases.setdefault(service, leases.ObserverLease())
        return leases.vote(st, token, candidate, time.monotonic(), self.started_at, self.lease_seconds)

    def renewing(self, service: str, holder: str, token: int) -> bool | None:
        """Is `holder` renewing `token` with us? None while we cannot tell (just started)."""
        now = time.monotonic()
        if now - self.started_at < 2 * self.lease_seconds:
            return None
        seen = self.last_request.get(service)
        if seen is None or seen[1] != holder or seen[2] != token:
            return False
        return now - seen[0] < self.lease_seconds


class LeaseService(lgrpc.LeaseServicer):
    def __init__(self, observer: ControllerObserver) -> None:
        self.observer = observer

    async def Renew(
        self, request: lpb.RenewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lpb.RenewReply:
        problem = check_renewer(peer_identity(context), request.holder)
        if problem:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, problem)
        return self.observer.renew(request)

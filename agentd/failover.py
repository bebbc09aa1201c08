"""The agent's two failover roles.

- Owner (`LeaseHolder`): holds a service's address only while a majority of the service's observers keep
  renewing its lease; the moment the lease runs out (or a newer token shows up) it removes the address
  itself. The deadline is set from when each renewal round was *sent*, for the shortest lease the
  granting observers promised, and kept by the fence's own thread (agentd/actuate/fence.py), so a busy
  event loop cannot keep an address past it. Observers are authenticated as the hosts the controller
  named (their certificates), so nobody can answer for another observer.
- Observer (`ObserverRole`): keeps the leases of the services it observes (shadowplane.lease_observer, the
  same observer the controller runs), answers the coordinator's votes, runs the health checks the controller
  asks for, and tells the controller what it sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc

from agentd.actuate.address import Addresses, Vip, announce
from agentd.actuate.fence import Fence
from agentd.held_leases import HeldLease
from shadowplane import lease as leases
from shadowplane.clock import now_ms
from shadowplane.healthcheck import (
    CheckSpec,
    ExecCheckConfig,
    Tracker,
    local_probe,
    run_check,
    spec_from_proto,
)
from shadowplane.lease_observer import LeaseObserver
from shadowplane.tls import TlsConfig, aio_channel
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import lease_pb2 as lpb
from shadowplane.v1 import lease_pb2_grpc as lgrpc

log = logging.getLogger(__name__)

Report = Callable[[apb.AgentMessage], None]


class LeaseError(RuntimeError):
    pass


class Channels:
    """One gRPC channel per observer (address and the name it must prove), reused across renewals."""

    def __init__(self, tls: TlsConfig, controller: str) -> None:
        self.tls, self.controller = tls, controller
        self._stubs: dict[tuple[str, str], lgrpc.LeaseAsyncStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def stub(self, address: str, name: str) -> lgrpc.LeaseAsyncStub:
        """A stub to the observer `name` ("controller" or a host) at `address`. With TLS the observer's
        certificate must carry that name (the controller's role name, or the host's own name), so an agent
        of another host, or this one, cannot answer in its place."""
        key = (address, name)
        if key not in self._stubs:
            opts: list[tuple[str, object]] = [("grpc.enable_retries", 0)]
            if name == "controller" or not name:
                ch = aio_channel(address, self.tls, "controller" if name else "agent", options=opts)
            else:
                ch = aio_channel(address, self.tls, "agent", options=opts, server_name=name)
            self._channels.append(ch)
            self._stubs[key] = lgrpc.LeaseStub(ch)
        return self._stubs[key]

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()
        self._stubs, self._channels = {}, []


@dataclass
class LeaseHolder:
    """This host's ownership of one service under one token."""

    host: str
    acquire: apb.Acquire
    addresses: Addresses | None
    channels: Channels
    report: Report
    fence: Fence
    valid_until: float = float("-inf")  # loop time (time.monotonic)
    vip: Vip | None = None
    refusals: dict[str, str] = field(default_factory=dict)
    _loop_task: asyncio.Task[None] | None = None
    lost: bool = False

    @property
    def service(self) -> str:
        return self.acquire.service

    @property
    def token(self) -> int:
        return self.acquire.token

    @property
    def lease(self) -> float:
        return self.acquire.lease_ms / 1000

    @property
    def fence_key(self) -> str:
        # per token: a holder that was superseded on this host can never drop its successor's deadline
        return f"{self.service}@{self.token}"

    def observers(self) -> list[tuple[str, str]]:
        """(address, name) of each observer; the name is "" from a controller that did not send names."""
        names = list(self.acquire.observer_names)
        if len(names) != len(self.acquire.observers):
            names = [""] * len(self.acquire.observers)
        return list(zip(self.acquire.observers, names, strict=True))

    async def start(self) -> apb.AddressState:
        """Renew once with a majority (which adds the address), keep renewing, then announce it."""
        if self.acquire.vip:
            self.vip = Vip.parse(self.acquire.vip, self.acquire.interface or "eth0")
        if not await self._round():
            detail = "; ".join(f"{k}: {v}" for k, v in sorted(self.refusals.items())) or "no replies"
            n = len(self.acquire.observers)
            raise LeaseError(f"token {self.token}: no majority of {n} observers renewed ({detail})")
        # Renewals go on while the announcements are sent: a long announcement burst must not eat the lease.
        self._loop_task = asyncio.create_task(self._renew_forever())
        sent = 0
        if self.vip is not None and self.addresses is not None:
            sent = await asyncio.to_thread(self._announce, self.vip, self.addresses)
        self._event("acquired", f"token {self.token}, {sent} announcements")
        return apb.AddressState(
            service=self.service,
            token=self.token,
            holds_address=self.vip is not None and not self.lost,
            announcements_sent=sent,
        )

    async def resume(self, stopped_at: float) -> bool:
        """Take up a lease this host held before its agent restarted (agentd/held_leases.py): renew the same
        token with the same observers until a majority grants it (the address stays, its lifetime refreshed)
        or one lease has passed, or an observer knows a newer token. False: not resumed, and the caller
        removes the address. Sends no announcements: the address never left this host."""
        if self.acquire.vip:
            self.vip = Vip.parse(self.acquire.vip, self.acquire.interface or "eth0")
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + max(self.lease, 3 * self.acquire.renew_interval_ms / 1000)
        # The first rounds may time out while the new channels connect: retrying is safe, the observers
        # grant only the token they voted for, whenever asked.
        while not await self._round():
            if self.lost or loop.time() >= give_up_at:
                detail = "; ".join(f"{k}: {v}" for k, v in sorted(self.refusals.items())) or "no replies"
                self.lose(f"not resumed after the restart: no majority renewed token {self.token} ({detail})")
                return False
            await asyncio.sleep(self.acquire.renew_interval_ms / 1000)
        self._loop_task = asyncio.create_task(self._renew_forever())
        paused = time.monotonic() - stopped_at
        log.info(
            "service %s: resumed lease %d after the agent restarted (renewals paused %.0f ms)%s",
            self.service,
            self.token,
            paused * 1000,
            f", {self.vip.address} kept on {self.vip.interface}" if self.vip else "",
        )
        self._event("resumed", f"token {self.token} after a restart; renewals paused {paused * 1000:.0f} ms")
        return True

    def suspend(self, boot_id: str) -> HeldLease | None:
        """The agent is stopping and means to come back: stop renewing, leave the address to its kernel
        lifetime (as for a hung agent, which every move already waits out), and say what to resume. None if
        this holder holds nothing."""
        if self.lost or self.valid_until == float("-inf"):
            return None
        self.lost = True  # no round in flight may hold the address again in the fence
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.fence.forget(self.fence_key)
        a = self.acquire
        return HeldLease(
            service=self.service,
            token=self.token,
            host=self.host,
            vip=a.vip,
            interface=a.interface,
            observers=tuple(a.observers),
            observer_names=tuple(a.observer_names),
            lease_ms=a.lease_ms,
            renew_interval_ms=a.renew_interval_ms,
            drift_margin=a.drift_margin,
            garp_count=a.garp_count,
            garp_interval_ms=a.garp_interval_ms,
            valid_until=self.valid_until,
            stopped_at=time.monotonic(),
            boot_id=boot_id,
        )

    @staticmethod
    def acquire_of(held: HeldLease) -> apb.Acquire:
        """The Acquire a held lease was granted by, as the holder keeps it (observers resolved)."""
        return apb.Acquire(
            service=held.service,
            token=held.token,
            vip=held.vip,
            interface=held.interface,
            observers=list(held.observers),
            observer_names=list(held.observer_names),
            lease_ms=held.lease_ms,
            renew_interval_ms=held.renew_interval_ms,
            drift_margin=held.drift_margin,
            garp_count=held.garp_count,
            garp_interval_ms=held.garp_interval_ms,
        )

    def _announce(self, vip: Vip, addresses: Addresses) -> int:
        """Gratuitous ARPs / unsolicited NAs, on a thread (netlink lookups and the sends' pauses)."""
        ifindex, mac = addresses.ifindex(vip.interface), addresses.mac(vip.interface)
        return announce(vip, mac, ifindex, self.acquire.garp_count, self.acquire.garp_interval_ms / 1000)

    async def _renew_one(self, address: str, name: str) -> lpb.RenewReply | None:
        who = name or address
        try:
            reply = await self.channels.stub(address, name).Renew(
                lpb.RenewRequest(service=self.service, token=self.token, holder=self.host),
                timeout=max(0.02, self.acquire.renew_interval_ms / 1000),
            )
        except grpc.aio.AioRpcError as e:
            self.refusals[who] = e.code().name
            return None
        if name and reply.observer != name:
            # Only the observer the controller named counts (also without TLS, where names are not proven).
            self.refusals[who] = f"answered as {reply.observer!r}, not {name!r}"
            return None
        return reply

    async def _round(self) -> bool:
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        observers = self.observers()
        replies = await asyncio.gather(*(self._renew_one(a, n) for a, n in observers))
        granted: list[lpb.RenewReply] = []
        for (address, name), r in zip(observers, replies, strict=True):
            if r is None:
                continue
            who = name or address
            if r.granted:
                granted.append(r)
                self.refusals.pop(who, None)
            else:
                self.refusals[who] = f"refused (knows token {r.promised_token})"
            if r.promised_token > self.token:
                self.lose(f"superseded: observer {who} voted for token {r.promised_token}")
                return False
        if len(granted) < leases.majority(len(observers)) or self.lost:
            return False
        # The lease is the shortest any granting observer promised: after a config change the owner and
        # its observers may briefly disagree, and the observers' length is what a vote waits out.
        lease = min([self.lease, *(r.valid_for_ms / 1000 for r in granted if r.valid_for_ms)])
        valid_until = leases.owner_valid_until(sent_at, lease, self.acquire.drift_margin)
        expired = self._expired_from_fence_thread(loop)
        lifetime = leases.address_lifetime_seconds(lease)
        held = await asyncio.to_thread(
            lambda: self.fence.hold(
                self.fence_key, self.vip, valid_until, lifetime, expired, wanted=lambda: not self.lost
            )
        )
        if not held:
            self.lose("lease ran out before the renewals came back")
            return False
        self.valid_until = valid_until
        return True

    def _expired_from_fence_thread(self, loop: asyncio.AbstractEventLoop) -> Callable[[bool], None]:
        def expired(removed: bool) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is stopping
                loop.call_soon_threadsafe(self.lose, "lease ran out: no majority renewed in time")

        return expired

    async def _renew_forever(self) -> None:
        interval = self.acquire.renew_interval_ms / 1000
        loop = asyncio.get_running_loop()
        while not self.lost:
            started = loop.time()
            await self._round()
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    def lose(self, reason: str) -> None:
        """Drop the address now (if the fence has not already)."""
        if self.lost:
            return
        self.lost = True
        removed = self.fence.drop(self.fence_key)
        if self._loop_task is not None and self._loop_task is not asyncio.current_task():
            self._loop_task.cancel()
        log.warning(
            "service %s: lost lease %d (%s)%s",
            self.service,
            self.token,
            reason,
            f"; removed {self.vip.address}" if removed and self.vip else "",
        )
        self._event("lost", reason)

    async def release(self, reason: str) -> apb.AddressState:
        if not self.lost:
            self.lost = True
            if self._loop_task is not None:
                self._loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._loop_task
            await asyncio.to_thread(self.fence.drop, self.fence_key)
            self._event("released", reason)
        if self.vip is not None and self.addresses is not None:
            # the fence dropped it already, or it was never added: make sure, the coordinator relies on it
            await asyncio.to_thread(self.addresses.remove, self.vip)
        return apb.AddressState(service=self.service, token=self.token, holds_address=False)

    def _event(self, what: str, reason: str) -> None:
        self.report(
            apb.AgentMessage(
                lease_event=apb.LeaseEvent(
                    service=self.service, token=self.token, what=what, reason=reason, unix_ms=now_ms()
                )
            )
        )


class ObserverRole:
    """The services this agent observes: their leases (the shared `LeaseObserver`, which the peer port's
    `LeaseServicer` answers renewals from), the health checks the controller asks for, and reports of both."""

    def __init__(
        self,
        host: str,
        report: Report,
        exec_checks: Mapping[str, ExecCheckConfig] | None = None,
        config_file: str = "/etc/shadowplane/agentd.toml",
    ) -> None:
        self.host = host
        self.report = report
        self.exec_checks = dict(exec_checks or {})  # [checks.NAME]: the only commands a Watch can start
        self.config_file = config_file
        self.leases = LeaseObserver(host, lease_seconds=2.0)  # the controller's Watch sets the real length
        self._checks: dict[tuple[str, str], tuple[apb.HealthCheck, asyncio.Task[None]]] = {}
        self._views: dict[tuple[str, str], apb.Observation] = {}
        # service -> (up, holder, token) of the lease view last sent: a new holder or token is news even
        # when both renew (a planned move's new owner renews before the observer's next look)
        self._lease_fresh: dict[str, tuple[bool, str, int]] = {}
        self._monitor: asyncio.Task[None] | None = None

    # ---- leases ----

    def vote(self, v: apb.Vote) -> apb.VoteReply:
        d = self.leases.vote(v.service, v.token, v.candidate)
        log.info(
            "service %s: vote for token %d (%s): %s, wait %.0f ms",
            v.service,
            v.token,
            v.candidate,
            d.reason,
            d.wait * 1000,
        )
        return apb.VoteReply(
            granted=d.granted,
            wait_ms=leases.wait_ms(d.wait),
            promised_token=d.promised,
            address_wait_ms=leases.wait_ms(d.address_wait),
        )

    # ---- what the controller asks us to watch ----

    def watch(self, w: apb.Watch) -> None:
        self.leases.observe(w.observed_services, w.lease_ms / 1000 if w.lease_ms else None)
        want = {(c.service, c.target): c for c in w.checks}
        for key, (asked, task) in list(self._checks.items()):
            if want.get(key) != asked:
                task.cancel()
                del self._checks[key]
                self._views.pop(key, None)
        for key, c in want.items():
            if key not in self._checks:
                spec = spec_from_proto(c)
                probe = local_probe(spec, self.exec_checks, self.config_file)
                task = asyncio.create_task(
                    self._cannot_check(spec, probe)
                    if isinstance(probe, str)
                    else run_check(spec, probe, self._on_probe)
                )
                self._checks[key] = (c, task)
        if self._monitor is None:
            self._monitor = asyncio.create_task(self._monitor_leases())

    async def _cannot_check(self, spec: CheckSpec, why: str) -> None:
        """A check this host cannot run (an exec check it has no [checks.NAME] for): the target is unknown
        to this observer, and the controller hears why (again on each new stream, like every view)."""
        log.warning("service %s: %s", spec.service, why)
        obs = apb.Observation(
            service=spec.service,
            target=spec.target,
            unknown=True,
            detail=why,
            since_unix_ms=now_ms(),
            kind="health",
        )
        self._views[(spec.service, spec.target)] = obs
        self.report(apb.AgentMessage(observation=obs))

    def _on_probe(self, spec: CheckSpec, tracker: Tracker, changed: bool) -> None:
        if tracker.up is None:
            return
        key = (spec.service, spec.target)
        obs = apb.Observation(
            service=spec.service,
            target=spec.target,
            up=tracker.up,
            detail=tracker.detail,
            since_unix_ms=int(tracker.since * 1000),
            kind="health",
        )
        self._views[key] = obs
        if changed:
            log.info(
                "service %s: %s is %s (%s)",
                spec.service,
                spec.target,
                "up" if tracker.up else "DOWN",
                tracker.detail,
            )
            self.report(apb.AgentMessage(observation=obs))

    async def _monitor_leases(self) -> None:
        """Tell the controller when an owner stops (or starts again) renewing with us."""
        while True:
            for service in self.leases.observed:
                view = self._lease_view(service)
                if view is not None and self._lease_fresh.get(service) != (view.up, view.target, view.token):
                    self._lease_fresh[service] = (view.up, view.target, view.token)
                    self.report(apb.AgentMessage(observation=view))
            await asyncio.sleep(min(0.05, self.leases.lease_seconds / 4))

    def views(self) -> list[apb.AgentMessage]:
        """Every view this observer holds now: what a controller hears when its stream (re)starts. Views
        are sent on change and then once per stream, not repeated: a stream delivers in order or ends, and
        the controller forgets an observer's views when its stream ends (a view repeated every second was
        nine messages a second per service at the controller, most of its work at fleet sizes)."""
        out = [apb.AgentMessage(observation=obs) for obs in self._views.values()]
        for service in list(self._lease_fresh):
            view = self._lease_view(service)
            if view is not None:
                out.append(apb.AgentMessage(observation=view))
        return out

    def _lease_view(self, service: str) -> apb.Observation | None:
        """Whether the holder of the newest token we know is renewing it with us; None while there is no
        holder or we cannot tell yet (just started)."""
        st = self.leases.state(service)
        if st is None or not st.holder:
            return None
        fresh = self.leases.renewing(service, st.holder, st.promised)
        if fresh is None:
            return None
        if fresh:
            detail = "renewing"
        elif st.granted_token == st.promised:
            detail = f"no renewal for {self.leases.since_grant(service) * 1000:.0f} ms"
        else:
            detail = f"token {st.promised} not renewed yet"
        return apb.Observation(
            service=service,
            target=st.holder,
            up=fresh,
            detail=detail,
            kind="lease",
            token=st.promised,
            since_unix_ms=now_ms(),
        )

    async def close(self) -> None:
        tasks = [task for _, task in self._checks.values()]
        if self._monitor is not None:
            tasks.append(self._monitor)
        for task in tasks:
            task.cancel()
        # ended, not only told to: a check's probe process is reaped before the daemon's loop stops
        self._checks, self._monitor = {}, None
        if tasks:
            await asyncio.wait(tasks)

"""Carrying out one decision: the steps of a takeover, each recorded as it happens.

Order (and why):
1. before-takeover hook on the new owner: data sync happens while the old owner may still serve; a failing
   hook aborts here, when nothing has changed yet (if the service's hook_failure is "abort").
2. the new owner's resources are raised to the primary's forecast (the scaling controller's callback).
3. a new fencing token is written to the store before anyone hears of it, so tokens never repeat.
4. a planned move releases the old owner first (its agent confirms the address is gone), so no wait.
5. a majority of observers vote for the new token; the new owner may add the address only after the
   longest wait they report (their last renewal of the old token + one lease), unless step 4 confirmed.
   When the old owner did not confirm (it is cut off, hung, or gone), it is presumed to hold its address
   until the kernel's lifetime of it could have run out, so the wait is the longest *address* wait.
6. the new owner renews with a majority, adds the address and announces it (GARP / unsolicited NA).
7. DNS record switch, after-hooks, the old owner's limits back to plan.

A reacquire (the owner's agent let its lease lapse, its service is fine) runs steps 3 to 6 on the same host:
no hooks, and no command to it waits longer than a renewal round needs (`_command_timeout`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from controller.config import ControllerConfig, ServiceConfig
from controller.event_log import EventLog
from controller.failover.decide import Decision
from controller.failover.dns import DnsUpdates
from controller.failover.records import LocalRecords, RecordConflict, ServiceRecords
from controller.registry import AgentRegistry, CommandError
from controller.store import ServiceRecord, Store
from shadowplane.clock import now_ms
from shadowplane.lease import address_expiry_seconds, majority, wait_ms
from shadowplane.lease_observer import LeaseObserver
from shadowplane.v1 import agent_pb2 as apb

log = logging.getLogger(__name__)

ResourceHook = Callable[[ServiceConfig, str], Awaitable[None]]
VOTE_SAFETY_MS = 5  # on top of the observers' waits: the time the vote replies spent on the wire


@dataclass(frozen=True)
class Waits:
    """The longest waits a majority of voters reported (ms): until the old owner's lease has run out, and
    until its address has certainly expired in its kernel (for an old owner that cannot confirm)."""

    lease_ms: int
    address_ms: int


@dataclass
class Orchestrator:
    cfg: ControllerConfig
    store: Store
    registry: AgentRegistry
    events: EventLog
    observer: LeaseObserver  # the controller's own vote
    on_takeover: ResourceHook | None = None  # raise the new owner's limits before it takes over
    on_released: ResourceHook | None = None  # the old owner's limits go back to the plan
    dns_updates: DnsUpdates = field(default_factory=DnsUpdates)  # each service's record, retried
    records: ServiceRecords | None = None  # where ownership is kept (default: the store; replicas: etcd)
    # Replicas: why this one may not act now ("" while it leads; always "" alone). Asked before each step
    # that changes something, so a replica that lost leadership mid-transition stops at its next step.
    not_leading: Callable[[str], str] = lambda service: ""

    def __post_init__(self) -> None:
        self.book: ServiceRecords = self.records or LocalRecords(self.store)

    async def _save(self, rec: ServiceRecord) -> ServiceRecord:
        return await self.book.save(rec)

    def _still_leading(self, svc: ServiceConfig, step: str) -> None:
        why = self.not_leading(svc.name)
        if why:
            raise RecordConflict(f"service {svc.name}: stopped before {step}: {why}")

    def service_state(self, name: str) -> ServiceRecord:
        """The service's ownership as last decided (a service never decided has no owner yet)."""
        return self.book.get(name)

    async def run(self, svc: ServiceConfig, d: Decision) -> ServiceRecord:
        """Carry out `d` for `svc`; return the service's record afterwards (also when aborted)."""
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        rec = self.service_state(svc.name)
        old, old_token, new = rec.owner, rec.token, d.target
        token = old_token + 1
        env = {
            "SHADOWPLANE_OLD_OWNER": old,
            "SHADOWPLANE_NEW_OWNER": new,
            "SHADOWPLANE_TOKEN": str(token),
            "SHADOWPLANE_TRANSITION": d.action,
            "SHADOWPLANE_VIP": svc.vip,
        }
        self.events.record(d.action, svc.name, new, d.reason, old_owner=old or "-", planned=d.planned)
        # A failing owner serves nobody: preparing the new owner runs alongside fencing the old one. A
        # planned move changes nothing until the new owner is ready.
        urgent = d.action == "failover"
        # A reacquire keeps the service where it is: no data moves, so no before- or after- hooks, and no
        # long hook timeouts spent on an owner that may not answer.
        same_host = old == new
        prepare = asyncio.create_task(self._prepare(svc, new, env, hooks=not same_host))
        if not urgent and not await prepare and svc.hook_failure == "abort":
            self.events.record(
                "takeover-aborted",
                svc.name,
                new,
                "before-takeover hook failed; nothing changed",
                owner=old or "-",
            )
            return rec

        self._still_leading(svc, "writing the new token")
        rec = await self._save(
            replace(rec, token=token, phase="acquiring", candidate=new, last_transition_ms=now_ms())
        )
        release: asyncio.Task[bool] | None = None
        if old and d.planned and not urgent:
            if (
                not same_host
                and not await self._hook(svc, old, "before-release", env)
                and svc.hook_failure == "abort"
            ):
                self.events.record(
                    "takeover-aborted", svc.name, old, "before-release hook failed; old owner kept"
                )
                return await self._save(replace(rec, phase="stable", candidate=""))
            release = asyncio.create_task(self._release(svc, old, old_token, self._command_timeout()))
        elif old and self._alive(old):
            # It may still hear us (its service died, its agent did not): a confirmed release saves the wait.
            release = asyncio.create_task(self._release(svc, old, old_token, 0.5))

        granted, waits, problems, promised = await self._votes(svc, token, new)
        quorum = self.cfg.lease_quorum(svc)
        needed = majority(len(quorum))
        if len(granted) < needed:
            self.events.record(
                "takeover-aborted",
                svc.name,
                new,
                f"only {len(granted)} of {len(quorum)} observers voted for token {token} "
                f"(need {needed}): " + "; ".join(f"{k}: {v}" for k, v in problems.items()),
            )
            # Some observers may have promised the new token and now refuse the old owner's renewals:
            # ownership is unknown until the next placement. Observers that refused have promised a newer
            # token (a store that started again from scratch: a new replica cluster, a restored backup):
            # the next placement starts above it rather than counting up one refusal at a time.
            return await self._save(
                replace(rec, owner="", phase="no-owner", candidate="", token=max(token, promised))
            )

        # A confirmed release ends the wait for the lease; without one, the old owner (whoever the last
        # grants went to, also after an interrupted takeover) may be hung with the address still in its
        # kernel, so the wait is until its lifetime could have run out.
        voted_at = loop.time()
        wait_s = (waits.lease_ms + VOTE_SAFETY_MS) / 1000
        released = False
        if release is not None:
            await asyncio.wait({release}, timeout=(waits.address_ms + VOTE_SAFETY_MS) / 1000)
            released = release.done() and release.result()
        if not released:
            wait_s = (waits.address_ms + VOTE_SAFETY_MS) / 1000
            await asyncio.sleep(max(0.0, voted_at + wait_s - loop.time()))
        if urgent and not await prepare and svc.hook_failure == "abort":
            self.events.record(
                "takeover-aborted",
                svc.name,
                new,
                f"before-takeover hook failed; {old or 'nobody'} was fenced (token {token})",
            )
            return await self._save(replace(rec, owner="", phase="no-owner", candidate=""))

        self._still_leading(svc, "the acquire")
        try:
            result = await self.registry.call(
                new,
                apb.Command(acquire=self._acquire_msg(svc, token)),
                timeout=self._command_timeout() + svc.garp_count * svc.garp_interval_seconds,
            )
            ok, error = result.ok, result.error
        except CommandError as e:
            ok, error = False, str(e)
        if not ok:
            self.events.record("takeover-failed", svc.name, new, f"acquire failed: {error}", token=token)
            return await self._save(replace(rec, owner="", phase="no-owner", candidate=""))
        now = now_ms()
        counts_as_failover = d.action in ("failover", "move")
        rec = await self._save(
            replace(
                rec,
                owner=new,
                phase="stable",
                candidate="",
                last_transition_ms=now,
                last_failover_ms=now if counts_as_failover else rec.last_failover_ms,
            )
        )
        took_ms = (time.monotonic() - t0) * 1000
        detail: dict[str, object] = {
            "took_ms": round(took_ms),
            "token": token,
            "old_owner": old or "-",
            "waited_ms": 0 if released else round(wait_s * 1000),
            "released": released,
            "announcements": result.address.announcements_sent,
        }
        self.events.record(
            f"{d.action}-complete", svc.name, new, f"{old or 'nobody'} -> {new} in {took_ms:.0f} ms", **detail
        )

        if svc.dns is not None:
            # The first attempt now; a failed one is retried in the background until it succeeds or the
            # service moves again (each attempt is an event).
            addr = self.cfg.host_entry(new).address
            await self.dns_updates.point(svc.name, svc.dns, new, addr, self.events.record)
        if not same_host:
            await self._hook(svc, new, "after-takeover", env)
        if old and old != new:
            if released or (d.planned and not urgent):
                await self._hook(svc, old, "after-release", env)
            else:
                self.events.record("hook-skipped", svc.name, old, "after-release: the old owner failed")
            if self.on_released is not None:
                try:
                    await self.on_released(svc, old)
                except Exception as e:
                    self.events.record("resize-failed", svc.name, old, f"could not restore limits: {e}")
        return rec

    def _command_timeout(self) -> float:
        """How long a release or an acquire may take on a healthy agent: a renewal round and a netlink
        call or two. Waiting longer on one that does not answer only lengthens the outage: a failed acquire
        leaves the service without an owner, which the next tick places again with a newer token."""
        return max(1.0, 2 * self.cfg.failover.lease_seconds)

    async def _prepare(self, svc: ServiceConfig, new: str, env: dict[str, str], hooks: bool = True) -> bool:
        """The new owner's before-takeover hook, then its limits raised to the forecast."""
        ok = await self._hook(svc, new, "before-takeover", env) if hooks else True
        if (ok or svc.hook_failure == "continue") and self.on_takeover is not None:
            try:
                await self.on_takeover(svc, new)
            except Exception as e:  # resizing is best effort: the takeover matters more
                self.events.record("resize-failed", svc.name, new, f"could not raise limits: {e}")
        return ok

    def _alive(self, host: str) -> bool:
        return self.registry.is_alive(host, now_ms(), int(self.cfg.failover.heartbeat_timeout_seconds * 1000))

    def _acquire_msg(self, svc: ServiceConfig, token: int) -> apb.Acquire:
        f, quorum = self.cfg.failover, self.cfg.lease_quorum(svc)
        return apb.Acquire(
            service=svc.name,
            token=token,
            vip=svc.vip,
            interface=self._interface(svc),
            observers=[self._lease_address(o) for o in quorum],
            observer_names=quorum,
            lease_ms=int(f.lease_seconds * 1000),
            renew_interval_ms=int(f.renew_interval_seconds * 1000),
            drift_margin=f.drift_margin,
            garp_count=svc.garp_count,
            garp_interval_ms=int(svc.garp_interval_seconds * 1000),
        )

    def _interface(self, svc: ServiceConfig) -> str:
        return ""  # the agent takes the interface from its own workload config

    def _lease_address(self, observer: str) -> str:
        if observer == "controller":
            return "controller"  # the agent renews with the controller address it dials
        s = self.registry.get(observer)
        if s is not None and s.hello.peer_address:
            return s.hello.peer_address
        a = self.store.agent(observer)  # not connected now: what it said when it last was
        if a is not None and a.hello.peer_address:
            return a.hello.peer_address
        return f"unknown-peer-address-of-{observer}:0"

    async def _votes(
        self, svc: ServiceConfig, token: int, candidate: str
    ) -> tuple[list[str], Waits, dict[str, str], int]:
        """Ask every observer; return as soon as a majority granted (their longest waits count). Also the
        newest token a refusing observer said it had promised (0: none said)."""
        names = self.cfg.lease_quorum(svc)
        needed = majority(len(names))

        promised = 0

        async def one(o: str) -> tuple[str, Waits | None, str]:
            nonlocal promised
            if o == "controller":
                d = self.observer.vote(svc.name, token, candidate)
                if not d.granted:
                    return o, None, d.reason
                return o, Waits(wait_ms(d.wait), wait_ms(d.address_wait)), d.reason
            try:
                r = await self._ask_vote(svc, o, token, candidate)
            except CommandError as e:
                return o, None, str(e)
            if not r.vote.granted:
                promised = max(promised, r.vote.promised_token)
                return o, None, f"refused: already promised token {r.vote.promised_token}"
            # An agent that predates address waits reports none: its lease wait plus the longest lifetime.
            address_ms = (
                r.vote.address_wait_ms
                if r.vote.HasField("address_wait_ms")
                else r.vote.wait_ms + wait_ms(address_expiry_seconds(self.cfg.failover.lease_seconds))
            )
            return o, Waits(r.vote.wait_ms, address_ms), "granted"

        granted: list[str] = []
        problems: dict[str, str] = {}
        waits = Waits(0, 0)
        for fut in asyncio.as_completed([one(o) for o in names]):
            o, w, why = await fut
            if w is not None:
                granted.append(o)
                waits = Waits(max(waits.lease_ms, w.lease_ms), max(waits.address_ms, w.address_ms))
                if len(granted) >= needed:
                    break
            else:
                problems[o] = why
        return granted, waits, problems, promised

    async def catch_up(self, svc: ServiceConfig, observer: str, token: int, owner: str) -> bool:
        """Bring an observer that missed the vote for the current token (it was away, or restarted and
        forgot) up to it: it grants renewals only of tokens it voted for. Voting the owner's own token again
        changes no ownership; an observer that knows a newer token refuses."""
        try:
            r = await self._ask_vote(svc, observer, token, owner)
        except CommandError:
            return False
        return r.vote.granted

    async def _ask_vote(
        self, svc: ServiceConfig, observer: str, token: int, candidate: str
    ) -> apb.CommandResult:
        """One observer agent's vote for `token` to `candidate`, waited for as long as any command to a
        healthy agent (`_command_timeout`). The wait is spent only when a majority does not answer (a
        round that fails either way: a dead observer does not hold up the majority's answers), while a
        shorter one (it was 0.3 s) failed live observers on a loaded controller or host: 2,000 agents
        connecting while 500 services were placed answered in 0.3-1 s, and every round failed again."""
        vote = apb.Vote(service=svc.name, token=token, candidate=candidate)
        return await self.registry.call(observer, apb.Command(vote=vote), self._command_timeout())

    async def _release(self, svc: ServiceConfig, host: str, token: int, timeout: float) -> bool:
        """Ask `host` to drop the address; True only if it confirms it holds none."""
        try:
            r = await self.registry.call(
                host, apb.Command(release=apb.Release(service=svc.name, token=token)), timeout
            )
        except CommandError as e:
            self.events.record("release-failed", svc.name, host, str(e))
            return False
        return r.ok and not r.address.holds_address

    async def _hook(self, svc: ServiceConfig, host: str, phase: str, env: dict[str, str]) -> bool:
        """Run a hook on `host`; True if it passed or there is none."""
        if not self._alive(host):
            if phase.startswith("after"):
                self.events.record("hook-skipped", svc.name, host, f"{phase}: host unreachable")
            return not phase.startswith("before") or host not in (svc.primary, *svc.shadows)
        msg = apb.RunHook(
            service=svc.name, phase=phase, env=env, timeout_ms=int(svc.hook_timeout_seconds * 1000)
        )
        try:
            r = await self.registry.call(host, apb.Command(run_hook=msg), svc.hook_timeout_seconds + 2)
        except CommandError as e:
            self.events.record("hook-failed", svc.name, host, f"{phase}: {e}")
            return False
        if not r.hook.found:
            return True
        if not r.ok:
            self.events.record(
                "hook-failed", svc.name, host, f"{phase}: {r.error}", output=r.hook.output_tail[-300:].strip()
            )
            return False
        self.events.record("hook", svc.name, host, f"{phase} ran in {r.hook.duration_ms} ms")
        return True

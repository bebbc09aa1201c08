"""What the agent does when the controller asks: one handler per command, each returning a result.

The agent is the only writer on its host: the controller asks, the agent applies and reports what the
kernel now says.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from agentd.actuate.address import Addresses
from agentd.actuate.fence import Fence
from agentd.actuate.hooks import run_hook
from agentd.actuate.limits import LimitsError, WorkloadLimits
from agentd.cgroupfs import CgroupLayout
from agentd.config import AgentConfig
from agentd.failover import Channels, LeaseError, LeaseHolder, ObserverRole, Report
from agentd.held_leases import HeldLease
from shadowplane.v1 import agent_pb2 as apb

log = logging.getLogger(__name__)


class CommandHandler:
    def __init__(
        self,
        cfg: AgentConfig,
        layout: CgroupLayout,
        observer: ObserverRole,
        report: Report,
        limits: dict[str, WorkloadLimits] | None = None,
    ) -> None:
        self.cfg, self.layout, self.observer, self.report = cfg, layout, observer, report
        self.limits = limits or {}  # by workload name: see agentd.daemon.workload_limits
        self.addresses = Addresses()
        self.fence = Fence(self.addresses)
        self.channels = Channels(cfg.tls, cfg.controller)
        self.holders: dict[str, LeaseHolder] = {}
        self.newest_token: dict[str, int] = {}
        self.stopping = False  # leases suspended (`suspend`): no lease command is honoured any more

    async def __call__(self, cmd: apb.Command) -> apb.CommandResult:
        kind = cmd.WhichOneof("action")
        # The incarnation echoed tells the controller this answers one of its own commands, not an
        # earlier controller's.
        r = apb.CommandResult(command_id=cmd.command_id, incarnation=cmd.incarnation, ok=True)
        if self.stopping and kind in ("acquire", "release"):
            # The leases are suspended: their addresses stay until their kernel lifetimes. Answering a
            # release with "holds none" would let a move skip waiting that out: two owners.
            r.ok, r.error = False, "agent stopping: its addresses stay until their kernel lifetime runs out"
            return r
        if kind == "watch":
            self.observer.watch(cmd.watch)
        elif kind == "vote":
            r.vote.CopyFrom(self.observer.vote(cmd.vote))
        elif kind == "acquire":
            try:
                r.address.CopyFrom(await self.acquire(cmd.acquire))
            except LeaseError as e:
                r.ok, r.error = False, str(e)
        elif kind == "release":
            r.address.CopyFrom(await self.release(cmd.release))
        elif kind == "run_hook":
            h = cmd.run_hook
            outcome = await run_hook(
                Path(self.cfg.hooks_dir), h.service, h.phase, dict(h.env), h.timeout_ms / 1000
            )
            r.hook.CopyFrom(
                apb.HookResult(
                    phase=outcome.phase,
                    found=outcome.found,
                    exit_code=outcome.exit_code,
                    timed_out=outcome.timed_out,
                    output_tail=outcome.output_tail,
                    duration_ms=int(outcome.seconds * 1000),
                )
            )
            r.ok = outcome.ok
            if not outcome.ok:
                r.error = f"hook {h.phase} " + (
                    "timed out" if outcome.timed_out else f"exited {outcome.exit_code}"
                )
        elif kind == "set_limits":
            try:
                # a memory.max write can block while the kernel reclaims: not on the loop
                r.limits.CopyFrom(await asyncio.to_thread(self.set_limits, cmd.set_limits))
            except LimitsError as e:
                r.ok, r.error = False, str(e)
        else:
            r.ok, r.error = False, f"unknown command {kind!r}: is this agent older than the controller?"
        return r

    async def acquire(self, a: apb.Acquire) -> apb.AddressState:
        if a.token <= self.newest_token.get(a.service, 0):
            raise LeaseError(
                f"token {a.token} is not newer than {self.newest_token[a.service]} for {a.service}"
            )
        self.newest_token[a.service] = a.token
        old = self.holders.pop(a.service, None)
        if old is not None:
            await old.release(f"superseded by token {a.token}")
        resolved = apb.Acquire()
        resolved.CopyFrom(a)
        del resolved.observers[:]
        resolved.observers.extend(self.cfg.controller if o == "controller" else o for o in a.observers)
        if resolved.vip and not resolved.interface:
            resolved.interface = self._interface(a.service)
        holder = LeaseHolder(self.cfg.host, resolved, self.addresses, self.channels, self.report, self.fence)
        try:
            state = await holder.start()
        except Exception as e:
            holder.lose(f"acquire failed: {e}")
            raise LeaseError(str(e)) from e
        self.holders[a.service] = holder
        # The controller's command names no interface when the workload's config does: log where the address
        # really went (the holder's), not the command's empty field.
        where = f", {a.vip} on {holder.vip.interface}" if holder.vip is not None else ""
        log.info("service %s: acquired token %d%s", a.service, a.token, where)
        return state

    def _interface(self, service: str) -> str:
        for w in self.cfg.workload:
            if w.service == service and w.interface:
                return w.interface
        raise LeaseError(
            f"no workload of service {service!r} names an interface on this host: set `interface`"
        )

    async def release(self, rel: apb.Release) -> apb.AddressState:
        holder = self.holders.get(rel.service)
        if holder is None or (rel.token and holder.token != rel.token):
            return apb.AddressState(service=rel.service, token=rel.token, holds_address=False)
        del self.holders[rel.service]
        return await holder.release("released on the controller's request")

    def set_limits(self, s: apb.SetLimits) -> apb.LimitsApplied:
        limits = self.limits.get(s.workload)
        if limits is None:
            raise LimitsError(f"no workload {s.workload!r} on this host")
        return limits.apply(s)

    async def resume(self, held: HeldLease) -> bool:
        """Take up a lease held before the agent restarted, if its observers still grant it (True)."""
        if held.service in self.holders:
            return False
        holder = LeaseHolder(
            self.cfg.host,
            LeaseHolder.acquire_of(held),
            self.addresses,
            self.channels,
            self.report,
            self.fence,
        )
        self.newest_token[held.service] = max(self.newest_token.get(held.service, 0), held.token)
        if not await holder.resume(held.stopped_at):
            return False
        if held.service in self.holders:  # the controller placed it meanwhile, with a newer token
            holder.lose(f"superseded by token {self.holders[held.service].token}")
            return False
        self.holders[held.service] = holder
        return True

    def suspend(self, boot_id: str) -> list[HeldLease]:
        """Stop renewing every lease, leaving the addresses to their kernel lifetimes; what to resume."""
        self.stopping = True
        out = [h for h in (holder.suspend(boot_id) for holder in self.holders.values()) if h is not None]
        self.holders = {}
        return out

    async def close(self) -> None:
        # Leases still here were not suspended (the caller did not mean to come back): let them go.
        for holder in list(self.holders.values()):
            await holder.release("agent stopping")
        self.holders = {}
        await self.channels.close()
        self.fence.close()
        self.addresses.close()

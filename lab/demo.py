"""`python -m lab demo`: the whole system in under three minutes, on one machine.

1. builds the lab (a controller, a primary, two shadows, a client, in network namespaces);
2. runs a compressed "day" of CPU demand in the primary's cgroup and shows, live, the demand, the forecast
   band and the shadow's allocation as read from its cgroup files;
3. cuts the primary's link and measures the outage a client polling the VIP every 10 ms sees;
4. restores it, and shows the failback after the hold time;
5. prints a summary and removes everything.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from agentd.cgroupfs import CgroupLayout
from lab.poller import Record, outages
from lab.runner import Lab
from lab.scenario import Probe
from lab.spec import Spec, Timings

CHART_WIDTH = 60
CHART_HEIGHT = 10


@dataclass
class Point:
    t: float
    demand: float | None
    q50: float | None
    q99: float | None
    allocation: float


@dataclass
class Summary:
    day_seconds: float
    points: int
    coverage: float | None  # share of points with the shadow's limit >= the primary's demand
    slack: float | None  # unused allocation / demand, over the day
    scaling_changes: int
    failover_outage_seconds: float | None
    failover_to: str
    failback_outage_seconds: float | None
    failback_after_seconds: float | None
    split_brain_samples: int
    vip_samples: int
    left_behind: list[str] = field(default_factory=list)


def daily_demand(t: float, day: float, low: float = 0.1, high: float = 0.9) -> float:
    """A working day in `day` seconds: quiet night, a morning ramp, a lunch dip, an evening tail."""
    x = (t / day) % 1.0
    base = low + (high - low) * max(0.0, math.sin(math.pi * (x - 0.15) / 0.7)) if 0.15 < x < 0.85 else low
    lunch = 0.15 * (high - low) * math.exp(-(((x - 0.5) / 0.04) ** 2))
    return round(max(low, base - lunch), 3)


def chart(points: list[Point], top: float) -> Text:
    """Demand (●), forecast band q50..q99 (░) and the shadow's limit (━), newest on the right."""
    # the whole run, one column per equal slice of it
    pts = (
        [points[i * len(points) // CHART_WIDTH] for i in range(CHART_WIDTH)]
        if len(points) > CHART_WIDTH
        else points
    )
    grid = [[" "] * CHART_WIDTH for _ in range(CHART_HEIGHT)]

    def row(v: float) -> int:
        return max(0, min(CHART_HEIGHT - 1, CHART_HEIGHT - 1 - round(v / top * (CHART_HEIGHT - 1))))

    for x, p in enumerate(pts):
        if p.q50 is not None and p.q99 is not None:
            for y in range(row(p.q99), row(p.q50) + 1):
                grid[y][x] = "░"
        grid[row(p.allocation)][x] = "━"
        if p.demand is not None:
            grid[row(p.demand)][x] = "●"
    text = Text()
    for i, line in enumerate(grid):
        label = f"{top * (CHART_HEIGHT - 1 - i) / (CHART_HEIGHT - 1):4.1f} │"
        text.append(label, style="dim")
        for ch in line:
            text.append(ch, style={"●": "bold red", "░": "cyan", "━": "green"}.get(ch, ""))
        text.append("\n")
    text.append(
        "       ● demand (cores)   ░ forecast q50..q99   ━ shadow's CPU limit (its cgroup file)", style="dim"
    )
    return text


class Demo:
    def __init__(self, console: Console, day: float, hold: float) -> None:
        self.console, self.day, self.hold = console, day, hold
        self.live_ok = console.is_terminal
        self.points: list[Point] = []
        self.status = "starting"

    def say(self, msg: str) -> None:
        self.status = msg
        self.console.print(f"[bold cyan]▶[/] {msg}")

    def view(self) -> Group:
        last = self.points[-1] if self.points else None
        t = Table(box=None)
        for col in ("day time", "demand", "forecast q50", "forecast q99", "shadow limit"):
            t.add_column(col)
        if last is not None:
            hour = 24 * ((last.t / self.day) % 1.0)
            t.add_row(
                f"{int(hour):02d}:{int(60 * (hour % 1)):02d}",
                _f(last.demand),
                _f(last.q50),
                _f(last.q99),
                f"{last.allocation:.2f}",
            )
        top = max([1.0, *[max(p.allocation, p.q99 or 0, p.demand or 0) for p in self.points]])
        return Group(Panel(chart(self.points, top), title=self.status), t)

    def run(self, spec: Spec) -> Summary:
        with Lab.up(spec) as lab:
            self.say(
                f"lab is up: controller {lab.plan.controller_address}, primary p1, shadows s1 s2, a client"
            )
            lab.wait_owner(None, "p1", 30)
            svc = lab.service()
            self.say(
                f"{svc.name} is on p1 (VIP {svc.vip_ip}); a compressed day of demand starts in p1's cgroup"
            )
            probe = Probe(lab)
            profile = Path(tempfile.mkdtemp(prefix="sp-demo-")) / "cores"
            profile.write_text("0.1\n")
            layout = CgroupLayout.detect()
            procs = [d / "cgroup.procs" for d in layout.dirs(svc.cgroup("p1"))]

            def join() -> None:
                for f in procs:
                    f.write_text(str(os.getpid()))

            load = lab.popen_in(
                "p1",
                [sys.executable, "-m", "lab.loadgen", "cpu", "--profile", str(profile)],
                name="demo-load",
                preexec_fn=join,
            )
            try:
                self._day(probe, profile)
                fo, fo_to, fb, fb_after, report = self._failover(lab)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(load.pid, signal.SIGKILL)
                load.wait()
                profile.unlink(missing_ok=True)
                profile.parent.rmdir()
            changes = len(
                [e for e in lab.fleet().ListEvents(_events_request(), timeout=5).events if e.kind == "scale"]
            )
            self.say("tearing the lab down")
        covered = [p for p in self.points if p.demand is not None]
        demand_sum = sum(p.demand or 0 for p in covered)
        return Summary(
            day_seconds=self.day,
            points=len(self.points),
            coverage=sum(1 for p in covered if p.allocation >= (p.demand or 0)) / len(covered)
            if covered
            else None,
            slack=sum(max(0.0, p.allocation - (p.demand or 0)) for p in covered) / demand_sum
            if demand_sum
            else None,
            scaling_changes=changes,
            failover_outage_seconds=fo,
            failover_to=fo_to,
            failback_outage_seconds=fb,
            failback_after_seconds=fb_after,
            split_brain_samples=len(report.split_brains),
            vip_samples=report.samples,
            left_behind=_left_behind(),
        )

    def _day(self, probe: Probe, profile: Path) -> None:
        t0 = time.monotonic()
        live = Live(self.view(), console=self.console, refresh_per_second=4) if self.live_ok else None
        with live if live is not None else contextlib.nullcontext():
            next_print = 0.0
            while (t := time.monotonic() - t0) < self.day:
                profile.write_text(f"{daily_demand(t, self.day)}\n")
                q50, q99, _ = probe.forecast()
                cpu, _ = probe.allocation()
                self.points.append(Point(t, probe.demand(), q50, q99, cpu))
                if live is not None:
                    live.update(self.view())
                elif t >= next_print:
                    p = self.points[-1]
                    self.console.print(
                        f"  t={t:5.1f}s demand {_f(p.demand)} forecast {_f(p.q50)}..{_f(p.q99)} "
                        f"shadow limit {p.allocation:.2f} cores"
                    )
                    next_print = t + self.day / 10
                time.sleep(max(0.0, 0.5 - (time.monotonic() - t0 - t)))
        if live is None:
            self.console.print(chart(self.points, max([1.0, *[p.allocation for p in self.points]])))

    def _failover(self, lab: Lab) -> tuple[float | None, str, float | None, float | None, Any]:
        poller, checker = lab.poller().start(), lab.vipcheck().start()
        try:
            time.sleep(0.5)
            self.say("cutting p1's link to the network")
            cut = time.monotonic()
            lab.cut_link("p1")
            to = _wait_moved_from(lab, "p1", 15)
            self.say(f"the VIP is on {to} {time.monotonic() - cut:.2f} s after the cut; restoring p1's link")
            time.sleep(1.0)
            restored = time.monotonic()
            lab.restore_link("p1")
            self.say(f"p1 is back: failback once it has been healthy for {self.hold:.0f} s")
            lab.wait_owner(None, "p1", 30)
            back_after = time.monotonic() - restored
            time.sleep(0.5)
        finally:
            records, report = poller.stop(), checker.stop()
        fo = _outage_after(records, cut)
        fb = _outage_after(records, restored)
        self.say(
            f"client-visible outage: failover {_f(fo, ' s')}, failback {_f(fb, ' s')}; "
            f"{len(report.split_brains)} samples with two owners out of {report.samples}"
        )
        return fo, to, fb, back_after, report


def _wait_moved_from(lab: Lab, host: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holders = lab.vip_holders(None)
        if len(holders) == 1 and holders[0] != host:
            return holders[0]
        time.sleep(0.01)
    raise TimeoutError(f"the VIP did not move away from {host} within {timeout:.0f} s")


def _outage_after(records: list[Record], t: float) -> float | None:
    """The first client-visible outage that ended after `t` (0 if the client never noticed)."""
    for o in outages(records):
        if o.start is not None and o.end is not None and o.end >= t:
            return o.end - o.start
    return 0.0


def _events_request() -> Any:
    from shadowplane.v1 import fleet_pb2 as fpb

    return fpb.ListEventsRequest(limit=10_000)


def _f(v: float | None, unit: str = "") -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def _left_behind() -> list[str]:
    import subprocess

    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left = [line.split()[0] for line in out.splitlines() if line.startswith("splab-")]
    if Path("/sys/fs/cgroup/unified/splab").exists() or Path("/sys/fs/cgroup/splab").exists():
        left.append("cgroup /splab")
    return left


def run_demo(day: float = 75.0, hold: float = 5.0, console: Console | None = None) -> Summary:
    console = console or Console()
    spec = Spec(shadows=2, timings=Timings(failback_hold_seconds=hold, scaling_interval_seconds=1.0))
    demo = Demo(console, day, hold)
    demo.say("building the lab: network namespaces, a bridge, a controller, three agents, web servers")
    summary = demo.run(spec)
    t = Table(title="summary", box=None, show_header=False)
    rows = [
        ("compressed day", f"{summary.day_seconds:.0f} s, {summary.points} samples"),
        ("shadow limit >= demand", "-" if summary.coverage is None else f"{summary.coverage:.1%} of samples"),
        ("unused shadow CPU / demand", _f(summary.slack)),
        ("scaling changes applied", str(summary.scaling_changes)),
        (
            "failover outage (client)",
            f"{_f(summary.failover_outage_seconds, ' s')} (p1 -> {summary.failover_to})",
        ),
        (
            "failback outage (client)",
            f"{_f(summary.failback_outage_seconds, ' s')} "
            f"({_f(summary.failback_after_seconds, ' s')} after p1 came back)",
        ),
        ("samples with two VIP owners", f"{summary.split_brain_samples} of {summary.vip_samples}"),
        ("left behind", ", ".join(summary.left_behind) or "nothing"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    return summary


def summary_dict(s: Summary) -> dict[str, Any]:
    return asdict(s)

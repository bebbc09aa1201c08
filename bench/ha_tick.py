"""The HA loop's tick at fleet sizes: the production `FailoverLoop.tick` (controller defaults, every
service placed and stable, every host's agent connected and heard from, every observer reporting), timed
on this process's loop, as the controller runs it every `loop_interval_seconds` (shipped: 50 ms) on the
loop that also answers lease renewals.

    .venv/bin/python bench/ha_tick.py [--hosts 500 2000] [--ticks 100] [--baseline REF]

Per fleet size: the median and p99 tick, the share of the loop interval it takes, and the longest the tick
holds the loop at a time (a tick runs in slices with the loop free between them; a baseline without slices
holds it for the whole tick), for this tree and for the baseline commit (`git archive`, run in the same
way in a process of its own), alternated in one run; the figures that compare are their ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the tree to measure: this one, or the baseline's export (HA_TICK_TREE)
sys.path.insert(0, os.environ.get("HA_TICK_TREE", str(ROOT)))
BASELINE = "a7f9dde"  # before the board index, the reused alive(), the records copy, the watch index

from controller.config import ControllerConfig, load_controller_config  # noqa: E402
from controller.event_log import EventLog  # noqa: E402
from controller.failover.loop import FailoverLoop, controller_lease_observer  # noqa: E402
from controller.failover.orchestrator import Orchestrator  # noqa: E402
from controller.registry import AgentRegistry, AgentSession  # noqa: E402
from controller.store import ServiceRecord, SqliteStore  # noqa: E402
from shadowplane.clock import now_ms  # noqa: E402
from shadowplane.v1 import agent_pb2 as apb  # noqa: E402


def config(d: Path, hosts: int) -> ControllerConfig:
    names = [f"h{i:05d}" for i in range(hosts)]
    out = ['listen = "127.0.0.1:7400"\n[tls]\nplaintext = true']
    out += [f'[[host]]\nname = "{h}"\naddress = "127.0.0.1"' for h in names]
    for i in range(0, hosts - 2, 4):  # a service per 4 hosts: primary, two shadows
        out.append(
            f'[[service]]\nname = "svc{i:05d}"\nprimary = "{names[i]}"\n'
            f'shadows = ["{names[i + 1]}", "{names[i + 2]}"]\nvip = "10.99.0.1/24"'
        )
    p = d / "c.toml"
    p.write_text("\n\n".join(out) + "\n")
    return load_controller_config(p)


async def ticks(cfg: ControllerConfig, d: Path, n: int) -> list[float]:
    store = SqliteStore(d / f"c{time.monotonic_ns()}.db")
    registry, events = AgentRegistry(), EventLog(store)
    observer = controller_lease_observer(cfg, store)
    loop = FailoverLoop(
        cfg, store, registry, events, observer, Orchestrator(cfg, store, registry, events, observer)
    )
    for h in cfg.host:
        registry.attach(
            AgentSession(h.name, f"{h.name}-1", "peer", apb.Hello(host=h.name), now_ms(), now_ms())
        )
    for svc in cfg.service:
        store.save_service_state(ServiceRecord(svc.name, owner=svc.primary, token=1, phase="stable"))
        for o in svc.observer_names():
            if o == "controller":
                continue
            for t in (svc.primary, *svc.shadows):
                if t != o:
                    loop.board.put(o, apb.Observation(service=svc.name, target=t, kind="health", up=True))
    loop.started -= 3600  # past the placement grace
    out = []
    slices = getattr(loop, "_tick_slices", None)  # as FailoverLoop.run runs it (a baseline may have none)
    for _ in range(n):
        for s in registry.connected().values():
            s.last_heard_ms = now_ms()  # heartbeats
        t0 = time.perf_counter()
        if slices is None:
            loop.tick()
            held = [time.perf_counter() - t0]
        else:
            held, t = [], t0
            for _ in slices():
                held.append(time.perf_counter() - t)
                await asyncio.sleep(0)
                t = time.perf_counter()
            held.append(time.perf_counter() - t)
        out.append((sum(held), max(held)))
    store.close()
    return out


def worker(hosts: int, n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(Path(tmp), hosts)
        print(json.dumps({"services": len(cfg.service), "ticks": asyncio.run(ticks(cfg, Path(tmp), n))}))


def measure(tree: Path | None, hosts: int, n: int) -> tuple[int, list[tuple[float, float]]]:
    env = {k: v for k, v in os.environ.items() if k != "HA_TICK_TREE"}
    if tree is not None:
        env["HA_TICK_TREE"] = str(tree)
    out = subprocess.run(
        [sys.executable, __file__, "--worker", "--hosts", str(hosts), "--ticks", str(n)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    got = json.loads(out.strip().splitlines()[-1])
    return int(got["services"]), [(float(a), float(b)) for a, b in got["ticks"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--ticks", type=int, default=100)
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--rounds", type=int, default=2, help="each variant this many times, alternated")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.worker:
        worker(args.hosts[0], args.ticks)
        return 0
    interval = ControllerConfig().failover.loop_interval_seconds
    lines = [
        f"# bench/ha_tick.py --hosts {' '.join(map(str, args.hosts))} --ticks {args.ticks} --baseline "
        f"{args.baseline}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs; "
        f"loop interval {interval} s (shipped); a service per 4 hosts (primary, 2 shadows, "
        "default observers)",
    ]
    print(lines[0], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        base.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.baseline], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        for hosts in args.hosts:
            res: dict[str, list[tuple[float, float]]] = {"baseline": [], "this tree": []}
            services = 0
            for _ in range(args.rounds):
                for name, tree in (("baseline", base), ("this tree", None)):
                    services, t = measure(tree, hosts, args.ticks)
                    res[name] += t
            for name, t in res.items():
                whole, held = [x[0] for x in t], sorted(x[1] for x in t)
                med, p99 = statistics.median(whole), sorted(whole)[int(0.99 * len(whole))]
                lines.append(
                    f"N={hosts} hosts, {services} services, {name}: tick median {med * 1000:.2f} ms, "
                    f"p99 {p99 * 1000:.2f} ms ({med / interval:.0%} of the interval); the loop held at "
                    f"most {statistics.median(held) * 1000:.2f} ms at a time (median tick), "
                    f"{held[int(0.99 * len(held))] * 1000:.2f} ms (p99)"
                )
                print(lines[-1], flush=True)
            m = {(k, i): statistics.median(x[i] for x in v) for k, v in res.items() for i in (0, 1)}
            lines.append(
                f"N={hosts}: this tree / baseline: tick median "
                f"{m['this tree', 0] / m['baseline', 0]:.3f}; longest hold of the loop per tick "
                f"{m['this tree', 1] / m['baseline', 1]:.3f}"
            )
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The HA loop's tick at fleet sizes: the production `FailoverLoop.tick` (controller defaults, every
service placed and stable, every host's agent connected and heard from, every observer reporting), timed
on this process's loop, as the controller runs it every `loop_interval_seconds` (shipped: 50 ms) on the
loop that also answers lease renewals.

    .venv/bin/python bench/ha_tick.py [--hosts 500 2000] [--ticks 100] [--baseline REF]

Per fleet size: the median and p99 tick, and the share of the loop interval it takes, for this tree and
for the baseline commit (`git archive`, run in the same way in a process of its own), alternated in one
run; the figure that compares is their ratio.
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
    for _ in range(n):
        for s in registry.connected().values():
            s.last_heard_ms = now_ms()  # heartbeats
        t0 = time.perf_counter()
        loop.tick()
        out.append(time.perf_counter() - t0)
    store.close()
    return out


def worker(hosts: int, n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(Path(tmp), hosts)
        print(json.dumps({"services": len(cfg.service), "ticks": asyncio.run(ticks(cfg, Path(tmp), n))}))


def measure(tree: Path | None, hosts: int, n: int) -> tuple[int, list[float]]:
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
    return int(got["services"]), [float(x) for x in got["ticks"]]


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
            res: dict[str, list[float]] = {"baseline": [], "this tree": []}
            services = 0
            for _ in range(args.rounds):
                for name, tree in (("baseline", base), ("this tree", None)):
                    services, t = measure(tree, hosts, args.ticks)
                    res[name] += t
            for name, t in res.items():
                med, p99 = statistics.median(t), sorted(t)[int(0.99 * len(t))]
                lines.append(
                    f"N={hosts} hosts, {services} services, {name}: tick median {med * 1000:.2f} ms, "
                    f"p99 {p99 * 1000:.2f} ms ({med / interval:.0%} of the interval)"
                )
                print(lines[-1], flush=True)
            ratio = statistics.median(res["this tree"]) / statistics.median(res["baseline"])
            lines.append(f"N={hosts}: tick median this tree / baseline = {ratio:.3f}")
            print(lines[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

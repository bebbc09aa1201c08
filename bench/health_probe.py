"""What a TCP health check costs the process that runs it (the controller runs one per target of every
service it observes, every 0.2 s; each observer agent one per target it watches): CPU per probe of
`shadowplane.healthcheck.run_check` + `probe_tcp`, this tree against a baseline commit's, in one run.

N checks at the shipped defaults ([services.health] interval 0.2 s, timeout 0.2 s, fall 3, rise 2), against
listeners on loopback in another process (which accepts and closes, as a service does: its CPU is not
counted). Each variant runs in its own child process for `--seconds`, alternating, `--rounds` times; the
figure is the median CPU time per probe and the candidate / baseline ratio.

    .venv/bin/python bench/health_probe.py [--checks 1000] [--seconds 10] [--rounds 3] [--baseline REF]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(path: Path, name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def child(module: Path, ports: list[int], checks: int, seconds: float) -> None:
    from controller.config import HealthCheckConfig

    hc = load(module, "healthcheck_under_test")
    shipped = HealthCheckConfig()
    probes = 0
    ups = 0

    def report(_spec: object, tracker: object, _changed: bool) -> None:
        nonlocal probes, ups
        probes += 1
        ups += tracker.up is True  # type: ignore[attr-defined]

    async def run() -> tuple[float, float]:
        tasks = []
        for i in range(checks):
            spec = hc.CheckSpec(  # type: ignore[attr-defined]
                service=f"svc{i}", target=f"h{i}", address="127.0.0.1", kind="tcp",
                port=ports[i % len(ports)], interval=shipped.interval_seconds,
                timeout=shipped.timeout_seconds, fall=shipped.fall, rise=shipped.rise,
            )  # fmt: skip
            tasks.append(asyncio.create_task(hc.run_check(spec, lambda s=spec: hc.probe_tcp(s), report)))  # type: ignore[attr-defined]
            await asyncio.sleep(shipped.interval_seconds / checks)  # spread, as targets come and go
        await asyncio.sleep(2.0)  # settle
        nonlocal probes, ups
        probes = ups = 0
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        await asyncio.sleep(seconds)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        for t in tasks:
            t.cancel()
        return (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime), t1 - t0

    cpu, wall = asyncio.run(run())
    print(f"{cpu} {wall} {probes} {ups}")


async def listeners(n: int) -> None:
    def on_client(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    servers = [await asyncio.start_server(on_client, "127.0.0.1", 0, backlog=1024) for _ in range(n)]
    print(" ".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
    await asyncio.Event().wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checks", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--baseline",
        default="a896842",
        help="git ref of the baseline healthcheck.py (before issue 15's probe)",
    )
    ap.add_argument("--child", nargs=2, metavar=("MODULE", "PORTS"), help=argparse.SUPPRESS)
    ap.add_argument("--listen", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.listen:
        asyncio.run(listeners(args.listen))
        return 0
    if args.child:
        child(Path(args.child[0]), [int(p) for p in args.child[1].split(",")], args.checks, args.seconds)
        return 0
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "baseline_healthcheck.py"
        base.write_text(
            subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{args.baseline}:shadowplane/healthcheck.py"],
                check=True, capture_output=True, text=True,
            ).stdout
        )  # fmt: skip
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline], capture_output=True, text=True
        ).stdout.strip()
        variants = {
            f"baseline {args.baseline} ({rev})": base,
            "candidate (this tree)": ROOT / "shadowplane" / "healthcheck.py",
        }
        lst = subprocess.Popen(
            [sys.executable, __file__, "--listen", "16"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert lst.stdout is not None
            ports = ",".join(lst.stdout.readline().split())
            per: dict[str, list[float]] = {k: [] for k in variants}
            lines = [
                f"# bench/health_probe.py --checks {args.checks} --seconds {args.seconds:g} "
                f"--rounds {args.rounds}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
                f"{os.cpu_count()} CPUs",
                f"shipped check: interval 0.2 s, timeout 0.2 s, fall 3, rise 2; {args.checks} checks "
                f"= {args.checks / 0.2:.0f} probes/s offered, to 16 loopback listeners in another process",
            ]
            print("\n".join(lines), flush=True)
            for r in range(args.rounds):
                for name, path in variants.items():
                    out = subprocess.run(
                        [sys.executable, __file__, "--checks", str(args.checks),
                         "--seconds", str(args.seconds), "--child", str(path), ports],
                        check=True, capture_output=True, text=True,
                    ).stdout.split()  # fmt: skip
                    cpu, wall, probes, ups = float(out[0]), float(out[1]), int(out[2]), int(out[3])
                    us = cpu / max(1, probes) * 1e6
                    per[name].append(us)
                    line = (
                        f"round {r + 1} {name}: {probes / wall:.0f} probes/s done "
                        f"({ups / max(1, probes):.1%} up), CPU {cpu / wall:.1%} of a core, "
                        f"{us:.1f} us per probe"
                    )
                    print(line, flush=True)
        finally:
            lst.kill()
    b, c = (statistics.median(v) for v in per.values())
    print(f"median CPU per probe: baseline {b:.1f} us, candidate {c:.1f} us: {c / b:.3f} x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

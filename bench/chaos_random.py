"""The fault-injection suite's long run: a random schedule of every `lab chaos` scenario (full-length faults)
for several minutes on one lab, in the spirit of Jepsen's nemesis and Pacemaker's CTS; then each of the
saturation scenarios (CPU, I/O) once more with the shipped config defaults beside the lab's timings, since
the question there is which timings a busy owner survives without a false failover.

    .venv/bin/python bench/chaos_random.py --minutes 5 --seed 1 [--out bench/results/chaos_random.txt]

Prints the `lab chaos` table per scenario and the totals (samples with two owners, false failovers, rogue
renewals granted, outages over their bound, events and telemetry lost, daemons that died). Needs root and
stress-ng; leaves nothing behind.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab import chaos
from lab.runner import LabError
from lab.spec import Timings, shipped_timings, timings_text


def commit() -> str:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "?"


def section(title: str, timings: Timings, figs: list[chaos.Figures]) -> list[str]:
    t = chaos.totals(figs)
    return [
        f"## {title}",
        f"timings: {timings_text(timings)}",
        chaos.HEADER,
        *(chaos.row(f) for f in figs),
        f"totals: {t.scenarios} scenarios, {t.two_owner_samples} samples with two owners,"
        f" {t.false_failovers} false failovers, {t.rogue_grants} rogue renewals granted,"
        f" {t.outages_over_bound} outages over their bound, {t.events_lost} events and {t.telemetry_lost}"
        f" telemetry intervals lost, {t.daemons_died} daemons died",
        "",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="length of the random schedule")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-saturation", action="store_true", help="skip the saturation runs per timings")
    ap.add_argument("--out", type=Path, help="also write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("the benchmark builds a lab in network namespaces: run it as root")
        return 1
    lines = [
        f"lab chaos, random schedule: {args.minutes:g} min, seed {args.seed}, {dt.date.today()},"
        f" commit {commit()}, {os.cpu_count()} CPUs, kernel {os.uname().release}",
        "",
    ]

    def show(f: chaos.Figures) -> None:
        print(chaos.row(f), flush=True)

    try:
        print(chaos.HEADER, flush=True)
        lab_t = Timings()
        figs = chaos.run_scenarios(
            chaos.random_schedule(args.minutes, args.seed), False, show, chaos.chaos_spec(lab_t)
        )
        lines += section("random schedule, the lab's timings", lab_t, figs)
        if not args.no_saturation:
            saturation = [chaos.scenario("cpu-saturation"), chaos.scenario("io-saturation")]
            for title, t in (("shipped defaults", shipped_timings()), ("the lab's timings", lab_t)):
                figs = chaos.run_scenarios(list(saturation), False, show, chaos.chaos_spec(t))
                lines += section(f"saturation of the owner, {title}", t, figs)
    except LabError as e:
        print(f"chaos_random: {e}")
        return 2
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

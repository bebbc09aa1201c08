"""The controller's store sized for fleets: full samples for [store] raw_hours, then one row per workload per
forecast step (issue 15). Baseline and candidate in one run, fed the same telemetry:

- baseline: every sample kept for the retention (the store before compaction);
- candidate: production's upkeep (`controller.server.prune_forever`'s jobs: `Store.compact` of samples older
  than raw_hours onto the forecaster's step, `Store.prune` past retention_hours) every
  `PRUNE_EVERY_SECONDS` of simulated time, with the shipped defaults.

Hosts send a batch every 10 s (the agent's default) with 3 workloads, each sample filled as the agent fills
it with BPF on (syscall counts by name and latency, block I/O and TCP profiles, PSI), CPU and memory
following the NAB CPU traces (../shared/traces/nab). Time is simulated (no waiting): a day of a small fleet,
then per host-day figures and the arithmetic for 1,000 hosts at the defaults.

Prints: bytes per sample and per compacted step (live pages, with their indexes), the store for 1,000 hosts
at the defaults vs without compaction (ratio), the compaction's cost per sample and the share of a core it
takes at 1,000 hosts, and the forecaster's reads (a restart's seed, `Store.step_aggregates`; training's and
the challenger's day, `Store.resource_series`): candidate / baseline time.

    .venv/bin/python bench/store_history.py [--hosts 20] [--hours 24]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from controller.config import StoreConfig  # noqa: E402
from controller.predict.engine import PredictionEngine  # noqa: E402
from controller.predict.series import series_from_store  # noqa: E402
from controller.server import PRUNE_EVERY_SECONDS  # noqa: E402
from controller.store.sqlite import SqliteStore  # noqa: E402
from shadowplane.v1 import agent_pb2 as apb  # noqa: E402
from shadowplane.v1 import telemetry_pb2 as tpb  # noqa: E402
from training.traces import load_trace_dir  # noqa: E402

TRACES = ROOT.parent / "shared" / "traces" / "nab"
INTERVAL_MS = 10_000  # agentd's default interval_seconds
WORKLOADS = ("app", "cache", "batch")
SYSCALLS = [
    *("read", "write", "openat", "close", "fstat", "lseek", "mmap", "mprotect", "munmap", "brk"),
    *("rt_sigaction", "ioctl", "pread64", "pwrite64", "readv", "writev", "access", "pipe", "select"),
    *("sched_yield", "madvise", "dup2", "nanosleep", "getpid", "socket", "connect", "accept4", "sendto"),
    *("recvfrom", "epoll_wait", "futex"),
]
T0 = 1_700_000_000_000


def hist(rng: np.random.Generator, unit: str, n: int) -> tpb.Log2Histogram:
    return tpb.Log2Histogram(unit=unit, counts=[int(x) for x in rng.poisson(50, n)])


def agent_sample(w: str, end: int, u: float, rng: np.random.Generator) -> tpb.WorkloadSample:
    """One workload's sample as the agent fills it with BPF on (a busy server's profile)."""
    secs = INTERVAL_MS / 1000
    press = tpb.Pressure(available=True, some_avg10=u * 3, full_avg10=u, some_stall_us=int(u * 9e4))
    return tpb.WorkloadSample(
        workload=w,
        cgroup=f"/system.slice/{w}.service",
        start_unix_ms=end - INTERVAL_MS,
        end_unix_ms=end,
        syscalls=tpb.SyscallProfile(
            total=int(u * 4e5),
            by_name={n: int(rng.integers(1, 20_000)) for n in SYSCALLS},
            latency=hist(rng, "ns", 24),
            latency_sample_every=64,
            latency_timed_seconds=0.4,
        ),
        block_io=tpb.BlockIOProfile(
            read_ops=int(rng.integers(0, 3000)),
            write_ops=int(rng.integers(0, 3000)),
            read_bytes=int(rng.integers(0, 10**8)),
            write_bytes=int(rng.integers(0, 10**8)),
            latency=hist(rng, "us", 16),
        ),
        tcp=tpb.TcpProfile(
            state_changes={"ESTABLISHED": int(rng.integers(0, 500)), "CLOSE": int(rng.integers(0, 500))},
            srtt=hist(rng, "us", 14),
            retransmits=int(rng.integers(0, 20)),
            active_opens=int(rng.integers(0, 200)),
        ),
        resources=tpb.Resources(
            cpu_seconds=2.0 * u * secs,
            cpu_limit_cores=2.0,
            memory_bytes=int((0.5 + u) * (1 << 30)),
            memory_limit_bytes=4 << 30,
            io_read_bytes=int(rng.integers(0, 10**8)),
            io_write_bytes=int(rng.integers(0, 10**8)),
            tasks=int(rng.integers(8, 64)),
            cpu_pressure=press,
            memory_pressure=press,
            io_pressure=press,
            cpu_throttled_us=int(u * 1e5),
        ),
    )


def live_bytes(store: SqliteStore) -> int:
    """Bytes of the pages in use (freed pages are reused by later writes, not returned to the disk)."""
    db = store.db
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    used = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
    return int(used * db.execute("PRAGMA page_size").fetchone()[0])


def packed_bytes(path: Path, fold_all_ms: int = 0, step_ms: int = 0) -> tuple[int, int, int]:
    """A copy of a store, everything folded into steps if asked, vacuumed: (bytes, samples, steps) -- the
    table's own size per row, without the holes that deletes leave for later writes."""
    copy = path.with_suffix(".copy")
    src = SqliteStore(path)
    src.db.execute(f"VACUUM INTO '{copy}'")
    src.close()
    s = SqliteStore(copy)
    if fold_all_ms:
        s.compact(fold_all_ms, step_ms)
    s.db.execute("VACUUM")
    out = (
        live_bytes(s),
        *(s.db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("samples", "steps")),
    )
    s.close()
    copy.unlink()
    return out


def timed(fn: object, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--hours", type=float, default=24.0)
    args = ap.parse_args()
    cfg = StoreConfig()
    engine = PredictionEngine(None)
    step_ms = int(engine.step_seconds * 1000)
    traces = [t.values for t in load_trace_dir(TRACES) if "cpu" in t.name]
    rng = np.random.default_rng(0)
    print(
        f"# bench/store_history.py --hosts {args.hosts} --hours {args.hours:g}, "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs"
    )
    print(
        f"defaults: [store] raw_hours {cfg.raw_hours:g}, retention_hours {cfg.retention_hours:g}; "
        f"forecast step {engine.step_seconds} s (packaged model); upkeep every {PRUNE_EVERY_SECONDS:g} s; "
        f"agents: {len(WORKLOADS)} workloads, a batch every {INTERVAL_MS / 1000:g} s"
    )
    with tempfile.TemporaryDirectory() as d:
        base, cand = SqliteStore(Path(d) / "base.db"), SqliteStore(Path(d) / "cand.db")
        hosts = [f"host-{i:04d}" for i in range(args.hosts)]
        for s in (base, cand):
            for h in hosts:
                s.register_agent(apb.Hello(host=h, instance_id="i1"), "peer", T0)
        demand = [[(traces[(i * 3 + k) % len(traces)], int(rng.integers(0, 4000))) for k in range(3)]
                  for i in range(len(hosts))]  # fmt: skip
        steps_total = int(args.hours * 3600_000 // INTERVAL_MS)
        upkeep_every = int(PRUNE_EVERY_SECONDS * 1000 // INTERVAL_MS)
        blob = 0
        compact_s, folded = 0.0, 0
        for k in range(steps_total):
            end = T0 + (k + 1) * INTERVAL_MS
            for i, h in enumerate(hosts):
                samples = [
                    agent_sample(w, end, min(1.0, max(0.0, float(t[(o + k) % len(t)]) / 100)), rng)
                    for w, (t, o) in zip(WORKLOADS, demand[i], strict=True)
                ]
                b = apb.TelemetryBatch(seq=k + 1, samples=samples)
                blob = max(blob, len(samples[0].SerializeToString()))
                base.append_batch(h, "i1", b, end)
                cand.append_batch(h, "i1", b, end)
            if (k + 1) % upkeep_every == 0:  # production's upkeep round, at simulated time `end`
                t0 = time.perf_counter()
                folded += cand.compact(int(end - cfg.raw_hours * 3600_000), step_ms)
                cand.prune(int(end - cfg.retention_hours * 3600_000))
                compact_s += time.perf_counter() - t0
        now = T0 + steps_total * INTERVAL_MS
        samples = steps_total * len(hosts) * len(WORKLOADS)
        b_bytes, c_bytes = live_bytes(base), live_bytes(cand)
        raw_left = cand.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        step_rows = cand.db.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
        empty = SqliteStore(Path(d) / "empty.db")
        e_bytes = packed_bytes(Path(d) / "empty.db")[0]
        empty.close()
        pb, nb, _ = packed_bytes(Path(d) / "base.db")
        pc, _, ns = packed_bytes(Path(d) / "cand.db", now + step_ms, step_ms)
        per_sample, per_step = (pb - e_bytes) / nb, (pc - e_bytes) / ns
        print(
            f"\nfed: {len(hosts)} hosts x {args.hours:g} h = {samples:,} samples (the agent's sample: "
            f"{blob} bytes serialized); candidate holds {raw_left:,} samples + {step_rows:,} steps "
            f"({folded:,} samples folded)"
        )
        print(
            f"pages in use: baseline {b_bytes / 1e6:.1f} MB, candidate {c_bytes / 1e6:.1f} MB "
            f"({c_bytes / b_bytes:.3f} x, at {args.hours:g} h)"
        )
        print(f"per stored sample {per_sample:.0f} bytes; per compacted step {per_step:.0f} bytes (vacuumed)")
        per_host_h = 3600_000 / INTERVAL_MS * len(WORKLOADS)  # samples per host-hour
        steps_host_h = 3600_000 / step_ms * len(WORKLOADS)
        for n in (1_000, 50_000):
            before = n * per_host_h * cfg.retention_hours * per_sample
            after = n * (
                per_host_h * cfg.raw_hours * per_sample + steps_host_h * cfg.retention_hours * per_step
            )
            print(
                f"{n:,} hosts, {cfg.retention_hours:g} h retention: without compaction "
                f"{before / 1e9:.1f} GB, with ({cfg.raw_hours:g} h of samples + steps) {after / 1e9:.2f} GB "
                f"({after / before:.3f} x)"
            )
        us = compact_s / max(1, folded) * 1e6
        need = 1_000 * len(WORKLOADS) * 1000 / INTERVAL_MS
        print(
            f"upkeep: {us:.1f} us per folded sample (compact + prune, the store worker's thread): at 1,000 "
            f"hosts ({need:.0f} samples/s) {need * us / 1e6:.1%} of a core"
        )
        seed_since = now - (engine.history_steps + 1) * step_ms
        tb = timed(lambda: base.step_aggregates(seed_since, step_ms))
        tc = timed(lambda: cand.step_aggregates(seed_since, step_ms))
        print(
            f"restart seed ({engine.history_steps} steps, Store.step_aggregates): baseline "
            f"{tb * 1e3:.0f} ms, candidate {tc * 1e3:.0f} ms ({tc / tb:.2f} x)"
        )
        day = now - 24 * 3600_000
        tb = timed(lambda: series_from_store(base.resource_series(since_ms=day), engine.step_seconds))
        tc = timed(lambda: series_from_store(cand.resource_series(since_ms=day), engine.step_seconds))
        print(
            f"a day for training / the challenger (resource_series + resampling): baseline "
            f"{tb * 1e3:.0f} ms, candidate {tc * 1e3:.0f} ms ({tc / tb:.2f} x)"
        )
        base.close()
        cand.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

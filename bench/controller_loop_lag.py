"""The controller's event-loop lag while it backtests a challenger, prunes, and serves 10,000-row queries.

The loop that runs these also answers lease renewals (every 0.25 s) and the HA loop (every 50 ms); the
requirement is a lag under 20 ms p99 with all three loads at once. Both the code before the loads moved off
the loop (the baseline, a git commit exported to a temporary directory) and this checkout run the same
scenario in one run, each as production runs it: `python -m controller.cli run`, mutual TLS, the shipped
defaults (printed), on a copy of one seeded store:

- **prune**: the store holds `--old-rows` samples older than the retention (168 h), which the controller
  deletes when it starts (then every 5 minutes), as after a retention change or a long outage;
- **backtest**: the model file is replaced again and again; each time an operator's override (freeze /
  clear, Fleet.SetOverride) wakes the scaling cycle, which backtests the challenger against the champion on
  the last day of `--workloads` workloads (10 s samples, as the agents' default interval);
- **query**: a client asks GetTelemetry for 10,000 rows of one workload, back to back.

The lag is measured from outside, as an owner sees it: a lease renewal (Lease.Renew with an agent's
certificate) every 20 ms, its round trip (an idle loopback renewal is about 1 ms of it). The checkout's own
`shadowplane_controller_loop_lag_seconds` histogram is read from /metrics too (the baseline has none).

    .venv/bin/python bench/controller_loop_lag.py [--baseline REF] [--seconds 30]
    .venv/bin/python bench/controller_loop_lag.py --only checkout --loads query   # which load hurts

BENCH_KEEP_LOG=FILE keeps a copy of the last variant's controller log (e.g. run with PYTHONASYNCIODEBUG=1).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from controller.predict.model import DEFAULT_MODEL  # noqa: E402
from controller.store import SqliteStore  # noqa: E402
from lab.procs import free_port, stop, wait_for_port  # noqa: E402
from shadowplane.loop_lag import BUCKETS  # noqa: E402
from shadowplane.pki import init_ca, issue  # noqa: E402
from shadowplane.tls import TlsConfig, sync_channel  # noqa: E402
from shadowplane.v1 import agent_pb2 as apb  # noqa: E402
from shadowplane.v1 import fleet_pb2 as fpb  # noqa: E402
from shadowplane.v1 import fleet_pb2_grpc as fgrpc  # noqa: E402
from shadowplane.v1 import lease_pb2 as lpb  # noqa: E402
from shadowplane.v1 import lease_pb2_grpc as lgrpc  # noqa: E402
from shadowplane.v1 import telemetry_pb2 as tpb  # noqa: E402

# The commit before the challenger backtest, pruning and GetTelemetry moved off the controller's loop.
BASELINE = "6859372"
RESULTS = ROOT / "bench" / "results" / "controller_loop_lag.txt"
HOSTS = ("h0", "h1", "h2", "h3")
SAMPLE_SECONDS = 10  # the agents' default interval_seconds
RECENT_HOURS = 30  # more than the backtest's day, and more than 10,000 samples per workload
QUERY_ROWS = 10_000
PROBE_EVERY = 0.02


# ---- the seeded store ----


def seed_store(path: Path, workloads: int, old_rows: int) -> dict[str, int]:
    """Every workload has RECENT_HOURS of samples; `old_rows` more, spread over them, are 8 days old."""
    store = SqliteStore(path)
    now_ms = int(time.time() * 1000)
    names = [(HOSTS[i % len(HOSTS)], "web" if i < len(HOSTS) else f"batch-{i}") for i in range(workloads)]
    by_host: dict[str, list[str]] = {}
    for host, w in names:
        by_host.setdefault(host, []).append(w)
    recent = RECENT_HOURS * 3600 // SAMPLE_SECONDS
    old_each = old_rows // workloads
    seq: dict[str, int] = {}
    for host, ws in by_host.items():
        hello = apb.Hello(
            host=host,
            instance_id=f"{host}-seed",
            workloads=[
                tpb.WorkloadInfo(
                    name=w,
                    cgroup=f"/bench.slice/{w}",
                    role=tpb.ROLE_SHADOW if host != HOSTS[0] and w == "web" else tpb.ROLE_PRIMARY,
                    service="web" if w == "web" else w,
                )
                for w in ws
            ],
            host_info=apb.HostInfo(cpu_cores=8, memory_bytes=32 << 30),
            interval_ms=SAMPLE_SECONDS * 1000,
        )
        store.register_agent(hello, "127.0.0.1", now_ms)
        seq[host] = 0
    old_end = now_ms - 8 * 24 * 3600 * 1000
    for host, w in names:
        ends = [old_end - i * SAMPLE_SECONDS * 1000 for i in range(old_each)]
        ends += [now_ms - i * SAMPLE_SECONDS * 1000 for i in range(recent)]
        for start in range(0, len(ends), 2000):
            seq[host] += 1
            batch = apb.TelemetryBatch(
                seq=seq[host], samples=[_sample(w, e) for e in ends[start : start + 2000]]
            )
            store.append_batch(host, f"{host}-seed", batch, now_ms)
    store.close()
    return {"workloads": workloads, "recent_per_workload": recent, "old_rows": old_each * workloads}


def _sample(workload: str, end_ms: int) -> tpb.WorkloadSample:
    t = end_ms / 1000
    cpu = 0.5 + 0.3 * ((t / 3600) % 24) / 24 + 0.05 * ((t * 7919) % 1)
    return tpb.WorkloadSample(
        workload=workload,
        cgroup=f"/bench.slice/{workload}",
        start_unix_ms=end_ms - SAMPLE_SECONDS * 1000,
        end_unix_ms=end_ms,
        syscalls=tpb.SyscallProfile(
            total=int(cpu * 50_000),
            by_name={"read": int(cpu * 20_000), "write": int(cpu * 15_000), "epoll_wait": 9_000},
            latency=tpb.Log2Histogram(unit="ns", counts=[0, 3, 40, 500, 900, 300, 40, 2]),
            latency_sample_every=8,
        ),
        resources=tpb.Resources(
            cpu_seconds=cpu * SAMPLE_SECONDS,
            cpu_limit_cores=2.0,
            memory_bytes=int((1 + cpu) * (1 << 30)),
            memory_limit_bytes=4 << 30,
            io_read_bytes=int(cpu * 1e6),
            io_write_bytes=int(cpu * 5e5),
            tasks=12,
        ),
    )


# ---- the two clients, each its own process (their decoding must not delay each other) ----


def tls_for(pki: Path, stem: str) -> TlsConfig:
    return TlsConfig(ca=pki / "ca.pem", cert=pki / f"{stem}.pem", key=pki / f"{stem}.key")


def probe_main(port: int, pki: Path, seconds: float, out: Path) -> None:
    """Renew every PROBE_EVERY seconds (sequentially); write each round trip."""
    wait_for_port("127.0.0.1", port, 30)
    stub = lgrpc.LeaseStub(sync_channel(f"127.0.0.1:{port}", tls_for(pki, "agent-bench-probe")))
    rtts: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        with contextlib.suppress(grpc.RpcError):  # a refusal is an answer: the loop ran it
            stub.Renew(lpb.RenewRequest(service="web", token=1, holder="bench-probe"), timeout=60)
        rtts.append(time.monotonic() - t0)
        time.sleep(max(0.0, PROBE_EVERY - (time.monotonic() - t0)))
    out.write_text(json.dumps(rtts))


def query_main(port: int, pki: Path, seconds: float, out: Path) -> None:
    """GetTelemetry for QUERY_ROWS rows of one workload, back to back."""
    # An operator's client runs on another machine; here it shares this one's CPUs with the controller
    # under test, so it gives way (the probe, which measures, does not).
    os.nice(10)
    wait_for_port("127.0.0.1", port, 30)
    channel = sync_channel(f"127.0.0.1:{port}", tls_for(pki, "operator-bench-op"))
    # The reply is decoded once to count its rows, then taken as bytes: decoding 10,000 rows a few times a
    # second would take the CPU this machine's controller needs, and measure the client instead.
    raw = channel.unary_unary(
        "/shadowplane.v1.Fleet/GetTelemetry",
        request_serializer=fpb.GetTelemetryRequest.SerializeToString,
        response_deserializer=None,
    )
    request = fpb.GetTelemetryRequest(host=HOSTS[0], workload="web", limit=QUERY_ROWS)
    rows, took = [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        r = raw(request, timeout=120)
        took.append(time.monotonic() - t0)
        rows.append(len(fpb.GetTelemetryResponse.FromString(r).samples) if not rows else rows[0])
    out.write_text(json.dumps({"rows": rows, "seconds": took}))


# ---- one variant ----


def controller_config(d: Path, pki: Path, port: int, metrics_port: int, model: Path) -> str:
    return (
        f'listen = "127.0.0.1:{port}"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
        f'[store]\npath = "{d}/controller.db"\n'
        f'[scaling]\nmodel = "{model}"\n'
        f'[tls]\nca = "{pki}/ca.pem"\ncert = "{pki}/controller-ctl.pem"\nkey = "{pki}/controller-ctl.key"\n'
        + "".join(f'[[host]]\nname = "{h}"\naddress = "127.0.0.1"\n' for h in HOSTS)
        + f'[[service]]\nname = "web"\nprimary = "{HOSTS[0]}"\nshadows = ["{HOSTS[1]}", "{HOSTS[2]}"]\n'
        'vip = "10.250.0.1/24"\n[service.health]\nport = 1\n'
    )


def run_variant(
    name: str, tree: Path, seed: Path, pki: Path, seconds: float, work: Path, loads: set[str]
) -> dict[str, object]:
    d = work / re.sub(r"\W+", "-", name)
    d.mkdir()
    shutil.copy(seed, d / "controller.db")
    if "prune" not in loads:  # nothing past the retention: the controller's start-up prune finds nothing
        store = SqliteStore(d / "controller.db")
        store.prune(int((time.time() - (RECENT_HOURS + 1) * 3600) * 1000))
        store.close()
    model = d / "model.onnx"
    shutil.copy(DEFAULT_MODEL, model)
    port, metrics_port = free_port(), free_port()
    cfg = d / "controller.toml"
    cfg.write_text(controller_config(d, pki, port, metrics_port, model))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log = d / "controller.log"
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--port", str(port), "--pki", str(pki), "--seconds", str(seconds)]
    (d / "query.json").write_text(json.dumps({"rows": [], "seconds": []}))
    clients = [subprocess.Popen([*me, "probe", *common, "--out", str(d / "probe.json")])]
    if "query" in loads:
        clients.append(subprocess.Popen([*me, "query", *common, "--out", str(d / "query.json")]))
    with open(log, "wb") as out:
        ctl = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", "run", "--config", str(cfg)],
            cwd=tree,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        try:
            wait_for_port("127.0.0.1", port, 60, ctl)
        except (RuntimeError, TimeoutError):
            sys.exit(f"{name}: the controller did not start:\n{log.read_text()[-3000:]}")
        ops = fgrpc.FleetStub(sync_channel(f"127.0.0.1:{port}", tls_for(pki, "operator-bench-op")))
        end = time.monotonic() + seconds
        backtests, kinds = 0, ("freeze", "clear")
        time.sleep(1.0)  # the first scaling cycle notes the model file as it is
        while "backtest" in loads and time.monotonic() < end - 1:
            seen = log.read_text().count("champion/challenger:")
            shutil.copy(DEFAULT_MODEL, model)
            os.utime(model, (time.time(), time.time() + backtests + 1))  # a "retrained" model
            ops.SetOverride(
                fpb.Override(host=HOSTS[1], workload="web", kind=kinds[backtests % 2], reason="bench"),
                timeout=60,
            )
            while log.read_text().count("champion/challenger:") == seen and time.monotonic() < end:
                time.sleep(0.05)
            backtests += 1
        for c in clients:
            c.wait(timeout=seconds + 180)
        metrics = ""
        with contextlib.suppress(OSError):
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
                metrics = r.read().decode()
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
        stop(ctl)
    text = log.read_text()
    if os.environ.get("BENCH_KEEP_LOG"):
        shutil.copy(log, os.environ["BENCH_KEEP_LOG"])
    pruned = sum(int(n) for n in re.findall(r"retention: deleted (\d+) samples", text))
    rtts = json.loads((d / "probe.json").read_text())
    q = json.loads((d / "query.json").read_text())
    return {
        "name": name,
        "rtts": rtts,
        "queries": len(q["rows"]),
        "query_rows": max(q["rows"]) if q["rows"] else 0,
        "query_median_s": statistics.median(q["seconds"]) if q["seconds"] else float("nan"),
        "backtests": len(re.findall(r"\[model\].*champion/challenger:", text)),
        "pruned": pruned,
        "histogram": parse_histogram(metrics),
    }


def parse_histogram(text: str) -> dict[str, float]:
    """le -> cumulative count of shadowplane_controller_loop_lag_seconds ({} when not exported)."""
    return {
        m[0]: float(m[1])
        for m in re.findall(
            r'^shadowplane_controller_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M
        )
    }


def histogram_quantile(h: dict[str, float], q: float) -> str:
    if not h:
        return "not exported"
    total = h["+Inf"]
    for le in (*BUCKETS, float("inf")):
        key = "+Inf" if le == float("inf") else repr(le)
        if h.get(key, 0) >= q * total:
            return f"<= {le * 1000:g} ms" if le != float("inf") else f"> {BUCKETS[-1]} s"
    return "?"


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---- main ----


def export_tree(ref: str, into: Path) -> None:
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    for name in ("probe", "query"):
        c = sub.add_parser(name)
        c.add_argument("--port", type=int, required=True)
        c.add_argument("--pki", type=Path, required=True)
        c.add_argument("--seconds", type=float, required=True)
        c.add_argument("--out", type=Path, required=True)
    p.add_argument("--baseline", default=BASELINE, help=f"git commit of the baseline (default {BASELINE})")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each variant's run")
    p.add_argument("--workloads", type=int, default=12)
    p.add_argument("--old-rows", type=int, default=300_000, help="samples past the retention (0: no prune)")
    p.add_argument(
        "--loads", default="prune,backtest,query", help="which loads run (to find the one that hurts)"
    )
    p.add_argument("--only", choices=("baseline", "checkout"), help="run one variant only (no ratio)")
    args = p.parse_args()
    if args.cmd == "probe":
        return probe_main(args.port, args.pki, args.seconds, args.out)
    if args.cmd == "query":
        return query_main(args.port, args.pki, args.seconds, args.out)

    from controller.config import ControllerConfig, FailoverConfig, ScalingConfig, StoreConfig
    from controller.server import PRUNE_EVERY_SECONDS

    with tempfile.TemporaryDirectory(prefix="loop-lag-") as tmp:
        work = Path(tmp)
        pki = work / "tls"
        init_ca(pki)
        issue(pki, "ctl", "controller", ("127.0.0.1",))
        issue(pki, "bench-probe", "agent")
        issue(pki, "bench-op", "operator")
        t0 = time.monotonic()
        sizes = seed_store(work / "seed.db", args.workloads, args.old_rows if "prune" in args.loads else 0)
        seeded = time.monotonic() - t0
        export_tree(args.baseline, work / "baseline")
        loads = set(args.loads.split(","))
        # The baseline and this checkout under the loads, then this checkout idle: the machine's own noise
        # floor at the same time (other processes on a shared host delay the loop and the probe too).
        variants = [
            (f"baseline ({args.baseline})", work / "baseline", loads),
            ("this checkout", ROOT, loads),
            ("this checkout, idle", ROOT, set()),
        ]
        if args.only:
            variants = [variants[0 if args.only == "baseline" else 1]]
        results = [run_variant(n, t, work / "seed.db", pki, args.seconds, work, ls) for n, t, ls in variants]

    st, fo, sc = StoreConfig(), FailoverConfig(), ScalingConfig()
    lines = [
        f"controller event-loop lag under load — {dt.date.today()} — {platform.node()}, "
        f"{os.cpu_count()} CPUs, kernel {platform.release()}, Python {platform.python_version()}",
        "",
        "Production's defaults (each variant runs `python -m controller.cli run`, mutual TLS): "
        f"store.retention_hours {st.retention_hours:g} "
        f"(pruned at start, then every {PRUNE_EVERY_SECONDS:g} s), "
        f"failover.loop_interval_seconds {fo.loop_interval_seconds:g}, renew_interval_seconds "
        f"{fo.renew_interval_seconds:g}, scaling.interval_seconds {sc.interval_seconds:g} (woken by an "
        f"operator's override after each new model file), the packaged model; listen, metrics, store path, "
        "model path and hosts are the bench's own. "
        f"max_message_bytes {ControllerConfig().max_message_bytes}.",
        f"Loads, all at once for {args.seconds:g} s: prune {sizes['old_rows']} samples past the retention; "
        f"backtest a challenger on the last day of {sizes['workloads']} workloads "
        f"({sizes['recent_per_workload']} samples each at {SAMPLE_SECONDS} s, {RECENT_HOURS} h kept), again "
        f"after each decision; GetTelemetry of {QUERY_ROWS} rows back to back. "
        f"Store seeded in {seeded:.0f} s.",
        f"Lag = round trip of a lease renewal sent every {PROBE_EVERY * 1000:g} ms from another process "
        "(includes ~1 ms of gRPC + TLS on loopback).",
        "",
        f"{'variant':<24} {'renewals':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  "
        f"{'backtests':>9} {'pruned':>7} {'queries':>7} {'rows':>6} {'query s':>7}  loop-lag histogram p99",
    ]
    for r in results:
        rtts = r["rtts"]
        assert isinstance(rtts, list)
        h = r["histogram"]
        assert isinstance(h, dict)
        lines.append(
            f"{r['name']:<24} {len(rtts):>8} {pct(rtts, 0.5) * 1000:>8.1f} {pct(rtts, 0.99) * 1000:>8.1f} "
            f"{max(rtts) * 1000:>8.0f}  {r['backtests']:>9} {r['pruned']:>7} {r['queries']:>7} "
            f"{r['query_rows']:>6} {r['query_median_s']:>7.2f}  {histogram_quantile(h, 0.99)}"
            + (f" ({int(h['+Inf'])} probes)" if h else "")
        )
    if len(results) == 3:
        base, cand, idle = (pct(r["rtts"], 0.99) for r in results)  # type: ignore[arg-type]
        bmax, cmax, _ = (max(r["rtts"]) for r in results)  # type: ignore[type-var, arg-type]
        lines += [
            "",
            f"p99 ratio this checkout / baseline: {cand / base:.3f}; max ratio {cmax / bmax:.3f}; "
            f"target p99 < 20 ms: {'met' if cand < 0.020 else 'NOT met'} ({cand * 1000:.1f} ms); the same "
            f"checkout idle at the same time: p99 {idle * 1000:.1f} ms (this machine's floor; load average "
            f"{os.getloadavg()[0]:.1f} at the end)",
        ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()

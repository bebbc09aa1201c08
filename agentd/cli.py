"""`shadowplane-agentd`: the Workload Mirroring Agent daemon, and its one-shot probe."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from agentd import capabilities, held_leases
from agentd.actuate.address import Addresses
from agentd.capture.bpf_capture import Builder, unavailable_reason
from agentd.capture.collector import Collector
from agentd.cgroupfs import CgroupError, CgroupLayout
from agentd.config import AgentConfig, CaptureConfig, WorkloadConfig, load_agent_config
from agentd.daemon import capture_features, serve, start_capture
from shadowplane import logs
from shadowplane.config import ConfigError
from shadowplane.histogram import quantile, render
from shadowplane.v1 import telemetry_pb2 as tpb

DEFAULT_CONFIG = "/etc/shadowplane/agentd.toml"

log = logging.getLogger("shadowplane.agentd")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shadowplane-agentd", description=__doc__)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="cmd")
    run = sub.add_parser("run", help="run the daemon (the default)")
    run.add_argument("--config", default=DEFAULT_CONFIG)
    chk = sub.add_parser("check-config", help="validate a config file and exit")
    chk.add_argument("--config", default=DEFAULT_CONFIG)
    rel = sub.add_parser(
        "release-all",
        help="remove every service address this agent added but those a cleanly stopped agent recorded "
        "to resume (systemd runs it after the agent stops)",
    )
    rel.add_argument("--config", default=DEFAULT_CONFIG, help="where lease_state_file is set")
    rel.add_argument(
        "--all", action="store_true", help="remove recorded addresses too (and forget the record)"
    )
    cap = sub.add_parser(
        "check-capture",
        help="load the BPF capture, print what this kernel lets it see and what not, and exit "
        "(0: loaded, 1: not)",
    )
    cap.add_argument("--json", action="store_true", help="machine-readable output (a CaptureStatus)")
    probe = sub.add_parser("probe", help="print one cgroup's workload profile over N seconds")
    probe.add_argument("--cgroup", required=True, help="cgroup path, e.g. /shadowplane.slice/web")
    probe.add_argument("--seconds", type=float, default=5.0)
    probe.add_argument("--json", action="store_true", help="machine-readable output")
    probe.add_argument("--no-bpf", action="store_true", help="cgroup files only")
    probe.add_argument("--cgroup-root", default="/sys/fs/cgroup")
    return p


def _print_profile(s: tpb.WorkloadSample, capture: tpb.CaptureStatus) -> None:
    secs = max(1e-9, (s.end_unix_ms - s.start_unix_ms) / 1000)
    r = s.resources
    print(f"cgroup {s.cgroup} over {secs:.1f}s")
    print(
        f"  cpu      {r.cpu_seconds / secs:.3f} cores   memory {r.memory_bytes / 2**20:.1f} MiB"
        f"   tasks {r.tasks}"
    )
    print(f"  cgroup io read {r.io_read_bytes} B, write {r.io_write_bytes} B")
    for name, p in (("cpu", r.cpu_pressure), ("memory", r.memory_pressure), ("io", r.io_pressure)):
        if p.available:
            print(f"  pressure {name:<6} some avg10 {p.some_avg10:.2f}%  full avg10 {p.full_avg10:.2f}%")
    if not capture.bpf_active:
        print(f"\nBPF capture unavailable: {capture.bpf_unavailable_reason}")
        return
    sc = s.syscalls
    print(f"\nsyscalls: {sc.total} total ({sc.total / secs:.0f}/s)")
    for name, n in sorted(sc.by_name.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {name:<22} {n}")
    print(f"syscall latency (1 in {sc.latency_sample_every} timed):")
    print(render(list(sc.latency.counts), "nsecs"))
    b = s.block_io
    print(
        f"\nblock I/O: read {b.read_ops} ops / {b.read_bytes} B, write {b.write_ops} ops / {b.write_bytes} B,"
        f" discard {b.discard_ops} ops / {b.discard_bytes} B"
    )
    print(render(list(b.latency.counts), "usecs"))
    t = s.tcp
    print(
        f"\nTCP: retransmits {t.retransmits}, connects {t.active_opens}, resets sent {t.resets_sent}"
        f" received {t.resets_received}"
    )
    if t.state_changes:
        print("  state changes: " + ", ".join(f"{k} {v}" for k, v in sorted(t.state_changes.items())))
    p50 = quantile(list(t.srtt.counts), 0.5)
    print(f"  srtt p50 {p50:.0f} us" if p50 is not None else "  srtt: no samples")
    print(render(list(t.srtt.counts), "usecs"))
    dropped = {k: v for k, v in capture.dropped_events.items() if v}
    print(f"\ndropped events: {dropped or 'none'}")


def probe(args: argparse.Namespace) -> int:
    try:
        layout = CgroupLayout.detect(__import__("pathlib").Path(args.cgroup_root))
    except CgroupError as e:
        print(f"shadowplane-agentd probe: {e}", file=sys.stderr)
        return 2
    if not layout.exists(args.cgroup):
        print(
            f"shadowplane-agentd probe: --cgroup {args.cgroup}: no such cgroup under {args.cgroup_root}",
            file=sys.stderr,
        )
        return 2
    cfg = AgentConfig(capture=CaptureConfig(bpf=not args.no_bpf, create_cgroups=False))
    bpf, reason = start_capture(cfg)
    workload = WorkloadConfig(name="probe", cgroup=args.cgroup, role="primary", service="probe")
    try:
        collector = Collector(layout, [workload], bpf)
        if bpf is not None:
            bpf.time_latency(True)  # a probe is one short look: time latency all along it
        time.sleep(args.seconds)
        (sample,) = collector.collect()
        capture = tpb.CaptureStatus(
            bpf_active=bpf is not None,
            bpf_unavailable_reason=reason,
            dropped_events=bpf.dropped_events() if bpf else {},
            features=capture_features(bpf.features) if bpf else [],
        )
    finally:
        if bpf is not None:
            bpf.close()
    if args.json:
        out = {
            "sample": MessageToDict(sample, preserving_proto_field_name=True),
            "capture": MessageToDict(capture, preserving_proto_field_name=True),
        }
        print(json.dumps(out, indent=2))
    else:
        _print_profile(sample, capture)
    return 0


def release_all(config_path: str, everything: bool) -> int:
    """Remove every marked address but those the agent recorded when it stopped cleanly on this boot
    (its next start resumes them if the observers still grant the lease; until then the kernel lifetime
    bounds them, as for a hung agent). Without a readable config or record, remove them all."""
    keep: set[str] = set()
    try:
        state_file = load_agent_config(config_path).lease_state_file
    except (ConfigError, OSError) as e:
        print(f"release-all: {config_path}: {e}; removing every address", file=sys.stderr)
    else:
        try:
            if everything:
                held_leases.take(state_file)
            else:
                boot = held_leases.boot_id()
                keep = {
                    h.vip.split("/")[0] for h in held_leases.peek(state_file) if h.vip and h.boot_id == boot
                }
        except held_leases.StateFileError as e:
            print(f"release-all: lease_state_file {state_file}: {e}; removing every address", file=sys.stderr)
    addrs = Addresses()
    try:
        for a in addrs.remove_marked(keep=keep):
            print(f"removed {a}")
        for a in sorted(keep):
            print(f"kept {a}: recorded by the stopped agent for its next start")
    finally:
        addrs.close()
    return 0


def check_capture(args: argparse.Namespace) -> int:
    """Load the capture as the daemon would (with the default settings), say what it sees, unload it."""
    bpf, reason = start_capture(AgentConfig(capture=CaptureConfig(create_cgroups=False)))
    capture = tpb.CaptureStatus(
        bpf_active=bpf is not None,
        bpf_unavailable_reason=reason,
        features=capture_features(bpf.features) if bpf else [],
    )
    if bpf is not None:
        bpf.close()
    if args.json:
        print(json.dumps(MessageToDict(capture, preserving_proto_field_name=True), indent=2))
    elif bpf is None:
        print(f"BPF capture unavailable: {reason}")
    else:
        print("BPF capture loads on this kernel:")
        for f in capture.features:
            print(f"  [{'x' if f.captured else ' '}] {f.name}: {f.detail}")
    return 0 if bpf is not None else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup(args.log_level)
    cmd = args.cmd or "run"
    if cmd == "probe":
        return probe(args)
    if cmd == "check-capture":
        return check_capture(args)
    if cmd == "release-all":
        return release_all(args.config, args.all)
    config_path = getattr(args, "config", DEFAULT_CONFIG)
    try:
        cfg = load_agent_config(config_path)
    except ConfigError as e:
        print(f"shadowplane-agentd: bad config: {e}", file=sys.stderr)
        return 2
    if cmd == "check-config":
        print(f"{config_path}: ok ({len(cfg.workload)} workloads)")
        return 0
    builder = None
    keep_text = os.environ.get(capabilities.KEEP_ENV)
    if keep_text is not None:
        # Before any thread exists (capabilities are per thread): the capture's build child keeps the
        # start-up privileges it needs to attach, the daemon keeps only these.
        try:
            keep = capabilities.parse_keep(keep_text)
            if cfg.capture.bpf and unavailable_reason() is None:
                builder = Builder()
            dropped = capabilities.keep_only(keep)
        except capabilities.CapabilityError as e:
            print(f"shadowplane-agentd: {e}", file=sys.stderr)
            return 2
        if dropped:
            log.info(
                "dropped %s (only the capture's build child keeps them, until it has attached); running "
                "with %s",
                ", ".join(dropped),
                ", ".join(capabilities.names(keep)),
            )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(cfg, str(Path(config_path).resolve()), builder))
    return 0


if __name__ == "__main__":
    sys.exit(main())

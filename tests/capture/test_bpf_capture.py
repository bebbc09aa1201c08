"""Real eBPF capture against known workloads in their own cgroups (root + BPF)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.capture.bpf_capture import BpfCapture
from agentd.capture.kernel_features import FEATURES, KernelView
from tests.support import Workload, collector_for, need_bpf

LINUX_6_1 = Path(__file__).parent / "formats/linux-6.1"


class OnlyWhat61Has(KernelView):
    """This kernel's tracepoints, less what Debian 12's 6.1 lacks (per its real format files): the program
    built for 6.1 (skaddr-less tcp_probe, no sock_*_length, no block_io_start) runs here for real. A stand-in
    for the 6.1 kernel itself, which this machine cannot boot outside the VM suite."""

    def __init__(self) -> None:
        super().__init__()
        self.old = KernelView(LINUX_6_1)

    def fields(self, tracepoint: str) -> frozenset[str] | None:
        here, old = super().fields(tracepoint), self.old.fields(tracepoint)
        return None if here is None or old is None else here & old


@pytest.fixture(scope="module", params=["this-kernel", "as-on-6.1"])
def capture(request: pytest.FixtureRequest) -> Iterator[BpfCapture]:
    need_bpf()
    kernel = OnlyWhat61Has() if request.param == "as-on-6.1" else None
    c = BpfCapture(max_slots=8, syscall_latency_sample_every=8, kernel=kernel)
    c.time_latency(True)  # one window open for the whole module
    try:
        yield c
    finally:
        c.close()


def test_syscall_count_matches_known_workload(capture: BpfCapture, workload_cgroup: Workload) -> None:
    n = 100_000
    col = collector_for(capture, workload_cgroup)
    workload_cgroup.run(["dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={n}"])
    # The same work outside the cgroup must not be counted.
    subprocess.run(
        ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={n}"], check=True, capture_output=True
    )
    (s,) = col.collect()
    reads, writes = s.syscalls.by_name["read"], s.syscalls.by_name["write"]
    assert n <= reads <= n * 1.02
    assert n <= writes <= n * 1.02
    # dd's own start-up adds a few hundred more; the unrelated dd would add 200,000
    assert 2 * n <= s.syscalls.total <= 2 * n * 1.02
    timed = sum(s.syscalls.latency.counts)
    assert s.syscalls.latency_sample_every == 8
    assert s.syscalls.total / 8 * 0.9 <= timed <= s.syscalls.total / 8 * 1.1
    assert s.resources.cpu_seconds > 0


def test_block_io_from_direct_writes(
    capture: BpfCapture, workload_cgroup: Workload, tmp_path: object
) -> None:
    col = collector_for(capture, workload_cgroup)
    target = f"/var/tmp/sp-blk-{workload_cgroup.path.strip('/')}"
    try:
        workload_cgroup.run(
            [
                "dd",
                "if=/dev/zero",
                f"of={target}",
                "bs=64k",
                "count=200",
                "oflag=direct,dsync",
                "conv=notrunc",
            ]
        )
        workload_cgroup.run(["dd", f"if={target}", "of=/dev/null", "bs=64k", "count=200", "iflag=direct"])
    finally:
        subprocess.run(["rm", "-f", target])
    (s,) = col.collect()
    b = s.block_io
    # With block_io_start (6.5+) every request is attributed where its bio starts: all 200 of each. Without it
    # (Debian 12's 6.1) a request the device refuses for a moment (queue busy) goes back to the queue without
    # block_rq_insert and a kernel worker issues it: that request counts for no workload, the documented gap
    # of HAVE_BLOCK_RQ_INSERT (kernel_features.py). Seen once in 200 reads on CI; allow 2 %.
    submitter = {f.name: f.flag for f in capture.features}["block_io_submitter"]
    least = 200 if submitter == "HAVE_BLOCK_IO_START" else 196
    # Bytes: on 6.18 (block_io_start) CI once counted all 200 writes but one of them with 4 KiB of its 64 KiB
    # (a request split at issue, its other part not seen): one request's bytes of slack.
    assert b.write_ops >= least and b.write_bytes >= (least - 1) * 64 * 1024
    assert b.read_ops >= least and b.read_bytes >= least * 64 * 1024
    assert sum(b.latency.counts) >= b.read_ops + b.write_ops
    assert b.latency.unit == "us"


TCP_CLIENT = r"""
import socket, sys
port = int(sys.argv[1])
c = socket.create_connection(("127.0.0.1", port))
for _ in range(200):
    c.sendall(b"x" * 65536)
c.close()
"""


def test_tcp_transfer_is_attributed(capture: BpfCapture, workload_cgroup: Workload) -> None:
    col = collector_for(capture, workload_cgroup)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    got = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(1 << 20):
                got.append(len(data))

    t = threading.Thread(target=serve)
    t.start()
    workload_cgroup.run([sys.executable, "-c", TCP_CLIENT, str(srv.getsockname()[1])])
    t.join(10)
    srv.close()
    assert sum(got) == 200 * 65536
    (s,) = col.collect()
    tcp = s.tcp
    assert tcp.active_opens == 1
    assert tcp.state_changes["SYN_SENT"] == 1
    assert tcp.state_changes["ESTABLISHED"] >= 1
    assert tcp.state_changes.get("FIN_WAIT1", 0) >= 1  # the client closed first
    assert sum(tcp.srtt.counts) > 0, "RTT samples from tcp:tcp_probe on the client's socket"
    assert s.syscalls.by_name.get("connect", 0) >= 1


TCP_SERVER = r"""
import socket, sys
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
n = 0
while data := conn.recv(1 << 20):
    n += len(data)
conn.sendall(str(n).encode())
conn.close()
"""


def test_accepted_connection_is_attributed_to_the_server(
    capture: BpfCapture, workload_cgroup: Workload
) -> None:
    col = collector_for(capture, workload_cgroup)
    server = workload_cgroup.popen([sys.executable, "-c", TCP_SERVER], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as c:
            for _ in range(100):
                c.sendall(b"x" * 65536)
            c.shutdown(socket.SHUT_WR)
            assert c.recv(64) == str(100 * 65536).encode()
        assert server.wait(10) == 0
    finally:
        server.kill()
        server.wait()
    (s,) = col.collect()
    tcp = s.tcp
    assert tcp.active_opens == 0  # the workload only accepted
    # owned on its first receive, so the close it saw from the client (CLOSE_WAIT) is counted for it
    assert tcp.state_changes.get("CLOSE_WAIT", 0) >= 1
    assert sum(tcp.srtt.counts) > 0, "RTT samples of the accepted socket"
    assert s.syscalls.by_name.get("accept4", 0) + s.syscalls.by_name.get("accept", 0) >= 1


def test_check_capture_says_what_this_kernel_lets_it_see() -> None:
    need_bpf()
    out = subprocess.run(
        [sys.executable, "-m", "agentd.cli", "check-capture", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["bpf_active"] is True
    assert [f["name"] for f in doc["features"]] == [f.name for f in FEATURES]
    assert all(f["detail"] for f in doc["features"])


def test_probe_command_prints_json_profile(workload_cgroup: Workload) -> None:
    need_bpf()
    load = workload_cgroup.popen(["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=50000000"])
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "agentd.cli",
                "probe",
                "--cgroup",
                workload_cgroup.path,
                "--seconds",
                "1.5",
                "--json",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,  # bcc compiles for ~80 s in a software-emulated guest
        )
    finally:
        load.kill()
        load.wait()
    doc = json.loads(out.stdout)
    assert doc["capture"]["bpf_active"] is True
    by_name = doc["sample"]["syscalls"]["by_name"]
    assert int(by_name["read"]) > 10_000 and int(by_name["write"]) > 10_000
    assert doc["sample"]["resources"]["cpu_seconds"] > 0.3


def test_probe_rejects_missing_cgroup() -> None:
    need_bpf()
    out = subprocess.run(
        [sys.executable, "-m", "agentd.cli", "probe", "--cgroup", "/no-such-cgroup-here", "--seconds", "0.1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "--cgroup /no-such-cgroup-here: no such cgroup" in out.stderr


def test_detaches_on_close(workload_cgroup: Workload) -> None:
    need_bpf()
    c = BpfCapture(max_slots=2)
    col = collector_for(c, workload_cgroup)
    slot = col._slots["t"]
    c.close()
    workload_cgroup.run(["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=1000"])
    # the maps are gone with the descriptors; a fresh capture starts from zero
    c2 = BpfCapture(max_slots=2)
    try:
        assert sum(c2.read(slot).syscalls.by_nr) == 0
    finally:
        c2.close()

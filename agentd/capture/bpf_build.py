"""Child process that compiles and attaches the capture program, then hands its descriptors to the agent.

Run as `python -m agentd.capture.bpf_build SOCKET_FD`: it waits for one line of JSON options on the socket
(the agent may start it early, while it still holds the privileges attaching needs: agentd/capabilities.py;
end of file without options: it exits), builds, then sends one message on the socket: a
JSON manifest (with each map's value layout, read from the C structs) and, as SCM_RIGHTS, the descriptors of
every map, program and attachment, then exits without
running bcc's exit handlers (which would detach what the agent now holds).
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
import traceback
from importlib import resources
from typing import Any

MAPS = ("cgroup_filter", "timing_window", "sys_stats", "io_stats", "tcp_stats", "misses")
OPTIONAL_MAPS = ("task_state",)  # only where the program captures syscalls


def build(options: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    from bcc import BPF
    from bcc.libbcc import lib
    from bcc.syscall import syscalls
    from bcc.table import PerCpuArray, PerCpuHash

    from agentd.capture.kernel_btf import cgroup_id_walk_cflags
    from agentd.capture.map_layout import MapLayout, describe_ctype

    walk, slow = cgroup_id_walk_cflags()
    text = resources.files("agentd.capture").joinpath("bpf_program.c").read_text()
    b = BPF(text=text, cflags=[*options["cflags"], *walk])
    manifest: dict[str, Any] = {
        "cgroup_test_slow": slow,
        "maps": [],
        "programs": [],
        "attachments": [],
        "syscalls": {int(nr): name.decode() for nr, name in syscalls.items()},
    }
    fds: list[int] = []
    for name in MAPS:
        t = b[name]
        percpu = isinstance(t, PerCpuArray | PerCpuHash)
        leaf = t.sLeaf if percpu else t.Leaf
        layout = MapLayout(name, ctypes.sizeof(t.Key), ctypes.sizeof(leaf), percpu, describe_ctype(leaf))
        manifest["maps"].append(layout.to_manifest())
        fds.append(t.map_fd)
    for name in OPTIONAL_MAPS:
        # bcc's Table has no class for task storage: its descriptor and value type straight from the module
        fd = lib.bpf_table_fd(b.module, name.encode())
        if fd < 0:
            continue
        leaf = BPF._decode_table_type(json.loads(lib.bpf_table_leaf_desc(b.module, name.encode()).decode()))
        layout = MapLayout(name, 4, ctypes.sizeof(leaf), False, describe_ctype(leaf))  # key: a pidfd
        manifest["maps"].append(layout.to_manifest())
        fds.append(fd)
    for name, fn in b.funcs.items():
        manifest["programs"].append(name.decode() if isinstance(name, bytes) else str(name))
        fds.append(fn.fd)
    attach = {**b.tracepoint_fds, **b.raw_tracepoint_fds}
    manifest["attachments"] = [k.decode() if isinstance(k, bytes) else str(k) for k in attach]
    fds.extend(attach.values())
    return manifest, fds


def read_options(sock: socket.socket) -> dict[str, Any] | None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    options: dict[str, Any] = json.loads(data)
    return options


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    options = read_options(sock)
    if options is None:  # the agent did not need us after all (capture off, or it is stopping)
        os._exit(0)
    try:
        manifest, fds = build(options)
    except Exception as e:  # everything goes back to the agent as text; it decides what to log
        msg = json.dumps({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
        sock.sendall(msg.encode())
        sys.stderr.flush()
        os._exit(1)
    socket.send_fds(sock, [json.dumps(manifest).encode()], fds)
    sys.stdout.flush()
    sys.stderr.flush()
    # No atexit: bcc's cleanup would detach the tracepoints the agent now owns.
    os._exit(0)


if __name__ == "__main__":
    main()

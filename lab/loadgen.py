"""Synthetic workloads for demos and tests.

    python -m lab.loadgen mixed [--seconds N]      syscalls, disk writes and loopback TCP
    python -m lab.loadgen cpu --profile FILE       CPU demand that follows the number in FILE

`cpu` keeps one worker per core it may need; worker k burns min(1, max(0, target - k)) of every 20 ms, so
the total follows the target (in cores) that a scenario writes into FILE, re-read every 100 ms.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

PERIOD = 0.02


def _tcp_echo_server(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def mixed(seconds: float, directory: str) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    threading.Thread(target=_tcp_echo_server, args=(srv,), daemon=True).start()
    port = srv.getsockname()[1]
    path = os.path.join(directory, f"loadgen-{os.getpid()}.dat")
    block = os.urandom(64 * 1024)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            with socket.create_connection(("127.0.0.1", port)) as c:
                for _ in range(20):
                    c.sendall(block[:4096])
                    c.recv(65536)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for _ in range(8):
                    os.write(fd, block)
                os.fsync(fd)
            finally:
                os.close(fd)
            for _ in range(2000):
                os.getppid()
            time.sleep(0.05)
    finally:
        if os.path.exists(path):
            os.unlink(path)


def read_target(profile: Path) -> float:
    try:
        return max(0.0, float(profile.read_text().strip() or 0))
    except (OSError, ValueError):
        return 0.0


def _cpu_worker(k: int, profile: str) -> None:
    path = Path(profile)
    share, checked = 0.0, 0.0
    parent = os.getppid()
    while os.getppid() == parent:  # never outlive the load generator
        now = time.monotonic()
        if now - checked > 0.1:
            share, checked = min(1.0, max(0.0, read_target(path) - k)), now
        busy_until = now + share * PERIOD
        while time.monotonic() < busy_until:
            pass
        time.sleep(max(0.0, now + PERIOD - time.monotonic()))


def cpu(profile: Path, max_cores: int) -> None:
    workers = [
        multiprocessing.Process(target=_cpu_worker, args=(k, str(profile)), daemon=True)
        for k in range(max_cores)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m lab.loadgen")
    sub = p.add_subparsers(dest="mode")
    m = sub.add_parser("mixed")
    m.add_argument("--seconds", type=float, default=3600)
    m.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (must be on a block device)")
    c = sub.add_parser("cpu")
    c.add_argument("--profile", type=Path, required=True, help="file holding the target in cores")
    c.add_argument("--max-cores", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()
    if a.mode == "cpu":
        cpu(a.profile, a.max_cores)
    else:
        mixed(getattr(a, "seconds", 3600), getattr(a, "dir", tempfile.gettempdir()))


if __name__ == "__main__":
    main()

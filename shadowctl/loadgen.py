"""A small synthetic workload for demos and tests: syscalls, disk writes and loopback TCP.

Run as `python -m shadowctl.loadgen [--seconds N]`; it does each kind of work in a steady loop so every
part of the agent's profile (syscalls, block I/O, TCP) has something to show.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time


def _tcp_echo_server(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def run(seconds: float, directory: str) -> None:
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3600)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (must be on a block device)")
    a = p.parse_args()
    run(a.seconds, a.dir)


if __name__ == "__main__":
    main()

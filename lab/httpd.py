"""The lab's web service: answers every GET with its name and a newline.

    python -m lab.httpd --name p1 --port 8080

HTTP/1.0, one thread per connection, listening on :: with IPv4 mapped (so on 0.0.0.0 too): a VIP added
to the host later is served without a restart. Kept tiny and free of imports so that it starts in tens of
milliseconds and answers health checks and pollers with little latency of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import socketserver
import sys
from types import FrameType


class Handler(socketserver.BaseRequestHandler):
    server: Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(2.0)
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < 16384:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            method = data.split(b" ", 1)[0]
            if method in (b"GET", b"HEAD"):
                body = self.server.body
                head = (
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n" % len(body)
                )
                sock.sendall(head + (body if method == b"GET" else b""))
            else:
                sock.sendall(b"HTTP/1.0 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")


class Server(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, name: str, port: int) -> None:
        self.body = (name + "\n").encode()
        super().__init__(("::", port), Handler, bind_and_activate=False)
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.server_bind()
        self.server_activate()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab.httpd", description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="what to answer")
    p.add_argument("--port", type=int, default=8080)
    args = p.parse_args(argv)
    server = Server(args.name, args.port)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.5)
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

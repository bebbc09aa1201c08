"""A client that polls a URL the way a user sees a service, and the outages it saw.

Every `interval` (10 ms) it starts a new HTTP/1.0 GET with its own `timeout` (200 ms), whether or not earlier
requests are still waiting, so a hung connection never hides how soon the service came back. Each request
gives a `Record`: when it was sent (CLOCK_MONOTONIC, comparable across processes on this machine), whether
it got a 200, and the responder's name (the lab's web servers answer with their host name).

    python -m lab.poller --url http://10.77.0.101:8080/ --out records.jsonl

runs until SIGTERM/SIGINT (or `--seconds`), writing one JSON record per line as requests finish, then
prints the outages. `Poller` does the same inside this process (`netns=` opens its sockets in a lab
namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lab.procs import run_until_stopped


@dataclass(frozen=True)
class Record:
    sent: float  # time.monotonic() when the connect started
    ok: bool
    responder: str = ""  # first line of the body when ok
    elapsed: float = 0.0  # seconds until the answer or the failure
    error: str = ""


@dataclass(frozen=True)
class Outage:
    """Failed requests between two successful ones. Times are send times: the outage runs from the last
    success before the failures to the first success after them."""

    start: float | None  # None: the records begin with failures
    end: float | None  # None: no success after the failures (not recovered)
    failed: int
    before: str = ""  # who answered before
    after: str = ""  # who answered after

    @property
    def duration(self) -> float | None:
        return None if self.start is None or self.end is None else self.end - self.start


def outages(records: Iterable[Record]) -> list[Outage]:
    """Every run of failed requests (ordered by send time) as an `Outage`. Pure."""
    out: list[Outage] = []
    last_ok: Record | None = None
    failed = 0
    for r in sorted(records, key=lambda r: r.sent):
        if r.ok:
            if failed:
                out.append(
                    Outage(
                        last_ok.sent if last_ok else None,
                        r.sent,
                        failed,
                        last_ok.responder if last_ok else "",
                        r.responder,
                    )
                )
            failed = 0
            last_ok = r
        else:
            failed += 1
    if failed:
        out.append(
            Outage(last_ok.sent if last_ok else None, None, failed, last_ok.responder if last_ok else "")
        )
    return out


def outage_between(records: Iterable[Record], t0: float, t1: float) -> tuple[float | None, int]:
    """Total client-visible outage of the failures sent in [t0, t1], and how many outages that was.
    None when one of them never ended (or never began with a success) inside the records."""
    total, n = 0.0, 0
    for o in outages(records):
        first_failure = o.start if o.start is not None else o.end
        if first_failure is None or not t0 <= first_failure <= t1:
            continue
        n += 1
        if o.duration is None:
            return None, n
        total += o.duration
    return total, n


def responder_changes(records: Iterable[Record]) -> list[tuple[float, str]]:
    """(send time, responder) each time a successful answer came from a different host than the one before."""
    out: list[tuple[float, str]] = []
    for r in sorted(records, key=lambda r: r.sent):
        if r.ok and (not out or out[-1][1] != r.responder):
            out.append((r.sent, r.responder))
    return out


def read_records(path: Path) -> list[Record]:
    """Records from a poller's output file; a last line cut short by a running writer is skipped."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(Record(**json.loads(line)))
        except (ValueError, TypeError):
            continue
    return out


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str) -> Target:
        u = urlsplit(url)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"need an http:// URL with a host, got {url!r}")
        return cls(u.hostname, u.port or 80, u.path or "/")


class Poller:
    """Polls in a background thread (its own event loop). `start()`, then `stop()` returns every record."""

    def __init__(
        self,
        url: str,
        interval: float = 0.01,
        timeout: float = 0.2,
        netns: str | None = None,
        on_record: Callable[[Record], None] | None = None,
    ) -> None:
        self.target = Target.parse(url)
        self.interval, self.timeout, self.netns = interval, timeout, netns
        self.on_record = on_record
        self._records: list[Record] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        family = socket.AF_INET6 if ":" in self.target.host else socket.AF_INET
        self._family = family
        self._request = f"GET {self.target.path} HTTP/1.0\r\nHost: {self.target.host}\r\n\r\n".encode()

    def start(self) -> Poller:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="poller", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Record]:
        """Stop sending; wait for requests in flight (at most `timeout`)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5)
        return self.records()

    def records(self) -> list[Record]:
        with self._lock:
            return sorted(self._records, key=lambda r: r.sent)

    def _new_socket(self) -> socket.socket:
        if self.netns is None:
            s = socket.socket(self._family, socket.SOCK_STREAM)
        else:
            from lab.topology import socket_in  # only when used in-process: keeps the CLI light

            s = socket_in(self.netns, self._family, socket.SOCK_STREAM)
        s.setblocking(False)
        return s

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        next_at = loop.time()
        while not self._stopping.is_set():
            task = asyncio.create_task(self._one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += self.interval
            delay = next_at - loop.time()
            if delay < 0:  # fell behind (a stalled machine): skip ticks rather than burst
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(delay)
        if tasks:
            await asyncio.wait(tasks)

    async def _one(self) -> None:
        loop = asyncio.get_running_loop()
        sent = time.monotonic()
        ok, responder, error = False, "", ""
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(self.timeout):
                sock = self._new_socket()
                await loop.sock_connect(sock, (self.target.host, self.target.port))
                await loop.sock_sendall(sock, self._request)
                data = b""
                while chunk := await loop.sock_recv(sock, 65536):
                    data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            status = head.split(b"\r\n", 1)[0].split()
            if len(status) >= 2 and status[1] == b"200":
                ok, responder = True, body.decode(errors="replace").strip().split("\n")[0]
            else:
                error = f"status {status[1].decode() if len(status) > 1 else '?'}"
        except TimeoutError:
            error = "timeout"
        except OSError as e:
            error = e.strerror or type(e).__name__
        finally:
            if sock is not None:
                sock.close()
        r = Record(sent, ok, responder, round(time.monotonic() - sent, 6), error)
        with self._lock:
            self._records.append(r)
        if self.on_record is not None:
            self.on_record(r)


def summary(records: list[Record]) -> str:
    ok = sum(r.ok for r in records)
    lines = [f"{len(records)} requests, {ok} ok, {len(records) - ok} failed"]
    for o in outages(records):
        d = f"{o.duration:.3f}s" if o.duration is not None else "unbounded"
        lines.append(f"outage {d}: {o.failed} failed, {o.before or '?'} -> {o.after or '?'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab.poller", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--out", type=Path, help="write one JSON record per line here")
    p.add_argument("--interval", type=float, default=0.01, help="seconds between request starts")
    p.add_argument("--timeout", type=float, default=0.2, help="seconds before a request counts as failed")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: at SIGTERM)")
    args = p.parse_args(argv)
    out = open(args.out, "a", buffering=1) if args.out else None  # noqa: SIM115 (closed below)
    lock = threading.Lock()

    def write(r: Record) -> None:
        if out is not None:
            with lock:
                out.write(json.dumps(asdict(r)) + "\n")

    poller = Poller(args.url, args.interval, args.timeout, on_record=write).start()
    run_until_stopped(args.seconds)
    records = poller.stop()
    if out is not None:
        out.close()
    print(summary(records), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

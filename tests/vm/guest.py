"""A stock Debian 12 guest under qemu, driven through the stock qemu-guest-agent.

The image comes from scripts/build-vm-image.sh (cached). Each boot runs on a fresh qcow2 overlay, so the base
image is never changed and every session starts from a clean system. The guest has no NIC (`-nic none`):
commands go over the guest agent's virtio-serial channel, and the host's checkout is shared over 9p at /host
so the guest installs the .deb the host built.

/dev/kvm on these machines cannot boot a stock kernel, so qemu runs in software emulation (TCG, one thread per
vCPU): everything in the guest is several times slower than on the host.

Run by hand: `python -m tests.vm.guest` boots a guest and opens a tiny shell (`exit` shuts it down).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HOST_SHARE = "/host"


class GuestError(RuntimeError):
    pass


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    rc: int
    out: str
    err: str

    def check(self) -> Result:
        if self.rc != 0:
            raise GuestError(
                f"{shlex.join(self.argv)} exited {self.rc}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"
            )
        return self


# How long a stalled guest may take to answer again before it counts as hung, and the commands that are safe
# to send twice.
STALL_SECONDS = 300
IDEMPOTENT = frozenset({"guest-exec-status", "guest-ping", "guest-info"})

IMAGE_CACHE = ROOT / "build/vm"
# `make test` starts the image build in the background under this lock (`flock`), so that it overlaps the
# rest of the suite; whoever needs the image takes the lock, so it waits for that build instead of racing it.
IMAGE_LOCK = IMAGE_CACHE / ".lock"


def build_image(cache: Path = IMAGE_CACHE) -> Path:
    """The cached image directory (rootfs.img, vmlinuz, initrd.img), built on first use (3-9 min)."""
    argv = ["bash", str(ROOT / "scripts/build-vm-image.sh"), str(cache)]
    IMAGE_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(IMAGE_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        p = subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if p.returncode != 0:
        raise GuestError(f"building the VM image failed:\n{p.stderr[-4000:]}")
    return ROOT / p.stdout.strip().splitlines()[-1]


class Guest:
    """One running VM. `Guest.boot(...)` is a context manager: afterwards the VM and its overlay are gone."""

    def __init__(self, proc: subprocess.Popen[bytes], workdir: Path, qga: socket.socket) -> None:
        self.proc = proc
        self.workdir = workdir
        self._qga = qga
        self._buf = b""

    # ---- lifecycle ----------------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def boot(
        cls,
        image_dir: Path,
        *,
        cpus: int = 2,
        memory_mb: int = 3072,
        share: Path = ROOT,
        ready_timeout: float = 300,
    ) -> Iterator[Guest]:
        workdir = Path(tempfile.mkdtemp(prefix="shadowplane-guest."))
        overlay = workdir / "overlay.qcow2"
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                str(image_dir / "rootfs.img"),
                str(overlay),
            ],
            check=True,
        )
        qga_path = workdir / "qga.sock"
        argv = [
            "qemu-system-x86_64",
            "-accel", "tcg,thread=multi",
            "-cpu", "max",
            "-smp", str(cpus),
            "-m", str(memory_mb),
            "-nographic",
            "-nic", "none",
            "-kernel", str(image_dir / "vmlinuz"),
            "-initrd", str(image_dir / "initrd.img"),
            # no_timer_check: an emulated CPU starved by a busy host can miss the kernel's early timer
            # check, which then panics ("IO-APIC + timer doesn't work")
            "-append", "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0 no_timer_check",
            "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
            "-chardev", f"socket,path={qga_path},server=on,wait=off,id=qga0",
            "-device", "virtio-serial",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-virtfs", f"local,path={share},mount_tag=host,security_model=none,id=host0",
            "-serial", f"file:{workdir / 'console.log'}",
            "-monitor", "none",
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        guest: Guest | None = None
        try:
            deadline = time.monotonic() + 10
            while not qga_path.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise GuestError(
                        f"qemu did not start: {proc.stderr.read().decode() if proc.stderr else ''}"
                    )
                time.sleep(0.05)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(qga_path))
            guest = cls(proc, workdir, s)
            guest._wait_ready(ready_timeout)
            guest.sh(
                f"mkdir -p {HOST_SHARE} && "
                f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 host {HOST_SHARE}"
            ).check()
            yield guest
        finally:
            if guest is not None:
                guest.poweroff()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # the guest's console (kernel messages: an oops, a hung task) outlives the run, for a post-mortem
            with contextlib.suppress(OSError):
                IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
                shutil.copy(workdir / "console.log", IMAGE_CACHE / "last-console.log")
            shutil.rmtree(workdir, ignore_errors=True)

    def _wait_ready(self, timeout: float) -> None:
        """Until the guest agent answers and systemd says the system is up (running or degraded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GuestError(f"qemu exited {self.proc.returncode}: {self.console()[-3000:]}")
            try:
                self._sync(timeout=2)
            except (TimeoutError, OSError, GuestError):
                continue
            state = self.run(
                "systemctl", "is-system-running", "--wait", timeout=max(1, deadline - time.monotonic())
            )
            if state.out.strip() in ("running", "degraded"):
                return
        raise GuestError(f"guest not ready after {timeout:.0f} s; console:\n{self.console()[-3000:]}")

    def poweroff(self) -> None:
        with contextlib.suppress(Exception):
            self._send({"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}})
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60)
        self._qga.close()

    def console(self) -> str:
        try:
            return (self.workdir / "console.log").read_text(errors="replace")
        except OSError:
            return ""

    # ---- the guest agent protocol (JSON lines over virtio-serial) ------------------------------------

    def _send(self, msg: dict[str, Any]) -> None:
        self._qga.sendall(json.dumps(msg).encode() + b"\n")

    def _recv(self, timeout: float) -> dict[str, Any]:
        self._qga.settimeout(timeout)
        while b"\n" not in self._buf:
            chunk = self._qga.recv(65536)
            if not chunk:
                raise GuestError("guest agent channel closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        line = line.lstrip(b"\xff")  # guest-sync-delimited's marker
        if not line.strip():
            return self._recv(timeout)
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _sync(self, timeout: float) -> None:
        """Resynchronise the channel: after a reboot or a timeout, stale replies may be queued."""
        token = int.from_bytes(os.urandom(4), "big")
        self._buf = b""
        self._qga.sendall(b"\xff")
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}})
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("guest agent did not answer")
            try:
                reply = self._recv(left)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if reply.get("return") == token:
                return

    def call(self, command: str, timeout: float = 30, **arguments: Any) -> Any:
        request = {"execute": command, "arguments": arguments} if arguments else {"execute": command}
        self._send(request)
        try:
            reply = self._recv(timeout)
        except TimeoutError:
            # A guest starved of CPU under emulation can stall past the timeout: resynchronise the channel
            # (a late reply would otherwise answer the next command), then ask again where that is harmless.
            try:
                self._sync(timeout=STALL_SECONDS)
            except (TimeoutError, OSError) as e:
                raise TimeoutError(
                    f"{command}: the guest agent stopped answering ({e}); console:\n{self.console()[-3000:]}"
                ) from None
            if command not in IDEMPOTENT:
                stalled = f"{command}: no answer within {timeout:.0f} s (the guest stalled)"
                raise TimeoutError(stalled) from None
            self._send(request)
            reply = self._recv(timeout)
        if "error" in reply:
            raise GuestError(f"{command}: {reply['error']}")
        return reply.get("return")

    # ---- commands and files -------------------------------------------------------------------------

    def run(
        self, *argv: str, timeout: float = 300, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> Result:
        """Run a command in the guest (as root) and wait for it; its output is captured."""
        args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin.encode()).decode()
        if env is not None:
            path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            args["env"] = [path, *(f"{k}={v}" for k, v in env.items())]
        pid = self.call("guest-exec", **args)["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            st = self.call("guest-exec-status", pid=pid)
            if st.get("exited"):
                break
            if time.monotonic() > deadline:
                self.sh(f"kill -9 {pid}", timeout=30)  # a shell builtin: the image has no /bin/kill
                raise GuestError(f"{shlex.join(argv)} still running after {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
        rc = st.get("exitcode", 128 + st.get("signal", 0))
        return Result(tuple(argv), int(rc), out, err)

    def sh(self, script: str, timeout: float = 300) -> Result:
        return self.run("/bin/sh", "-c", script, timeout=timeout)

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        self.run(
            "/bin/sh",
            "-c",
            f"mkdir -p {shlex.quote(str(Path(path).parent))} && cat > {shlex.quote(path)}",
            stdin=text,
        ).check()
        self.run("chmod", f"{mode:o}", path).check()

    def read_file(self, path: str) -> str:
        return self.run("cat", path).check().out

    def journal(self, unit: str, lines: int = 60) -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-n", str(lines), "-o", "short-monotonic").out

    def systemctl(self, action: str, *units: str, timeout: float = 900) -> None:
        """`systemctl ACTION UNITS`; on failure the error carries each unit's journal."""
        r = self.run("systemctl", action, *units, timeout=timeout)
        if r.rc != 0:
            journals = "\n".join(f"--- journal of {u}\n{self.journal(u)}" for u in units)
            raise GuestError(
                f"systemctl {action} {' '.join(units)} exited {r.rc}: {r.err.strip()}\n{journals}"
            )

    def host_path(self, path: Path) -> str:
        """Where a file under the shared host directory appears in the guest."""
        return f"{HOST_SHARE}/{path.resolve().relative_to(ROOT)}"


def main() -> None:
    image = build_image()
    t0 = time.monotonic()
    with Guest.boot(image) as g:
        print(f"guest ready in {time.monotonic() - t0:.1f} s; commands run with sh -c; 'exit' to stop")
        while True:
            try:
                line = input("guest# ")
            except EOFError:
                break
            if line.strip() == "exit":
                break
            r = g.sh(line, timeout=3600)
            print(r.out, end="")
            print(r.err, end="")
            if r.rc:
                print(f"[exit {r.rc}]")


if __name__ == "__main__":
    main()

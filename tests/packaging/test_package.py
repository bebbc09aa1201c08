"""The packages end to end: `packaging/build.sh` builds (or reuses) the .deb and .rpm, lintian checks the
.deb, which is then installed on this machine, checked (files, conffiles, the commands, the units), edited,
upgraded, and purged. Whatever happens, the package and everything it made are gone afterwards.

Needs root on a Debian host with what `make setup` installs (lintian, rpm, nfpm in the venv).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import setuptools

from agentd.config import load_agent_config
from controller.config import load_controller_config
from shadowctl.cli import parser as shadowctl_parser
from tests.support import need

# A first build downloads and installs every wheel: more than the suite's default 300 s on a cold cache.
pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
PKG = "shadowplane"
VERSION = next(
    line.split('"')[1]
    for line in (ROOT / "pyproject.toml").read_text().splitlines()
    if line.startswith("version")
)
COMMANDS = ("shadowplane-agentd", "shadowplane-controller", "shadowctl")
UNITS = ("shadowplane-agentd.service", "shadowplane-controller.service")
LEFTOVERS = (Path("/opt/shadowplane"), Path("/etc/shadowplane"), Path("/var/lib/shadowplane"))
APT_ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
# Edited configuration files are kept without asking, as an unattended upgrade would.
KEEP_CONFFILES = ["-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]


def run(
    *argv: str, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def installed() -> bool:
    p = run("dpkg-query", "-W", "-f=${Status}", PKG, check=False)
    return "installed" in p.stdout or "config-files" in p.stdout


# ---- no root needed -------------------------------------------------------------------------------


def test_default_configs_load() -> None:
    agent = load_agent_config(ROOT / "packaging/etc/agentd.toml")
    assert agent.hooks_dir == Path("/etc/shadowplane/hooks")
    assert agent.tls.ca is not None and not agent.tls.plaintext, "the packaged default must use TLS"
    ctl = load_controller_config(ROOT / "packaging/etc/controller.toml")
    assert ctl.store.path == Path("/var/lib/shadowplane/controller.db")
    assert ctl.tls.ca is not None and not ctl.tls.plaintext, "the packaged default must use TLS"


def test_units_run_the_packaged_commands() -> None:
    agent = (ROOT / "systemd/shadowplane-agentd.service").read_text()
    ctl = (ROOT / "systemd/shadowplane-controller.service").read_text()
    for unit, cmd in ((agent, "shadowplane-agentd"), (ctl, "shadowplane-controller")):
        assert f"ExecStart=/usr/bin/{cmd} run --config /etc/shadowplane/" in unit
        assert "Type=notify" in unit and "WatchdogSec=" in unit and "Restart=on-failure" in unit
    # after anything but a clean stop (which records or removes the agent's addresses itself)
    assert (
        """ExecStopPost=/bin/sh -c '[ "$$SERVICE_RESULT" = success ] || exec /usr/bin/shadowplane-agentd"""
        " release-all --config /etc/shadowplane/agentd.toml'" in agent
    )
    # CAP_SYS_ADMIN and CAP_SETPCAP only until the capture's build child is started: the agent drops them
    assert "CAP_SYS_ADMIN CAP_SETPCAP" in agent.split("CapabilityBoundingSet=")[1].splitlines()[0]
    assert (
        'Environment="SHADOWPLANE_KEEP_CAPABILITIES=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_RAW"' in agent
    )
    assert (
        "User=shadowplane" in ctl
        and "CapabilityBoundingSet=\n" in ctl
        and "StateDirectory=shadowplane" in ctl
    )


# What pyproject's packages.find puts in the wheel: the packages' code.
SHIPPED = ("shadowplane", "agentd", "controller", "shadowctl", "training")


def test_the_wheel_and_the_editable_install_leave_the_lab_out() -> None:
    # The wheel is what build.sh installs into the .deb/.rpm venv; `make setup` installs the same list
    # editable. The lab runs from a checkout only (`python -m lab`).
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_namespace_packages(where=str(ROOT), include=find["include"])
    assert sorted({p.split(".")[0] for p in packages}) == sorted(SHIPPED), packages
    assert not [p for p in packages if p == "lab" or p.startswith("lab.")]


def imports(path: Path) -> Iterator[tuple[str, int]]:
    """(module, line) of every absolute import in a Python file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno


def test_shipped_code_never_imports_the_lab() -> None:
    # An installed host has no lab: an import of it from packaged code would fail there, not here.
    importers = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for pkg in SHIPPED
        for path in sorted((ROOT / pkg).rglob("*.py"))
        for module, line in imports(path)
        if module == "lab" or module.startswith("lab.")
    ]
    assert importers == []


def test_shadowctl_has_no_lab_command() -> None:
    sub = next(a for a in shadowctl_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert "lab" not in sub.choices and {"hosts", "failover", "certs"} <= set(sub.choices)
    # as an operator runs it: from anywhere but a checkout
    out = subprocess.run(
        [sys.executable, "-m", "shadowctl.cli", "--help"], capture_output=True, text=True, cwd="/"
    )
    assert out.returncode == 0, out.stderr
    assert "failover" in out.stdout and not re.search(r"^\s+lab\b", out.stdout, re.M), out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "shadowctl.cli", "lab", "up"], capture_output=True, text=True, cwd="/"
    )
    assert out.returncode == 2 and "invalid choice: 'lab'" in out.stderr, out.stderr


# ---- the packages -----------------------------------------------------------------------------------


def need_packaging_host() -> None:
    need(
        os.geteuid() == 0,
        "needs root: installs the .deb on this machine and purges it",
        "run the tests as root (CI does)",
    )
    for tool in ("dpkg", "dpkg-deb", "apt-get", "lintian", "systemd-analyze", "strip"):
        need(shutil.which(tool), f"{tool} is missing", "`make setup` installs it (scripts/apt-packages.txt)")
    need(
        (ROOT / ".venv/bin/nfpm").exists(),
        "nfpm is missing from .venv",
        "`make setup` installs the dev dependencies",
    )
    for line in remove_leftover_install():
        print(f"package test: removed {line}")


def remove_leftover_install() -> list[str]:
    """A shadowplane package (and its files) that an earlier run or someone else left on this machine is
    purged, so the test starts from a host without it; returns what was removed."""
    removed = []
    if installed():
        run("dpkg", "--purge", PKG, env=APT_ENV)
        removed.append(f"the installed {PKG} package (dpkg --purge {PKG})")
    if shutil.which("rpm") and run("rpm", "-q", PKG, check=False).returncode == 0:
        run("rpm", "-e", "--nodeps", PKG)
        removed.append(f"the installed {PKG} rpm (rpm -e {PKG})")
    for path in LEFTOVERS:
        if path.exists():
            shutil.rmtree(path)
            removed.append(f"leftover {path}")
    return removed


def lab_paths(paths: list[str]) -> list[str]:
    """Of the paths a package installs, those that are lab code in the venv's site-packages: the `lab`
    package, its load generator and process helpers (wherever they are), anything in a lab/ directory."""
    bad = []
    for path in paths:
        _, sep, rel = path.partition("/site-packages/")
        if not sep:
            continue
        name = rel.rstrip("/").rsplit("/", 1)[-1]
        if rel == "lab.py" or "/lab/" in f"/{rel}" or name in ("loadgen.py", "procs.py"):
            bad.append(path)
    return bad


@pytest.fixture(scope="module")
def packages() -> tuple[Path, Path]:
    """The .deb and .rpm in dist/, built by the project's command (reused while its inputs are unchanged)."""
    need_packaging_host()
    run("bash", str(ROOT / "packaging/build.sh"), timeout=900)
    deb = ROOT / f"dist/{PKG}_{VERSION}-1_amd64.deb"
    rpm = ROOT / f"dist/{PKG}-{VERSION}-1.x86_64.rpm"
    assert deb.exists() and rpm.exists()
    return deb, rpm


def test_deb_carries_no_lab_code(packages: tuple[Path, Path]) -> None:
    deb, _ = packages
    paths = [line.split()[5] for line in run("dpkg-deb", "-c", str(deb)).stdout.splitlines()]
    site = [p for p in paths if "/site-packages/" in p]
    assert any(p.endswith("/site-packages/shadowctl/cli.py") for p in site), "no shadowctl in the venv?"
    # `shadowctl train|backtest` run on operators' hosts: their package ships, unlike the lab
    assert any(p.endswith("/site-packages/training/backtest.py") for p in site), "no training in the venv"
    assert lab_paths(paths) == [], "the lab is a checkout tool: pyproject.toml's packages.find leaves it out"


def test_deb_ships_bytecode_python_never_rewrites(packages: tuple[Path, Path], tmp_path: Path) -> None:
    """Installing must be unpacking (compiling the venv on a slow host took minutes), and the sandboxed
    daemons cannot write bytecode: every module of ours ships compiled, hash-based and unchecked (flags 0b01:
    Python uses it without comparing it to the source, whose file times dpkg does not keep), and tracebacks
    name the installed files, not the build stage."""
    deb, _ = packages
    run("dpkg-deb", "-x", str(deb), str(tmp_path))
    site = next((tmp_path / "opt/shadowplane/venv/lib").glob("python3*/site-packages"))
    ours = [
        p for pkg in ("agentd", "controller", "shadowctl", "shadowplane") for p in (site / pkg).rglob("*.py")
    ]
    assert len(ours) > 50, ours
    for source in ours:
        pyc = (
            source.parent
            / "__pycache__"
            / f"{source.stem}.cpython-{sys.version_info[0]}{sys.version_info[1]}.pyc"
        )
        assert pyc.exists(), f"{source.relative_to(tmp_path)} ships without bytecode"
        header = pyc.read_bytes()[:16]
        assert int.from_bytes(header[4:8], "little") == 0b01, f"{pyc.name}: not unchecked hash-based"
    code = (
        site / "agentd/__pycache__" / f"daemon.cpython-{sys.version_info[0]}{sys.version_info[1]}.pyc"
    ).read_bytes()
    assert b"/opt/shadowplane/venv/lib/" in code and b"build/package" not in code


def test_lintian_reports_no_errors(packages: tuple[Path, Path]) -> None:
    deb, _ = packages
    out = run("lintian", "--tag-display-limit", "0", str(deb), check=False)
    errors = [line for line in out.stdout.splitlines() if line.startswith("E:")]
    assert not errors, "\n".join(errors)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rpm_metadata(packages: tuple[Path, Path]) -> None:
    _, rpm = packages
    need(shutil.which("rpm"), "rpm is missing", "`make setup` installs it (scripts/apt-packages.txt)")
    requires = run("rpm", "-qpR", str(rpm)).stdout
    for dep in ("python3-bcc", "python3-systemd", "python3 >= 3.11", "python3 < 3.12"):
        assert dep in requires, requires
    files = run("rpm", "-qpl", str(rpm)).stdout.splitlines()
    for f in (
        "/usr/lib/systemd/system/shadowplane-agentd.service",
        "/usr/lib/systemd/system/shadowplane-controller.service",
        "/usr/bin/shadowctl",
        "/opt/shadowplane/venv/bin/python",
    ):
        assert f in files
    assert [f for f in files if f.endswith("/agentd/__pycache__/daemon.cpython-311.pyc")], "no bytecode"
    assert lab_paths(files) == [], "the lab is a checkout tool: pyproject.toml's packages.find leaves it out"
    assert set(run("rpm", "-qpc", str(rpm)).stdout.split()) == {
        "/etc/shadowplane/agentd.toml",
        "/etc/shadowplane/controller.toml",
    }
    scripts = run("rpm", "-qp", "--scripts", str(rpm)).stdout
    assert "useradd --system" in scripts
    assert "compileall" not in scripts, "the bytecode ships in the package; nothing is compiled on install"


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A stand-in for systemd's notification socket, in the abstract namespace so that the controller,
    running as the unprivileged `shadowplane` user, can reach it."""
    name = f"@shadowplane-test-{uuid.uuid4().hex[:8]}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name[1:])
    s.settimeout(0.5)
    try:
        yield name, s
    finally:
        s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_controller_once(config: Path) -> list[str]:
    """Start the installed controller as its service user until it says READY=1; return its notifications."""
    with notify_socket() as (addr, sock):
        env = dict(os.environ, NOTIFY_SOCKET=addr, WATCHDOG_USEC="2000000", ORT_DISABLE_TELEMETRY="1")
        env.pop("WATCHDOG_PID", None)
        proc = subprocess.Popen(
            ["runuser", "-u", "shadowplane", "--", "shadowplane-controller", "run", "--config", str(config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd="/",
        )
        got: list[str] = []
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any("READY=1" in m for m in got):
                with contextlib.suppress(TimeoutError):
                    got.append(sock.recv(4096).decode())
                assert proc.poll() is None, proc.communicate()[0]
            with contextlib.suppress(TimeoutError):
                got.append(sock.recv(4096).decode())  # the first watchdog ping follows READY at once
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                out = proc.communicate(timeout=20)[0]
            except subprocess.TimeoutExpired:
                proc.kill()
                out = proc.communicate()[0]
        assert any("READY=1" in m for m in got), f"no READY=1 from the controller: {got}\n{out}"
        return got


def purge_everything(user_existed: bool) -> None:
    if installed():
        run("dpkg", "--purge", PKG, check=False, env=APT_ENV)
    for path in LEFTOVERS:
        shutil.rmtree(path, ignore_errors=True)
    if not user_existed:
        run("userdel", "shadowplane", check=False)
        run("groupdel", "shadowplane", check=False)


def test_install_upgrade_purge(packages: tuple[Path, Path], tmp_path: Path) -> None:
    deb, _ = packages
    try:
        pwd.getpwnam("shadowplane")
        user_existed = True
    except KeyError:
        user_existed = False
    try:
        # ---- install -----------------------------------------------------------------------------------
        run(
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            *KEEP_CONFFILES,
            str(deb),
            env=APT_ENV,
        )
        assert run("dpkg-query", "-W", "-f=${Version}", PKG).stdout == f"{VERSION}-1"

        for cmd in COMMANDS:
            path = shutil.which(cmd)
            assert path == f"/usr/bin/{cmd}", path
            assert os.path.realpath(path) == f"/opt/shadowplane/venv/bin/{cmd}"
            assert "usage:" in run(cmd, "--help").stdout
        unit_dir = Path("/lib/systemd/system")
        for unit in UNITS:
            assert (unit_dir / unit).is_file()
        conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", PKG).stdout
        assert "/etc/shadowplane/agentd.toml" in conffiles and "/etc/shadowplane/controller.toml" in conffiles
        assert Path("/etc/shadowplane/hooks").is_dir()
        ctl_conf = Path("/etc/shadowplane/controller.toml")
        st = ctl_conf.stat()
        assert (st.st_mode & 0o777, st.st_gid) == (0o640, pwd.getpwnam("shadowplane").pw_gid)
        assert Path("/var/lib/shadowplane").stat().st_uid == pwd.getpwnam("shadowplane").pw_uid
        assert (
            run("shadowplane-agentd", "check-config", "--config", "/etc/shadowplane/agentd.toml").returncode
            == 0
        )
        run(
            "runuser",
            "-u",
            "shadowplane",
            "--",
            "shadowplane-controller",
            "check-config",
            "--config",
            str(ctl_conf),
        )

        # The venv uses the distro's bcc and systemd modules, and postinst compiled it.
        where = run(
            "/opt/shadowplane/venv/bin/python",
            "-c",
            "import os, bcc, systemd.daemon, systemd.journal; "
            "print(os.path.realpath(bcc.__file__)); print(os.path.realpath(systemd.daemon.__file__))",
        ).stdout.split()
        assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in where), where
        assert list(Path("/opt/shadowplane/venv/lib").rglob("__pycache__"))

        # Units: verified with the commands they name in place.
        verify = run("systemd-analyze", "verify", *(str(unit_dir / u) for u in UNITS), check=False)
        ours = [line for line in (verify.stdout + verify.stderr).splitlines() if "shadowplane" in line]
        assert verify.returncode == 0 and not ours, verify.stdout + verify.stderr

        # ---- edit a config, make controller data -------------------------------------------------------
        port = free_port()
        edited = ctl_conf.read_text().replace('listen = "0.0.0.0:7400"', f'listen = "127.0.0.1:{port}"')
        edited = edited.replace("# plaintext = true", "plaintext = true")
        edited = "\n".join(
            line for line in edited.splitlines() if not line.startswith(("ca =", "cert =", "key ="))
        )
        ctl_conf.write_text(edited + "\n# edited by the package test\n")
        notes = run_controller_once(ctl_conf)
        assert any("STATUS=listening on 127.0.0.1" in m for m in notes), notes
        assert any("WATCHDOG=1" in m for m in notes), notes
        db = Path("/var/lib/shadowplane/controller.db")
        assert db.exists(), "the controller made no store in its state directory"

        # ---- upgrade to a newer release ------------------------------------------------------------------
        run(
            "bash",
            str(ROOT / "packaging/build.sh"),
            "--release",
            "2",
            "--format",
            "deb",
            "--out",
            str(tmp_path),
        )
        deb2 = tmp_path / f"{PKG}_{VERSION}-2_amd64.deb"
        run(
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            *KEEP_CONFFILES,
            str(deb2),
            env=APT_ENV,
        )
        assert run("dpkg-query", "-W", "-f=${Version}", PKG).stdout == f"{VERSION}-2"
        assert ctl_conf.read_text().endswith("# edited by the package test\n"), (
            "the upgrade lost an edited config"
        )
        assert not Path("/etc/shadowplane/controller.toml.dpkg-new").exists()
        assert Path("/etc/shadowplane/agentd.toml").exists()
        assert db.exists(), "the upgrade lost the controller's data"
        assert ctl_conf.stat().st_mode & 0o777 == 0o640
        assert (
            run("shadowplane-agentd", "check-config", "--config", "/etc/shadowplane/agentd.toml").returncode
            == 0
        )

        # ---- purge ----------------------------------------------------------------------------------------
        run("apt-get", "purge", "-y", "-q", PKG, env=APT_ENV)
        assert not installed()
        for cmd in COMMANDS:
            assert not Path(f"/usr/bin/{cmd}").exists()
        for unit in UNITS:
            assert not (unit_dir / unit).exists()
        for leftover in LEFTOVERS:
            assert not leftover.exists(), f"purge left {leftover}"
    finally:
        purge_everything(user_existed)

"""The .rpm, on a machine that is not rpm-based: what can be checked without an rpm distribution.

- the payload (`rpm -qlp`), each file's mode, owner and link target, the %config(noreplace) flags and the
  declared dependencies, read from the package;
- the scriptlets (%pre, %post, %posttrans on install; the same with an upgrade's arguments on a reinstall;
  %preun, %postun on erase), run by rpm itself (`rpm --root`) in a scratch root this test builds: rpm
  chroots into it, so the scriptlets run with /bin/sh and the real coreutils, findutils, getent and the
  system's Python 3 (for the byte-compilation), against the scratch root's own /etc/passwd and /etc/group.

Stubbed, because they cannot run in a scratch root, and recorded so their calls are checked:
`groupadd` and `useradd` (shadow-utils: they need a shadow-utils configuration and would lock the files; the
stubs append the group and the user to the scratch root's /etc/group and /etc/passwd, as they would) and
`systemctl` (there is no systemd in a chroot; /run/systemd/system exists there so the scriptlets take their
"systemd runs" branch). `--nodeps`: the scratch root's rpm database has no python3, python3-bcc,
python3-systemd, iproute or shadow-utils packages to satisfy them; the dependencies are checked as
declarations instead. Not verified here: installing on a real rpm-based distribution (its python3 must be
3.11, which the package declares), the daemons running from the rpm's files, and an upgrade from an older
version with a changed default configuration (.rpmnew): see README, "Install from packages".

Needs root (chroot, a private mount namespace) and rpm; reuses test_package.py's build of the packages.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.packaging.test_package import PKG, ROOT, lab_paths, packages, run  # noqa: F401 (the fixture)
from tests.support import need

HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # the system's tools, never a shim from this user's PATH
# What the scriptlets run for real inside the scratch root.
REAL_TOOLS = ("sh", "getent", "chgrp", "chmod", "install", "find", "rm")
STUB_LOG = "/stub-calls.log"
GID = 990  # what the groupadd / useradd stubs give the shadowplane group and user
STUBS = {
    "groupadd": f'echo "shadowplane:x:{GID}:" >> /etc/group',
    "useradd": f'echo "shadowplane:x:{GID}:{GID}:Shadowplane controller:/var/lib/shadowplane:/sbin/nologin" '
    ">> /etc/passwd",
    "systemctl": "",
}


def host_binary(name: str) -> Path:
    found = shutil.which(name, path=HOST_PATH)
    assert found, f"{name} is missing on this machine"
    return Path(found).resolve()


def copy_with_libraries(binary: Path, root: Path, name: str) -> None:
    """`binary` as /usr/bin/`name` in `root`, with the shared libraries it loads at their own paths."""
    shutil.copy2(binary, root / "usr/bin" / name)
    out = run("ldd", str(binary)).stdout
    for word in out.split():
        if word.startswith("/") and Path(word).exists():
            lib = root / word.lstrip("/")
            lib.parent.mkdir(parents=True, exist_ok=True)
            if not lib.exists():
                shutil.copy2(word, lib)


def scratch_root(root: Path) -> Path:
    """A minimal merged-/usr tree that rpm can chroot into and run the scriptlets in; returns the
    directory the system's Python standard library must be bind-mounted on (read only)."""
    for d in ("usr/bin", "usr/lib", "usr/lib64", "etc", "run/systemd/system", "tmp", "var/lib", "dev/shm"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        (root / link).symlink_to(target)
    (root / "usr/sbin").symlink_to("bin")
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "dev/null").chmod(0o666)
    for tool in REAL_TOOLS:
        copy_with_libraries(host_binary(tool), root, tool)
    # The venv's interpreter is a link to /usr/bin/python3: the system's, with its standard library.
    python = host_binary("python3")
    copy_with_libraries(python, root, "python3")
    stdlib = root / "usr/lib" / python.name
    stdlib.mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    for name, action in STUBS.items():
        stub = root / "usr/bin" / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {STUB_LOG}\n{action}\n')
        stub.chmod(0o755)
    return stdlib


def rpm_in(root: Path, stdlib: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """rpm --root `root` ARGS, in a private mount namespace where the system's standard library is
    bind-mounted read-only into the scratch root (the mount ends with the namespace: nothing to undo)."""
    host_stdlib = Path("/usr/lib") / stdlib.name
    script = f'mount --bind -o ro "{host_stdlib}" "{stdlib}" && exec rpm --root "{root}" "$@"'
    return run("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "rpm", *args)


def stub_calls(root: Path) -> list[str]:
    log = root / STUB_LOG.lstrip("/")
    calls = log.read_text().splitlines() if log.exists() else []
    log.write_text("")
    return calls


def pycache(root: Path) -> list[Path]:
    return list((root / "opt/shadowplane/venv/lib").rglob("__pycache__"))


@pytest.fixture(scope="module")
def rpm_file(packages: tuple[Path, Path]) -> Path:  # noqa: F811 (the imported fixture)
    need(shutil.which("rpm"), "rpm is missing", "`make setup` installs it (scripts/apt-packages.txt)")
    return packages[1]


def test_rpm_payload_flags_and_dependencies(rpm_file: Path) -> None:
    tags = ("%{FILEFLAGS:fflags}", "%{FILEMODES:perms}", "%{FILEUSERNAME}:%{FILEGROUPNAME}", "%{FILENAMES}")
    qf = "[" + "\\t".join((*tags, "%{FILELINKTOS}")) + "\\n]"
    rows = {}
    for line in run("rpm", "-qp", "--qf", qf, str(rpm_file)).stdout.splitlines():
        flags, perms, owner, path, link = line.split("\t")
        rows[path] = (flags, perms, owner, link)
    assert set(run("rpm", "-qlp", str(rpm_file)).stdout.splitlines()) == set(rows)  # (paths may hold spaces)
    # configuration: %config(noreplace) ("cn"), kept when edited; controller.toml readable by its group only
    assert {p: r[:3] for p, r in rows.items() if "c" in r[0]} == {
        "/etc/shadowplane/agentd.toml": ("cn", "-rw-r--r--", "root:root"),
        "/etc/shadowplane/controller.toml": ("cn", "-rw-r-----", "root:root"),
    }
    # where `shadowctl certs` bundles are copied to, and the controller's user reads from
    assert rows["/etc/shadowplane/tls"][1:3] == ("drwxr-xr-x", "root:root")
    for cmd in ("shadowctl", "shadowplane-agentd", "shadowplane-controller"):
        assert rows[f"/usr/bin/{cmd}"][3] == f"/opt/shadowplane/venv/bin/{cmd}"
        assert rows[f"/opt/shadowplane/venv/bin/{cmd}"][1] == "-rwxr-xr-x"
    assert rows["/opt/shadowplane/venv/bin/python3"][3] == "/usr/bin/python3"
    for unit in ("shadowplane-agentd.service", "shadowplane-controller.service"):
        assert rows[f"/usr/lib/systemd/system/{unit}"][1] == "-rw-r--r--"
    assert all(r[2] == "root:root" for r in rows.values()), "every file is root's"
    assert [p for p in rows if p.endswith("/agentd/__pycache__/daemon.cpython-311.pyc")], "bytecode ships"
    assert lab_paths(list(rows)) == []
    requires = {line.strip() for line in run("rpm", "-qpR", str(rpm_file)).stdout.splitlines()}
    assert {r for r in requires if not r.startswith("rpmlib(")} == {
        "python3 >= 3.11",
        "python3 < 3.12",
        "python3-bcc",
        "python3-systemd",
        "iproute",
        "shadow-utils",
    }
    assert run("rpm", "-qp", "--recommends", str(rpm_file)).stdout.split() == ["kernel-devel"]


def test_rpm_scriptlets_install_reinstall_erase_in_a_scratch_root(rpm_file: Path, tmp_path: Path) -> None:
    need(shutil.which("unshare", path=HOST_PATH), "unshare is missing", "apt-get install util-linux")
    root = tmp_path / "root"
    stdlib = scratch_root(root)
    scripts = run("rpm", "-qp", "--scripts", str(rpm_file)).stdout
    for header in ("preinstall", "postinstall", "preuninstall", "postuninstall", "posttrans"):
        assert f"{header} scriptlet (using /bin/sh)" in scripts, header

    # ---- install: %pre makes the user, %post sets controller.toml's group and the state directory,
    # %posttrans reloads systemd (the venv's bytecode is in the payload)
    rpm_in(root, stdlib, "--initdb")
    rpm_in(root, stdlib, "-i", "--nodeps", str(rpm_file))
    assert stub_calls(root) == [
        "groupadd --system shadowplane",
        "useradd --system --gid shadowplane --home-dir /var/lib/shadowplane --no-create-home "
        "--shell /sbin/nologin --comment Shadowplane controller shadowplane",
        "systemctl daemon-reload",
        "systemctl try-restart shadowplane-controller.service",
    ]
    ctl = (root / "etc/shadowplane/controller.toml").stat()
    assert (stat.S_IMODE(ctl.st_mode), ctl.st_uid, ctl.st_gid) == (0o640, 0, GID)
    for name in ("agentd.toml", "controller.toml"):
        assert (root / "etc/shadowplane" / name).read_text() == (ROOT / "packaging/etc" / name).read_text()
    state = (root / "var/lib/shadowplane").stat()
    assert (stat.S_IMODE(state.st_mode), state.st_uid, state.st_gid) == (0o750, GID, GID)
    assert pycache(root), "the payload's bytecode is installed"
    # every file as the package says, but for the group %post gave controller.toml on purpose
    verify = run("rpm", "--root", str(root), "-V", "--nodeps", PKG, check=False).stdout.splitlines()
    assert [line.split() for line in verify] == [["......G..", "c", "/etc/shadowplane/controller.toml"]]

    # ---- reinstall (an upgrade's scriptlets: $1 = 2): the user exists, the edited config is kept
    agentd = root / "etc/shadowplane/agentd.toml"
    agentd.write_text(agentd.read_text() + 'zone = "az9"  # edited\n')
    rpm_in(root, stdlib, "-U", "--replacepkgs", "--nodeps", str(rpm_file))
    calls = stub_calls(root)
    assert not [c for c in calls if c.startswith(("groupadd", "useradd"))], calls
    assert not [c for c in calls if "disable" in c], "an upgrade stops nothing: " + repr(calls)
    assert calls[-1] == "systemctl try-restart shadowplane-controller.service", calls
    assert agentd.read_text().endswith('zone = "az9"  # edited\n'), "%config(noreplace): the edit is kept"

    # ---- erase: %preun stops and disables both units (rpm removes the payload, bytecode included); the
    # store and the edited config are kept (.rpmsave)
    rpm_in(root, stdlib, "-e", PKG)
    assert stub_calls(root) == [
        "systemctl --no-reload disable --now shadowplane-agentd.service shadowplane-controller.service",
        "systemctl daemon-reload",
    ]
    assert not (root / "opt/shadowplane").exists(), "nothing of the venv is left (bytecode included)"
    assert sorted(p.name for p in (root / "etc/shadowplane").iterdir()) == ["agentd.toml.rpmsave"]
    assert (root / "var/lib/shadowplane").is_dir(), "the store is kept on erase, as rpm packages do"
    assert run("rpm", "--root", str(root), "-q", PKG, check=False).returncode != 0

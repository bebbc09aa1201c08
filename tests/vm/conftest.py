"""The VM suite's fixtures: one stock Debian 12 guest per session (kernel 6.1, systemd 252, pure cgroup v2),
the packages `packaging/build.sh` built, and the README's "first hour" walkthrough run in the guest.

Booting, installing and starting the daemons under software emulation takes minutes, so the guest is shared by
every VM test, in the order pytest collects them (alphabetical by file): the upgrade and purge module is
named to come last.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import need
from tests.vm.guest import ROOT, Guest, build_image
from tests.vm.walkthrough import Walk, run_walkthrough

VERSION = next(
    line.split('"')[1]
    for line in (ROOT / "pyproject.toml").read_text().splitlines()
    if line.startswith("version")
)
DEB = ROOT / f"dist/shadowplane_{VERSION}-1_amd64.deb"

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Building the image and the package, booting, and the walkthrough under emulation take minutes, more
    than the suite's default timeout; the first VM test pays for them."""
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.timeout(3600))


def need_vm_host() -> None:
    need(os.geteuid() == 0, "the VM suite needs root (debootstrap, chroot)", "run the tests as root; CI does")
    for tool in ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4"):
        need(
            shutil.which(tool),
            f"{tool} is missing",
            "run `make setup` (scripts/apt-packages.txt installs it)",
        )


@pytest.fixture(scope="session")
def vm_image() -> Path:
    need_vm_host()
    return build_image()


@pytest.fixture(scope="session")
def deb() -> Path:
    need_vm_host()
    p = subprocess.run(
        ["bash", str(ROOT / "packaging/build.sh"), "--format", "deb"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert p.returncode == 0, f"packaging/build.sh failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    assert DEB.exists(), f"packaging/build.sh made no {DEB.name}"
    return DEB


@pytest.fixture(scope="session")
def guest(vm_image: Path) -> Iterator[Guest]:
    with Guest.boot(vm_image) as g:
        yield g


@pytest.fixture(scope="session")
def walked(guest: Guest, deb: Path) -> Walk:
    """The guest after the README's "first hour" walkthrough, every step run as the README shows it."""
    return run_walkthrough(guest, deb.parent)

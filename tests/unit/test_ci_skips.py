"""Under CI=true nothing skips: `tests.support.need` fails instead, and tests/conftest.py turns any other
skip into a failure. Checked on a throwaway test session run with and without CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.support import ROOT

SKIPPING_TESTS = """
import pytest

from tests.support import need


def test_need_missing():
    need(False, "frobnicator is missing", "apt-get install frobnicator")


def test_need_met():
    need(True, "frobnicator is missing", "apt-get install frobnicator")


def test_bare_skip():
    pytest.skip("bare skip reason")


@pytest.mark.skipif(True, reason="mark skip reason")
def test_mark_skip():
    pass


@pytest.mark.xfail(reason="known bug", strict=True)
def test_expected_failure():
    assert False
"""

MODULE_SKIP = """
import pytest

pytest.skip("module skip reason", allow_module_level=True)


def test_never_collected():
    pass
"""


def session(tmp_path: Path, ci: bool, module: str) -> dict[str, tuple[str, str]]:
    """Run pytest on `module` with this suite's conftest as a plugin; {test name: (outcome, message)}."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this directory is the rootdir, not the checkout
    (tmp_path / "test_throwaway.py").write_text(module)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    if ci:
        env["CI"] = "true"
    junit = tmp_path / "junit.xml"
    plugins = ["-p", "tests.conftest", "-p", "no:cacheprovider"]  # the suite's hooks; no cache in tmp
    subprocess.run(
        [sys.executable, "-m", "pytest", *plugins, "-q", f"--junitxml={junit}", "test_throwaway.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out: dict[str, tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        kids = [k for k in case if k.tag in ("failure", "error", "skipped")]
        if not kids:
            out[case.get("name", "")] = ("passed", "")
        else:
            kind = kids[0].get("type", "") if kids[0].tag == "skipped" else ""
            outcome = "xfailed" if kind == "pytest.xfail" else kids[0].tag
            out[case.get("name", "")] = (outcome, (kids[0].get("message") or "") + (kids[0].text or ""))
    return out


def test_skips_skip_outside_ci(tmp_path: Path) -> None:
    got = session(tmp_path, ci=False, module=SKIPPING_TESTS)
    assert {name: outcome for name, (outcome, _) in got.items()} == {
        "test_need_missing": "skipped",
        "test_need_met": "passed",
        "test_bare_skip": "skipped",
        "test_mark_skip": "skipped",
        "test_expected_failure": "xfailed",
    }
    assert "frobnicator is missing: apt-get install frobnicator" in got["test_need_missing"][1]


def test_skips_fail_under_ci_naming_the_reason(tmp_path: Path) -> None:
    got = session(tmp_path, ci=True, module=SKIPPING_TESTS)
    outcomes = {name: outcome for name, (outcome, _) in got.items()}
    assert outcomes == {
        "test_need_missing": "failure",
        "test_need_met": "passed",
        "test_bare_skip": "failure",
        "test_mark_skip": "error",  # skipif acts in setup: a failed setup is an error
        "test_expected_failure": "xfailed",  # an expected failure is not a skip
    }
    assert "frobnicator is missing: apt-get install frobnicator" in got["test_need_missing"][1]
    assert "bare skip reason" in got["test_bare_skip"][1]
    assert "mark skip reason" in got["test_mark_skip"][1]


@pytest.mark.parametrize("ci", [False, True])
def test_a_module_that_skips_fails_under_ci(tmp_path: Path, ci: bool) -> None:
    got = session(tmp_path, ci=ci, module=MODULE_SKIP)
    [(outcome, message)] = got.values()
    assert outcome == ("error" if ci else "skipped") and "module skip reason" in message

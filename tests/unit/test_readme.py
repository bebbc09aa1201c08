"""The README is what newcomers and CI run: keep its generated parts and its commands true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_current() -> None:
    out = subprocess.run(
        [sys.executable, "scripts/config_reference.py"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() in (ROOT / "README.md").read_text(), (
        "README's configuration reference is stale: run scripts/config_reference.py --write"
    )


def test_readme_commands_are_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```sh", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci/run").read_text()

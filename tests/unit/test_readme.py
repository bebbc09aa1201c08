"""The README is what newcomers and CI run: keep its generated parts and its commands true."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import generated_docs  # noqa: E402


@pytest.mark.parametrize(
    ("file", "name", "make"), generated_docs.BLOCKS, ids=[b[1] for b in generated_docs.BLOCKS]
)
def test_generated_docs_are_current(file: str, name: str, make: Callable[[], str]) -> None:
    assert generated_docs.render(name, make) in (ROOT / file).read_text(), (
        f"{file}'s {name} block is stale: run .venv/bin/python scripts/generated_docs.py --write"
    )


def test_the_script_writes_what_the_test_checks(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "scripts/generated_docs.py"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    for file, name, make in generated_docs.BLOCKS:
        assert generated_docs.render(name, make) in out.stdout, file


def test_readme_commands_are_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```sh", 1)[1].split("```", 1)[0]
    assert "make demo" in first_block and "make test" in first_block
    assert "make test" in (ROOT / ".ci/run").read_text()

"""The checked-in generated gRPC code must be what `make proto` makes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date() -> None:
    out = subprocess.run(
        ["bash", "scripts/gen-proto.sh", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PY": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr

"""The code's layout: one home per concept means no import circles, and daemons that run only what they
serve. Read from the source (every import, also inside functions and under TYPE_CHECKING)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shadowplane", "agentd", "controller", "shadowctl", "training", "lab")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            if "v1" in f.relative_to(ROOT).parts:  # generated API code
                continue
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules `name` imports (`from a.b import c` counts a.b.c when that is a module)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base])
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t.strip(".") for t in targets if t.strip(".") in known}
    return found - {name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def test_no_module_imports_itself_through_others() -> None:
    g = graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append([*path[path.index(n) :], n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_daemons_never_load_training_or_the_lab() -> None:
    """Serving needs onnxruntime and numpy; training (and `onnx`) is `shadowctl train|backtest`'s alone."""
    code = (
        "import sys, agentd.cli, controller.cli; "
        "top = {m.split('.')[0] for m in sys.modules}; "
        "print(','.join(sorted(top & {'training', 'onnx', 'lab', 'shadowctl'})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the daemons import {out.stdout.strip()}"


SOURCE = (".py", ".c", ".sh", ".proto")
NOT_LISTED = {"__init__.py"}
UNDOCUMENTED_DIRS = ("tests", "bench", ".venv", "build", "dist", "shadowplane/v1", "docs", "deploy")


def architecture_rows() -> dict[str, set[str]]:
    """README's architecture table: directory -> the source files its row names."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| where | what |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        where, what = line.strip("|").split("|", 1)
        dirs = re.findall(r"`([^`]+/)`", where)
        if len(dirs) == 1:
            names = re.findall(r"`([^`]+)`", what)
            rows[dirs[0].rstrip("/")] = {n for n in names if n.endswith(SOURCE) and "/" not in n}
    return rows


def test_the_readme_architecture_table_is_the_tree() -> None:
    rows = architecture_rows()
    for d, listed in rows.items():
        files = {f.name for f in (ROOT / d).iterdir() if f.suffix in SOURCE and f.name not in NOT_LISTED}
        extra, missing = sorted(listed - files), sorted(files - listed)
        assert listed == files, f"README row `{d}/` lists {extra}, not in the tree; misses {missing}"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    source_dirs = {  # every directory of code (packaging's shell scripts are the packages' own business)
        str(Path(f).parent)
        for f in tracked.stdout.split()
        if f.endswith((".py", ".c", ".proto"))
        and Path(f).name not in NOT_LISTED
        and not f.startswith(UNDOCUMENTED_DIRS)
        and "/" in f
    }
    assert source_dirs <= set(rows), f"directories without a README row: {sorted(source_dirs - set(rows))}"

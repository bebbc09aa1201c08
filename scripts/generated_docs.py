"""Prints (or writes) the documentation that is generated from the code, so it cannot drift from it:

- README.md's configuration reference, from the config dataclasses;
- docs/prediction.md's table of the telemetry series, from controller/telemetry_schema.py.

.venv/bin/python scripts/generated_docs.py            # print every block
.venv/bin/python scripts/generated_docs.py --write    # replace the blocks in their files
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentd.config import AgentConfig  # noqa: E402
from controller import telemetry_schema  # noqa: E402
from controller.config import ControllerConfig  # noqa: E402
from shadowplane.config import reference  # noqa: E402

CONFIG_FILES = [
    ("agentd.toml", "/etc/shadowplane/agentd.toml", AgentConfig),
    ("controller.toml", "/etc/shadowplane/controller.toml", ControllerConfig),
]


def config_reference() -> str:
    out = []
    for name, path, cls in CONFIG_FILES:
        out += [f"\n**{name}** (`{path}`)\n", "| key | default | meaning |", "|---|---|---|"]
        for key, default, doc in reference(cls):
            out.append(f"| `{key}` | `{default}` | {doc} |")
    return "\n".join(out)


def telemetry_series() -> str:
    return "\n" + telemetry_schema.markdown_table()


# (file, marker name, what goes between `<!-- name:begin -->` and `<!-- name:end -->`)
BLOCKS: list[tuple[str, str, Callable[[], str]]] = [
    ("README.md", "config-reference", config_reference),
    ("docs/prediction.md", "telemetry-series", telemetry_series),
]


def render(name: str, make: Callable[[], str]) -> str:
    return f"<!-- {name}:begin -->\n{make()}\n<!-- {name}:end -->"


def main() -> int:
    for file, name, make in BLOCKS:
        text = render(name, make)
        if "--write" not in sys.argv:
            print(f"{file}:\n{text}\n")
            continue
        path = ROOT / file
        cur = path.read_text()
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        start, stop = cur.index(begin), cur.index(end) + len(end)
        path.write_text(cur[:start] + text + cur[stop:])
    return 0


if __name__ == "__main__":
    sys.exit(main())

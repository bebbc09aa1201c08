"""Prints the README's configuration reference, made from the config dataclasses themselves.

.venv/bin/python scripts/config_reference.py            # print
.venv/bin/python scripts/config_reference.py --write    # replace the block in README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentd.config import AgentConfig
from controller.config import ControllerConfig
from shadowplane.config import reference

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
FILES = [
    ("agentd.toml", "/etc/shadowplane/agentd.toml", AgentConfig),
    ("controller.toml", "/etc/shadowplane/controller.toml", ControllerConfig),
]


def render() -> str:
    out = [BEGIN]
    for name, path, cls in FILES:
        out += [f"\n**{name}** (`{path}`)\n", "| key | default | meaning |", "|---|---|---|"]
        for key, default, doc in reference(cls):
            out.append(f"| `{key}` | `{default}` | {doc} |")
    out.append(END)
    return "\n".join(out)


def main() -> int:
    text = render()
    if "--write" in sys.argv:
        readme = Path(__file__).resolve().parent.parent / "README.md"
        cur = readme.read_text()
        start, end = cur.index(BEGIN), cur.index(END) + len(END)
        readme.write_text(cur[:start] + text + cur[end:])
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

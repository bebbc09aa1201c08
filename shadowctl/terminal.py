"""Where shadowctl's tables go: on a terminal they fit its width; into a pipe or a file every column is
written in full, never cut to rich's 80-column guess (a script, `grep` or `less -S` reads it whole)."""

from __future__ import annotations

import sys

from rich.console import Console

# Without a terminal nothing says how wide a line may be: wide enough that no table ever wraps or folds.
# Tables are not expanded to it (rich sizes them to their content), so lines carry no padding.
UNLIMITED_WIDTH = 1_000_000


def interactive() -> bool:
    """Is standard output a terminal (a person watching), rather than a pipe or a file?"""
    return sys.stdout.isatty()


def console() -> Console:
    if interactive():
        return Console()
    return Console(width=UNLIMITED_WIDTH, no_color=True, highlight=False)

"""Where each captured cgroup id sits in the capture program's cgroup filter (bpf_program.c: `slot_of`).

The filter is an open-addressed array: an id lives within FILTER_PROBES entries of its hash, and a probe ends
at the first empty entry, so an uncaptured task's test usually reads one entry. This module is the other
definition of that hash and probe order; the layout it computes is what the agent writes into the map.

Ids that stay keep their entries when others come and go, so the program never misses a captured task while
the table is rewritten for a new descendant cgroup; a removal rebuilds the layout (a probe chain must not
have holes) and only the entries that differ are written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

FILTER_BITS = 14
FILTER_SIZE = 1 << FILTER_BITS  # 16,384 entries of 16 bytes: 256 KB
FILTER_PROBES = 8
MAX_CGROUPS = FILTER_SIZE // 4  # at a quarter full, an id that finds no room within 8 probes is very rare
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def home(cgid: int) -> int:
    """The first entry probed for `cgid` (Fibonacci hashing, as `slot_of` computes it)."""
    return ((cgid * _GOLDEN) & _MASK64) >> (64 - FILTER_BITS)


def cflags() -> list[str]:
    return [
        f"-DFILTER_BITS={FILTER_BITS}",
        f"-DFILTER_SIZE={FILTER_SIZE}",
        f"-DFILTER_PROBES={FILTER_PROBES}",
    ]


def _place(table: dict[int, int], cgid: int) -> bool:
    for i in range(FILTER_PROBES):
        idx = (home(cgid) + i) & (FILTER_SIZE - 1)
        if idx not in table:
            table[idx] = cgid
            return True
    return False


def layout(want: Iterable[int], current: Mapping[int, int]) -> tuple[dict[int, int], list[int]]:
    """Entry index -> cgroup id for the ids in `want`, keeping `current` (index -> id) where it still holds
    (ids only added: every entry stays; any removal: rebuilt, in id order), and the ids that found no entry
    (beyond MAX_CGROUPS, or no free entry within FILTER_PROBES of their hash): the caller reports them."""
    want = set(want)
    table = dict(current) if all(cg in want for cg in current.values()) else {}
    unplaced = []
    for cg in sorted(want - set(table.values())):
        if len(table) >= MAX_CGROUPS or not _place(table, cg):
            unplaced.append(cg)
    return table, unplaced

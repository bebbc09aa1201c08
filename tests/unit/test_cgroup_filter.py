"""The cgroup filter's layout: where the agent writes each captured cgroup id
(agentd/capture/cgroup_filter.py)."""

from __future__ import annotations

from agentd.capture import cgroup_filter as cf


def probe_path_ok(table: dict[int, int]) -> bool:
    """Every id is found the way the BPF program looks: from its home entry, before any empty one."""
    for idx, cg in table.items():
        for i in range(cf.FILTER_PROBES):
            at = (cf.home(cg) + i) & (cf.FILTER_SIZE - 1)
            if at == idx:
                break
            if at not in table:
                return False
        else:
            return False
    return True


def test_consecutive_ids_spread_over_the_table() -> None:
    # sibling cgroups get consecutive inode numbers; most must land on their home entry
    ids = range(50_000, 51_000)
    table, unplaced = cf.layout(ids, {})
    assert not unplaced
    assert sorted(table.values()) == list(ids) and probe_path_ok(table)
    at_home = sum(1 for idx, cg in table.items() if idx == cf.home(cg))
    assert at_home > 0.9 * len(ids)


def test_adding_ids_keeps_every_entry_in_place() -> None:
    before, _ = cf.layout(range(100, 400), {})
    after, _ = cf.layout(range(100, 450), before)
    assert all(after[idx] == cg for idx, cg in before.items())
    assert probe_path_ok(after)


def test_removing_an_id_rebuilds_without_holes() -> None:
    before, _ = cf.layout(range(100, 400), {})
    after, _ = cf.layout((cg for cg in range(100, 400) if cg != 250), before)
    assert 250 not in after.values() and len(after) == 299 and probe_path_ok(after)


def test_colliding_ids_probe_on() -> None:
    # ids that share a home entry: found within FILTER_PROBES entries, in order
    base = 12345
    same = [cg for cg in range(base, base + 2_000_000) if cf.home(cg) == cf.home(base)][: cf.FILTER_PROBES]
    table, unplaced = cf.layout(same, {})
    assert probe_path_ok(table) and not unplaced
    one_more = next(cg for cg in range(same[-1] + 1, same[-1] + 2_000_000) if cf.home(cg) == cf.home(base))
    table, unplaced = cf.layout([*same, one_more], {})
    assert unplaced == [one_more] and len(table) == cf.FILTER_PROBES and probe_path_ok(table)


def test_beyond_the_maximum_ids_are_reported_not_placed() -> None:
    table, unplaced = cf.layout(range(cf.MAX_CGROUPS + 3), {})
    assert len(table) == cf.MAX_CGROUPS
    assert unplaced == [cf.MAX_CGROUPS, cf.MAX_CGROUPS + 1, cf.MAX_CGROUPS + 2]

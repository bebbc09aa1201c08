"""The controller freezes its long-lived heap (shadowplane/gc_pauses.py): what was frozen and later became a
garbage cycle is kept until the next full refreeze, and reclaimed then; a refreeze never freezes garbage."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from shadowplane.gc_pauses import refreeze


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_a_cycle_frozen_alive_is_reclaimed_at_the_full_refreeze() -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a
    dead = weakref.ref(a)
    frozen, _ = refreeze(full=True)
    assert frozen > 0
    del a, b  # now garbage, frozen
    refreeze(full=False)
    assert dead() is not None, "a frozen object was collected by a partial refreeze"
    refreeze(full=True)
    assert dead() is None, "the full refreeze left a frozen garbage cycle"


def test_a_refreeze_freezes_no_garbage() -> None:
    dead = cycle()  # garbage already, not collected yet
    refreeze(full=False)
    assert dead() is None

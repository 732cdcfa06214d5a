"""The stream's slots: made as batches need them, reused last in first out, never more than the
queue allows (memory does not grow with N, and a writer that keeps up touches two)."""

import pytest

from featlab.cache.stream import Writer
from featlab.errors import CacheError


def test_slots_are_made_on_demand_reused_first_and_capped(tmp_path):
    made = []

    def make_slot():
        made.append(object())
        return made[-1]

    # not started: take() alone decides when a slot is reused and when one is made
    writer = Writer(str(tmp_path / "c.h5"), ["p"], False, make_slot, max_slots=3, queue_size=1,
                    on_rows=None)
    assert made == []  # nothing allocated before the first batch asks
    first = writer.take()
    writer.free.put(first)  # handed back by the writer, as one that keeps up does
    assert writer.take() is first and len(made) == 1
    second, third = writer.take(), writer.take()  # the writer falls behind: more are made
    assert len(made) == 3 and len({id(first), id(second), id(third)}) == 3
    writer.free.put(second)
    writer.free.put(third)
    assert writer.take() is third  # the most recently returned, warmest in the caches
    assert writer.take() is second
    with pytest.raises(CacheError, match="writer thread .* stopped"):
        writer.take()  # at the cap it waits for the writer (here: not running) instead
    assert len(made) == 3

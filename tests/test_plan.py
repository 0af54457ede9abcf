"""The chunk plan covers every byte exactly once, in order, whatever the sizes."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netloader.plan import MIN_CHUNK, Plan


@given(st.lists(st.integers(0, 5 * MIN_CHUNK), max_size=30), st.integers(MIN_CHUNK, 4 * MIN_CHUNK))
def test_pieces_cover_every_byte_once(sizes, chunk_size):
    plan = Plan(sizes, chunk_size)
    covered = []
    for index in range(plan.num_chunks):
        pieces = plan.pieces(index)
        assert sum(p.stop - p.start for p in pieces) == plan.chunk_bytes(index) > 0
        covered.extend(pieces)
    # Stitch adjacent pieces of the same slot back together: each non-empty slot is one range.
    merged: dict[int, list[int]] = {}
    for slot, start, stop in covered:
        assert stop > start
        if slot in merged:
            assert merged[slot][1] == start
            merged[slot][1] = stop
        else:
            assert start == 0
            merged[slot] = [start, stop]
    assert {s: r[1] for s, r in merged.items()} == {i: n for i, n in enumerate(sizes) if n}
    assert [p.slot for p in covered] == sorted(p.slot for p in covered)


def test_chunk_size_bounds():
    with pytest.raises(ValueError):
        Plan([1], MIN_CHUNK - 1)


def test_empty_plan():
    assert Plan([], MIN_CHUNK).num_chunks == 0
    assert Plan([0, 0], MIN_CHUNK).num_chunks == 0


def test_joined_pieces_join_only_adjacent_ranges():
    """Consecutive chunks of one tensor become one range; a chunk left out leaves a gap."""
    plan = Plan([10, 3 * MIN_CHUNK, 7], MIN_CHUNK)
    whole = plan.joined(range(plan.num_chunks))
    assert [(p.slot, p.start, p.stop) for p in whole] == [
        (0, 0, 10),
        (1, 0, 3 * MIN_CHUNK),
        (2, 0, 7),
    ]
    gap = plan.joined([0, 2])
    assert [(p.slot, p.start, p.stop) for p in gap] == [
        (0, 0, 10),
        (1, 0, MIN_CHUNK - 10),
        (1, 2 * MIN_CHUNK - 10, 3 * MIN_CHUNK - 10),
    ]

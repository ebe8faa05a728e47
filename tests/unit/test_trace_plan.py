"""Prefetch planning: trace records -> coalesced spans, in the order they are needed."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlaybd_py.engine.prefetch import PrefetchRequest, plan_prefetch
from overlaybd_py.errors import UsageError

KiB = 1024
SIZES = [64 << 20, 64 << 20, 64 << 20]


def test_neighbours_merge_and_the_earliest_need_comes_first():
    records = [
        (1, 10 * KiB * KiB, 4 * KiB),  # rank 0: layer 1 far away
        (0, 0, 4 * KiB),  # rank 1
        (0, 8 * KiB, 4 * KiB),  # rank 2: 4 KiB after rank 1 -> same span
        (0, 1 << 20, 4 * KiB),  # rank 3: 1 MiB away -> its own span
        (0, 4 * KiB, 4 * KiB),  # rank 4: fills the hole, already inside
    ]
    plan, skipped = plan_prefetch(records, SIZES, gap=64 * KiB)
    assert skipped == 0
    assert plan == [
        PrefetchRequest(0, 1, 10 * KiB * KiB, 4 * KiB),
        PrefetchRequest(1, 0, 0, 12 * KiB),
        PrefetchRequest(3, 0, 1 << 20, 4 * KiB),
    ]


def test_spans_stop_at_max_span_and_long_records_are_split():
    records = [(0, i * 64 * KiB, 64 * KiB) for i in range(10)] + [(2, 0, 5 << 20)]
    plan, _ = plan_prefetch(records, SIZES, gap=0, max_span=256 * KiB)
    layer0 = [r for r in plan if r.layer == 0]
    assert [(r.offset, r.length) for r in layer0] == [
        (0, 256 * KiB), (256 * KiB, 256 * KiB), (512 * KiB, 128 * KiB)]
    layer2 = [r for r in plan if r.layer == 2]
    assert sum(r.length for r in layer2) == 5 << 20
    assert all(r.length <= 256 * KiB for r in plan)


def test_foreign_records_are_skipped_and_ranges_clipped():
    plan, skipped = plan_prefetch([(3, 0, 10), (0, 70 << 20, 10), (0, (64 << 20) - 100, 4096)],
                                  SIZES)
    assert skipped == 2
    assert plan == [PrefetchRequest(2, 0, (64 << 20) - 100, 100)]


def test_bad_parameters():
    with pytest.raises(UsageError):
        plan_prefetch([], SIZES, gap=-1)
    with pytest.raises(UsageError):
        plan_prefetch([], SIZES, max_span=0)


records_st = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 70 << 20),
                                st.integers(0, 3 << 20)), max_size=60)


@given(records_st, st.sampled_from([0, 4 * KiB, 64 * KiB, 1 << 20]),
       st.sampled_from([4 * KiB, 256 * KiB, 4 << 20]))
def test_plan_properties(records, gap, max_span):
    plan, skipped = plan_prefetch(records, SIZES, gap=gap, max_span=max_span)
    # Ordered by rank; spans are non-empty, bounded, inside their layer, disjoint.
    assert plan == sorted(plan)
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for r in plan:
        assert 0 < r.length <= max_span
        assert r.offset + r.length <= SIZES[r.layer]
        by_layer.setdefault(r.layer, []).append((r.offset, r.offset + r.length))
    for spans in by_layer.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    # Every byte a record names (clipped to its layer) is covered.
    kept = 0
    for rank, (layer, offset, length) in enumerate(records):
        start, end = offset, min(SIZES[layer], offset + length)
        if end <= start:
            continue
        kept += 1
        covered = sorted((a, b) for a, b in by_layer[layer] if a < end and start < b)
        pos = start
        for a, b in covered:
            assert a <= pos
            pos = max(pos, b)
        assert pos >= end
        # The span holding the record's first byte is needed no later than the record.
        first = next(r for r in plan if r.layer == layer and r.offset <= start
                     < r.offset + r.length)
        assert first.rank <= rank
    assert kept + skipped == len(records)

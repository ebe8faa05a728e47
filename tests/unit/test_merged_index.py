"""The merged index against a plain model: per sector, which layer (and where) answers."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from overlaybd_py.formats.lsmt import Segments
from overlaybd_py.formats.merged_index import MergedIndex

SPACE = 256  # sectors of virtual space in the model


@st.composite
def layer_tables(draw, max_records=12):
    """A sorted, non-overlapping table with gaps and zeroed records."""
    cuts = sorted(draw(st.sets(st.integers(0, SPACE), max_size=2 * max_records)))
    table = Segments()
    moffset = 8
    for start, end in zip(cuts[::2], cuts[1::2], strict=False):
        if end <= start:
            continue
        zeroed = draw(st.booleans()) and draw(st.booleans())
        table.append(start, end - start, moffset, int(zeroed))
        moffset += 0 if zeroed else end - start
    return table


def model(layers: list[Segments]) -> list[tuple[int, int] | None]:
    """Per sector: (layer, sector in that layer's file) or None for zeros; top layer wins."""
    sectors: list[tuple[int, int] | None] = [None] * SPACE
    for position, table in enumerate(layers):
        for offset, length, moffset, zeroed, _tag in table.records():
            for k in range(length):
                sectors[offset + k] = None if zeroed else (position, moffset + k)
    return sectors


def pieces_to_sectors(pieces, offset: int, length: int) -> list[tuple[int, int] | None]:
    out = []
    assert sum(p[2] for p in pieces) == length
    for layer, layer_offset, piece_length in pieces:
        assert piece_length > 0
        for k in range(0, piece_length, 512):
            out.append(None if layer < 0 else (layer, (layer_offset + k) // 512))
    return out


@settings(max_examples=150, deadline=None)
@given(layers=st.lists(layer_tables(), min_size=0, max_size=5),
       ranges=st.lists(st.tuples(st.integers(0, SPACE - 1), st.integers(1, SPACE)), max_size=8))
def test_merge_matches_model(accel, layers, ranges):
    merged = MergedIndex.build(layers)
    truth = model(layers)
    # The merged table: sorted, non-overlapping, data only.
    s = merged.segments
    assert all(z == 0 for z in s.zeroed)
    assert all(s.offset[i] + s.length[i] <= s.offset[i + 1] for i in range(len(s) - 1))
    for start, length in [(0, SPACE), *ranges]:
        length = min(length, SPACE - start)
        pieces = merged.lookup(start * 512, length * 512)
        assert pieces_to_sectors(pieces, start * 512, length * 512) == truth[start : start + length]


@settings(max_examples=100, deadline=None)
@given(layers=st.lists(layer_tables(), min_size=1, max_size=3),
       start=st.integers(0, SPACE * 512 - 1), length=st.integers(1, 5000))
def test_unaligned_lookups(accel, layers, start, length):
    merged = MergedIndex.build(layers)
    truth = model(layers)
    pieces = merged.lookup(start, length)
    assert sum(p[2] for p in pieces) == length
    pos = start
    for layer, layer_offset, piece_length in pieces:
        for k in (0, piece_length - 1):
            sector = (pos + k) // 512
            want = truth[sector] if sector < SPACE else None
            if want is None:
                assert layer < 0
            else:
                assert (layer, (layer_offset + k) // 512) == want
                assert (layer_offset + k) % 512 == (pos + k) % 512
        pos += piece_length


def test_empty_and_beyond(accel):
    assert MergedIndex.build([]).lookup(0, 4096) == [(-1, 0, 4096)]
    table = Segments()
    table.append(8, 8, 100)
    merged = MergedIndex.build([table])
    assert merged.lookup(0, 8192 + 4096 + 1000) == [
        (-1, 0, 4096), (0, 100 * 512, 4096), (-1, 0, 5096)]
    assert merged.lookup(0, 0) == []
    assert merged.statistics().records == 1


def test_zeroed_upper_hides_lower(accel):
    lower, upper = Segments(), Segments()
    lower.append(0, 100, 8)
    upper.append(10, 20, 8, 1)
    merged = MergedIndex.build([lower, upper])
    assert merged.lookup(0, 100 * 512) == [
        (0, 8 * 512, 10 * 512), (-1, 0, 20 * 512), (0, 38 * 512, 70 * 512)]

"""The writable index (later writes win) against a per-sector model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from overlaybd_py.formats import writable_index
from overlaybd_py.formats.writable_index import WritableIndex

SPACE = 3000


def check(index: WritableIndex, truth: list) -> None:
    records = list(index.records())
    assert len(records) == len(index)
    got: list = [None] * SPACE
    prev_end = -1
    for offset, length, moffset, zeroed in records:
        assert length > 0 and offset >= prev_end
        prev_end = offset + length
        for k in range(length):
            got[offset + k] = ("zero",) if zeroed else ("data", moffset + k)
    assert got == truth


@settings(max_examples=200, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, SPACE - 1), st.integers(1, 300), st.booleans()),
                       max_size=60))
def test_inserts_match_model(writes):
    index = WritableIndex()
    truth: list = [None] * SPACE
    moffset = 8
    for offset, length, zeroed in writes:
        length = min(length, SPACE - offset)
        index.insert(offset, length, moffset, int(zeroed))
        for k in range(length):
            truth[offset + k] = ("zero",) if zeroed else ("data", moffset + k)
        moffset += length
    check(index, truth)
    # overlapping() trims to the asked window
    for start, end in ((0, SPACE), (17, 1234), (2999, 3000)):
        for offset, length, _m, _z in index.overlapping(start, end):
            assert start <= offset and offset + length <= end


def test_many_blocks(monkeypatch):
    """Small blocks force splits and cross-block deletions."""
    monkeypatch.setattr(writable_index, "_BLOCK", 2)
    index = WritableIndex()
    truth: list = [None] * SPACE
    import random

    rnd = random.Random(7)
    moffset = 8
    for _ in range(2000):
        offset = rnd.randrange(SPACE)
        length = min(rnd.choice((1, 2, 8, 64, 700)), SPACE - offset)
        index.insert(offset, length, moffset)
        for k in range(length):
            truth[offset + k] = ("data", moffset + k)
        moffset += length
    check(index, truth)

"""The in-memory index of a writable layer: non-overlapping mappings where later writes win.

Pure. Built by replaying a writable index file's log, then kept current as the device is
written. Records are ``(offset, length, moffset, zeroed)`` in sectors, stored in blocks of
sorted lists so that an insert costs O(block) rather than O(records): a converter writes
hundreds of thousands of mappings into one layer.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator

from .lsmt import Segments

__all__ = ["WritableIndex"]

Record = tuple[int, int, int, int]  # offset, length, moffset, zeroed (sectors)

_BLOCK = 256  # records per block before a split


def _trim(rec: Record, start: int, end: int) -> Record:
    """The part of ``rec`` inside [start, end); moffset advances on a front trim of data."""
    offset, length, moffset, zeroed = rec
    new_start = max(offset, start)
    new_end = min(offset + length, end)
    delta = new_start - offset
    return new_start, new_end - new_start, moffset if zeroed else moffset + delta, zeroed


class WritableIndex:
    """Sorted, non-overlapping mappings; ``insert`` cuts away what it overlaps."""

    __slots__ = ("_blocks", "_count", "_firsts")

    def __init__(self) -> None:
        self._blocks: list[list[Record]] = []
        self._firsts: list[int] = []
        self._count = 0

    @classmethod
    def from_log(cls, segments: Segments) -> WritableIndex:
        """Replay a log of records in write order (later records win)."""
        index = cls()
        for offset, length, moffset, zeroed, _tag in segments.records():
            if length:
                index.insert(offset, length, moffset, zeroed)
        return index

    def __len__(self) -> int:
        return self._count

    def _locate(self, sector: int) -> tuple[int, int]:
        """(block, position) of the first record that ends after ``sector``."""
        if not self._blocks:
            return 0, 0
        b = max(bisect_right(self._firsts, sector) - 1, 0)
        block = self._blocks[b]
        i = max(bisect_right(block, (sector, 1 << 64)) - 1, 0)
        rec = block[i]
        if rec[0] + rec[1] <= sector:
            i += 1
        if i == len(block) and b + 1 < len(self._blocks):
            return b + 1, 0
        return b, i

    def insert(self, offset: int, length: int, moffset: int, zeroed: int = 0) -> None:
        """Map ``[offset, offset+length)`` sectors to ``moffset`` (or zeros), on top of all."""
        if length <= 0:
            raise ValueError("insert of an empty mapping")
        end = offset + length
        if not self._blocks:
            self._blocks.append([(offset, length, moffset, zeroed)])
            self._firsts.append(offset)
            self._count = 1
            return
        b0, i0 = self._locate(offset)
        pieces: list[Record] = []
        right: Record | None = None
        b, i = b0, i0
        removed = 0
        while b < len(self._blocks):
            block = self._blocks[b]
            if i >= len(block):
                b, i = b + 1, 0
                continue
            rec = block[i]
            if rec[0] >= end:
                break
            if rec[0] < offset:
                pieces.append(_trim(rec, rec[0], offset))
            if rec[0] + rec[1] > end:
                right = _trim(rec, end, rec[0] + rec[1])
            removed += 1
            i += 1
        pieces.append((offset, length, moffset, zeroed))
        if right is not None:
            pieces.append(right)
        # Delete the overlapped records [(b0, i0), (b, i)) and put the pieces in their place.
        if b == b0:
            self._blocks[b0][i0:i] = pieces
        else:
            del self._blocks[b0][i0:]
            if b < len(self._blocks):
                del self._blocks[b][:i]
            del self._blocks[b0 + 1 : b]
            del self._firsts[b0 + 1 : b]
            self._blocks[b0][i0:i0] = pieces
        self._count += len(pieces) - removed
        # Repair the later block first: splitting block b0 would shift its index.
        if b != b0 and b0 + 1 < len(self._blocks):
            self._repair(b0 + 1)
        self._repair(b0)

    def _repair(self, b: int) -> None:
        """Drop block b if empty, split it if large, refresh its first key."""
        block = self._blocks[b]
        if not block:
            del self._blocks[b]
            del self._firsts[b]
            return
        if len(block) > 2 * _BLOCK:
            half = len(block) // 2
            self._blocks[b : b + 1] = [block[:half], block[half:]]
            self._firsts[b : b + 1] = [block[0][0], block[half][0]]
            return
        self._firsts[b] = block[0][0]

    def overlapping(self, offset: int, end: int) -> Iterator[Record]:
        """Records intersecting ``[offset, end)`` sectors, trimmed to it, in order."""
        b, i = self._locate(offset)
        while b < len(self._blocks):
            block = self._blocks[b]
            while i < len(block):
                rec = block[i]
                if rec[0] >= end:
                    return
                yield _trim(rec, offset, end)
                i += 1
            b, i = b + 1, 0

    def records(self) -> Iterator[Record]:
        for block in self._blocks:
            yield from block

    def segments(self) -> Segments:
        """All mappings as a sorted Segments table (tag 0)."""
        out = Segments()
        for offset, length, moffset, zeroed in self.records():
            out.append(offset, length, moffset, zeroed)
        return out

"""Sealing a writable layer: the layout ``overlaybd-commit`` writes, as a plan of copies.

Pure (spec sections 1.3 and 1.5). ``plan_commit`` takes the layer's sorted mappings and
returns the header, the list of data ranges to copy (in output order), the padded index and
the trailer; the caller does the copying. The record layout follows the original exactly so
that the committed file is byte-identical: data records are cut into 32 KiB pieces as they
are copied, then adjacent pieces are merged back while the merged length stays below 16383
sectors, and the index is padded with invalid records to a multiple of 256.

The pieces start at each mapping's first sector, so the same bytes written in different
splits (the kernel's writeback under load decides them) can seal into different records
once a run passes the merge limit. ``merge_runs`` (what the converter asks for, so that two
conversions of an image give the same digests) cuts each run of touching data mappings, and
each run of touching zeroed ones, as if it had been written at once; the file is as valid,
but no longer what ``overlaybd-commit`` writes for split mappings.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import _accel
from ..errors import UsageError
from .lsmt import (
    FLAG_DATA,
    FLAG_HEADER,
    FLAG_SEALED,
    HT_SPACE,
    INVALID_OFFSET,
    MAX_LENGTH,
    MAX_RO_INDEX_SIZE,
    NULL_UUID,
    SECTOR,
    LsmtHeader,
    Segments,
)

__all__ = ["CommitPlan", "plan_commit"]

_COPY_PIECE = 64  # sectors: the original copies through a 32 KiB buffer
_INDEX_ALIGN = 256  # records: the index is padded to 4 KiB


@dataclass(frozen=True, slots=True)
class CommitPlan:
    header: bytes
    copies: list[tuple[int, int]]  # (byte offset in the source data file, byte length)
    index: bytes
    trailer: bytes
    index_offset: int  # bytes; also where the data ends

    @property
    def size(self) -> int:
        return self.index_offset + len(self.index) + len(self.trailer)


def _compress(pieces: list[list[int]]) -> list[list[int]]:
    """Merge neighbours contiguous in both offset and moffset (the original's rule)."""
    out: list[list[int]] = []
    for piece in pieces:
        if out:
            last = out[-1]
            last_mend = last[2] if last[3] else last[2] + last[1]
            if (
                last[0] + last[1] == piece[0]
                and last_mend == piece[2]
                and last[3] == piece[3]
                and last[1] + piece[1] < MAX_LENGTH
            ):
                last[1] += piece[1]
                continue
        out.append(piece)
    return out


def plan_commit(
    segments: Segments,
    *,
    virtual_size: int,
    uuid: str = NULL_UUID,
    parent_uuid: str = NULL_UUID,
    user_tag: bytes = b"",
    merge_runs: bool = False,
) -> CommitPlan:
    """Plan the sealed file for ``segments`` (sorted, non-overlapping; moffsets in the
    writable data file); ``merge_runs``: see the module docstring."""
    position = HT_SPACE // SECTOR
    copies: list[tuple[int, int]] = []
    runs: list[list[int]] = []  # [offset, length, position, zeroed], as pieces are cut
    for offset, length, moffset, zeroed, _tag in segments.records():
        last = runs[-1] if runs else None
        if merge_runs and last is not None and last[3] == zeroed \
                and last[0] + last[1] == offset:
            last[1] += length  # a data run's bytes follow in the sealed file too
        else:
            runs.append([offset, length, position, zeroed])
        if not zeroed:
            copies.append((moffset * SECTOR, length * SECTOR))
            position += length
    pieces: list[list[int]] = []
    for offset, length, start, zeroed in runs:
        if zeroed and not merge_runs:
            pieces.append([offset, length, start, 1])  # the original keeps them whole
            continue
        step = 0 if zeroed else 1  # a zeroed run's pieces all point at one position
        for k in range(0, length, _COPY_PIECE):
            pieces.append([offset + k, min(_COPY_PIECE, length - k), start + step * k, zeroed])
    merged = _compress(pieces)
    table = Segments()
    for offset, length, moffset, zeroed in merged:
        table.append(offset, length, moffset, zeroed)
    padding = -len(table) % _INDEX_ALIGN
    if len(table) + padding > MAX_RO_INDEX_SIZE:
        raise UsageError(
            f"the layer has {len(table)} segments; a sealed layer holds at most "
            f"{MAX_RO_INDEX_SIZE} index records including padding (readers refuse more)"
        )
    for _ in range(padding):
        table.append(INVALID_OFFSET, 0, 0, 0)
    index = _accel.encode_segments(*table.columns())
    index_offset = position * SECTOR
    common = dict(
        virtual_size=virtual_size, uuid=uuid, parent_uuid=parent_uuid, user_tag=user_tag
    )
    header = LsmtHeader(flags=FLAG_HEADER | FLAG_DATA | FLAG_SEALED, **common)
    trailer = LsmtHeader(
        flags=FLAG_DATA | FLAG_SEALED, index_offset=index_offset, index_size=len(table),
        **common,
    )
    return CommitPlan(header.pack(), copies, index, trailer.pack(), index_offset)

"""Reference (pure Python) implementations of the hot loops; ``native/`` mirrors them exactly.

Every function here has a twin with the same name and signature in the C extension
``overlaybd_py._native`` (see ``_native.pyi``). The parity tests run both on the same inputs
and require bit-identical results, so a change here must be made there too.

Segment columns: a segment table is five ``array.array`` columns of equal length,
``(offset 'Q', length 'I', moffset 'Q', zeroed 'B', tag 'B')``, offsets and lengths in
512-byte sectors. The functions never validate records beyond what they need; policy lives
in ``formats/``.
"""

from __future__ import annotations

import struct
import threading
from array import array
from bisect import bisect_right
from collections.abc import Sequence

import crc32c as _crc32c_mod
import lz4.block
import zstandard

__all__ = [
    "INVALID_OFFSET",
    "crc32c",
    "crc32c_blocks",
    "decode_segments",
    "encode_segments",
    "first_out_of_bounds",
    "first_unsorted",
    "lookup",
    "merge",
    "zfile_decode",
    "zfile_encode",
]

INVALID_OFFSET = (1 << 50) - 1
_OFFSET_MASK = (1 << 50) - 1
_MOFFSET_MASK = (1 << 55) - 1
_RECORD = struct.Struct("<QQ")

Columns = tuple[array, array, array, array, array]

# A ZstdDecompressor is reusable but not thread safe; decompression runs in worker threads.
_zstd_local = threading.local()


def _zstd_compressor(level: int = 3) -> zstandard.ZstdCompressor:
    compressors = getattr(_zstd_local, "compressors", None)
    if compressors is None:
        compressors = _zstd_local.compressors = {}
    compressor = compressors.get(level)
    if compressor is None:
        compressor = compressors[level] = zstandard.ZstdCompressor(level=level)
    return compressor


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    decompressor = getattr(_zstd_local, "decompressor", None)
    if decompressor is None:
        decompressor = _zstd_local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def crc32c(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """CRC32C with no initial or final inversion, starting from ``seed`` (overlaybd's 'raw')."""
    return ~_crc32c_mod.crc32c(data, ~seed & 0xFFFFFFFF) & 0xFFFFFFFF


def crc32c_blocks(data: bytes | bytearray | memoryview, block_size: int) -> bytes:
    """crc32c(piece, 0) of every ``block_size`` piece of ``data`` (the last may be short), as
    the bytes of an ``array('I')``: one call for a whole run of cache blocks."""
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError("block_size must be a positive int")
    view = memoryview(data).cast("B")
    return array("I", (crc32c(view[i : i + block_size])
                       for i in range(0, len(view), block_size))).tobytes()


def empty_columns() -> Columns:
    return array("Q"), array("I"), array("Q"), array("B"), array("B")


def decode_segments(buf: bytes | bytearray | memoryview) -> Columns:
    """Split packed 16-byte records into columns, skipping padding (offset == INVALID_OFFSET)."""
    if len(buf) % 16:
        raise ValueError("segment buffer length is not a multiple of 16")
    offsets, lengths, moffsets, zeroed, tags = empty_columns()
    for lo, hi in _RECORD.iter_unpack(buf):
        offset = lo & _OFFSET_MASK
        if offset == INVALID_OFFSET:
            continue
        offsets.append(offset)
        lengths.append(lo >> 50)
        moffsets.append(hi & _MOFFSET_MASK)
        zeroed.append((hi >> 55) & 1)
        tags.append(hi >> 56)
    return offsets, lengths, moffsets, zeroed, tags


def encode_segments(
    offsets: array, lengths: array, moffsets: array, zeroed: array, tags: array
) -> bytes:
    """Pack columns into 16-byte records (no padding added)."""
    out = bytearray(16 * len(offsets))
    pack = _RECORD.pack_into
    for i in range(len(offsets)):
        lo = (offsets[i] & _OFFSET_MASK) | (lengths[i] << 50)
        hi = (moffsets[i] & _MOFFSET_MASK) | ((zeroed[i] & 1) << 55) | (tags[i] << 56)
        pack(out, 16 * i, lo, hi)
    return bytes(out)


def first_unsorted(offsets: array, lengths: array) -> int:
    """Index of the first record that overlaps or precedes its predecessor, or -1."""
    prev_end = -1
    for i in range(len(offsets)):
        if offsets[i] < prev_end:
            return i
        prev_end = offsets[i] + lengths[i]
    return -1


def first_out_of_bounds(
    moffsets: array, lengths: array, zeroed: array, low: int, high: int
) -> int:
    """Index of the first record whose mapped range leaves [low, high] sectors, or -1.

    A data record needs ``low <= moffset`` and ``moffset + length <= high``; a zeroed record
    stores nothing and only needs ``low <= moffset <= high``.
    """
    for i in range(len(moffsets)):
        start = moffsets[i]
        end = start if zeroed[i] else start + lengths[i]
        if start < low or end > high:
            return i
    return -1


def merge(layers: Sequence[Columns]) -> Columns:
    """Stack sorted layer tables (bottom first) into one table of data records.

    The top layer wins; a zeroed record hides what lies below it and is then dropped, so
    the result holds only data records, each tagged with its layer's position (0 = bottom).
    Unmapped gaps read as zeros.
    """
    if not layers:
        return empty_columns()
    tagged = [
        (off, length, moff, zero, array("B", bytes([position]) * len(off)))
        for position, (off, length, moff, zero, _tag) in enumerate(layers)
    ]
    result = tagged[-1]
    for lower in reversed(tagged[:-1]):
        result = _overlay(result, lower)
    out = empty_columns()
    for i in range(len(result[0])):
        if result[3][i]:
            continue
        for column, source in zip(out, result, strict=True):
            column.append(source[i])
    return out


def _overlay(top: Columns, bottom: Columns) -> Columns:
    """Merge two sorted, non-overlapping tables: ``top`` records win, ``bottom`` fills gaps.

    Bottom records are trimmed at the edges of top records; a front trim advances moffset
    unless the record is zeroed. Zeroed records are kept (they hide what lies below).
    """
    t_off, t_len, t_moff, t_zero, t_tag = top
    b_off, b_len, b_moff, b_zero, b_tag = bottom
    out = empty_columns()
    o_off, o_len, o_moff, o_zero, o_tag = out

    def emit_bottom(j: int, start: int, end: int) -> None:
        delta = start - b_off[j]
        o_off.append(start)
        o_len.append(end - start)
        o_moff.append(b_moff[j] if b_zero[j] else b_moff[j] + delta)
        o_zero.append(b_zero[j])
        o_tag.append(b_tag[j])

    i = j = 0
    nt, nb = len(t_off), len(b_off)
    # cursor: everything below it has been emitted (in sectors).
    cursor = 0
    while i < nt or j < nb:
        next_top = t_off[i] if i < nt else None
        if j < nb:
            b_start = max(b_off[j], cursor)
            b_end = b_off[j] + b_len[j]
            if b_start >= b_end:
                j += 1
                continue
            if next_top is None or b_start < next_top:
                end = b_end if next_top is None else min(b_end, next_top)
                emit_bottom(j, b_start, end)
                cursor = end
                if end == b_end:
                    j += 1
                continue
        # the top record comes next
        o_off.append(t_off[i])
        o_len.append(t_len[i])
        o_moff.append(t_moff[i])
        o_zero.append(t_zero[i])
        o_tag.append(t_tag[i])
        cursor = t_off[i] + t_len[i]
        i += 1
    return out


def lookup(
    offsets: array,
    lengths: array,
    moffsets: array,
    tags: array,
    offset: int,
    length: int,
) -> list[tuple[int, int, int]]:
    """Map the byte range [offset, offset+length) of a merged table to pieces.

    The table holds data records only (zeroed records dropped). Each piece is
    ``(tag, byte offset in that layer, byte length)``; ``tag == -1`` reads as zeros.
    Pieces are in device order and cover the range exactly.
    """
    pieces: list[tuple[int, int, int]] = []
    pos, end = offset, offset + length
    # first record whose end (in bytes) is beyond pos
    i = bisect_right(offsets, pos >> 9) - 1
    if i < 0 or (offsets[i] + lengths[i]) << 9 <= pos:
        i += 1
    n = len(offsets)
    while pos < end:
        if i >= n:
            pieces.append((-1, 0, end - pos))
            break
        rec_start = offsets[i] << 9
        rec_end = (offsets[i] + lengths[i]) << 9
        if rec_start > pos:
            gap = min(rec_start, end) - pos
            pieces.append((-1, 0, gap))
            pos += gap
            continue
        take = min(rec_end, end) - pos
        pieces.append((tags[i], (moffsets[i] << 9) + (pos - rec_start), take))
        pos += take
        i += 1
    return pieces


def zfile_decode(
    buf: bytes | bytearray | memoryview,
    stored_lengths: Sequence[int],
    algorithm: int,
    verify: bool,
    chunk_size: int,
    last_length: int,
) -> bytes:
    """Check and decompress consecutive ZFile chunks packed in ``buf``.

    ``stored_lengths[i]`` is chunk i's jump-table length (payload + 4-byte CRC when
    ``verify``); every chunk decompresses to ``chunk_size`` bytes except the last one, which
    decompresses to ``last_length``. Raises ``ValueError((index, reason))`` naming the
    failed chunk (reason 'crc' or 'decompress'); the caller turns it into a FormatError.
    """
    out = bytearray()
    view = memoryview(buf)
    zstd = _zstd_decompressor() if algorithm == 2 else None
    pos = 0
    count = len(stored_lengths)
    for index, stored in enumerate(stored_lengths):
        expected = last_length if index == count - 1 else chunk_size
        if verify:
            payload = view[pos : pos + stored - 4]
            (want,) = struct.unpack_from("<I", view, pos + stored - 4)
            if crc32c(payload, 100007) != want:
                raise ValueError((index, "crc"))
        else:
            payload = view[pos : pos + stored]
        pos += stored
        try:
            if algorithm == 1:
                data = lz4.block.decompress(payload, uncompressed_size=expected)
            else:
                data = zstd.decompress(payload, max_output_size=expected)
        except Exception:
            raise ValueError((index, "decompress")) from None
        if len(data) != expected:
            raise ValueError((index, "decompress"))
        out += data
    return bytes(out)


def zfile_encode(
    data: bytes | bytearray | memoryview, algorithm: int, verify: bool, chunk_size: int,
    level: int = 0,
) -> tuple[bytes, array]:
    """Compress ``data`` in ``chunk_size`` pieces (the last may be short) as ZFile stores them.

    LZ4 chunks are raw blocks (``LZ4_compress_default``; LZ4 HC at ``level`` 1-12), ZSTD
    chunks whole frames at level 3 (or ``level`` 1-22); with ``verify`` each payload is
    followed by its salted CRC32C. Returns the stored bytes and the jump-table lengths
    (payload + CRC) of each chunk.
    """
    if not isinstance(level, int):
        raise TypeError(f"level must be an int, not {type(level).__name__}")
    out = bytearray()
    lengths = array("I")
    view = memoryview(data)
    starts = range(0, len(view), chunk_size)  # a step of 0: range()'s own ValueError
    if starts and algorithm in (1, 2) and not 0 <= level <= (12 if algorithm == 1 else 22):
        name, top = ("lz4", 12) if algorithm == 1 else ("zstd", 22)
        raise ValueError(f"{name} compression level must be 0-{top}, not {level}")
    zstd = _zstd_compressor(level or 3) if algorithm == 2 and starts else None
    for pos in starts:
        chunk = view[pos : pos + chunk_size]
        if algorithm == 1 and level:
            payload = lz4.block.compress(chunk, mode="high_compression", compression=level,
                                         store_size=False)
        elif algorithm == 1:
            payload = lz4.block.compress(chunk, mode="default", store_size=False)
        else:
            payload = zstd.compress(chunk)
        out += payload
        stored = len(payload)
        if verify:
            out += struct.pack("<I", crc32c(payload, 100007))
            stored += 4
        lengths.append(stored)
    return bytes(out), lengths

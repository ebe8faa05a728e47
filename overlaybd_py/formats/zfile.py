"""ZFile: fixed-size compressed chunks behind a 512-byte header, a u32 jump table and a trailer.

Pure codec (spec section 2). The reader needs three byte ranges of a blob: the 512-byte
header, then (unless the header carries the trailer's fields, HEADER_OVERWRITE) the
512-byte trailer, then the jump table; ``ZFileIndex`` is built from those and answers
"which compressed bytes hold this uncompressed range". Chunks are checked (salted CRC32C)
and decompressed by ``decode_chunks``. ``ZFileBuilder`` produces the bytes of a new ZFile
incrementally, exactly as the original's builder lays them out.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass, replace
from itertools import accumulate

from .. import _accel
from ..errors import CorruptLayerError, UnsupportedFormatError

__all__ = [
    "ALGORITHMS",
    "CHUNK_CRC_SEED",
    "SLOT",
    "ZFileBuilder",
    "ZFileHeader",
    "ZFileIndex",
    "decode_chunks",
    "is_zfile",
]

SLOT = 512
STRUCT_SIZE = 96
MAGIC0 = b"ZFile\x00\x01\x00"
MAGIC1 = bytes.fromhex("74756a692e797966 40416c6962616261")
CHUNK_CRC_SEED = 100007
MAX_INDEX_SIZE = 1_000_000_000
CHUNK_SIZES = (4096, 8192, 16384, 32768, 65536)

FLAG_HEADER = 1 << 0
FLAG_DATA = 1 << 1
FLAG_SEALED = 1 << 2
FLAG_OVERWRITE = 1 << 3
FLAG_DIGEST = 1 << 4
FLAG_IDX_COMP = 1 << 5

ALGO_LZ4 = 1
ALGO_ZSTD = 2
ALGORITHMS = {"lz4": ALGO_LZ4, "zstd": ALGO_ZSTD}
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
# Compression levels a writer may ask for; 0 is the original's (LZ4_compress_default, zstd
# level 3). LZ4 levels select LZ4 HC, which writes the same block format.
MAX_LEVEL = {ALGO_LZ4: 12, ALGO_ZSTD: 22}


def check_level(algorithm: str, level: int) -> None:
    """ValueError unless ``level`` suits ``algorithm`` ("lz4" or "zstd")."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown compression algorithm {algorithm!r} (lz4 or zstd)")
    if not isinstance(level, int) or isinstance(level, bool):
        raise ValueError(f"compression level must be an integer, not {level!r}")
    top = MAX_LEVEL[ALGORITHMS[algorithm]]
    if not 0 <= level <= top:
        raise ValueError(f"{algorithm} compression level must be 0-{top} (0: the default), "
                         f"not {level}")

# magic0 magic1 size digest flags index_offset index_size original_size index_crc reserved
# block_size algo level use_dict pad reserved dict_size verify pad[7]
_HT = struct.Struct("<8s16sIIQQQQIIIBBBBIIB7x")
assert _HT.size == STRUCT_SIZE


@dataclass(frozen=True, slots=True)
class ZFileHeader:
    """A ZFile header or trailer slot. Only the low flag bits are meaningful (old files
    from 2021 carry uninitialised memory in the upper bits and in reserved fields)."""

    flags: int
    index_offset: int = 0
    index_size: int = 0
    original_size: int = 0
    index_crc: int = 0
    block_size: int = 4096
    algorithm: int = ALGO_LZ4
    level: int = 0
    use_dict: int = 0
    dict_size: int = 0
    verify: bool = True
    digest: int = 0

    def flag(self, bit: int) -> bool:
        return bool(self.flags & bit)

    @property
    def is_header(self) -> bool:
        return self.flag(FLAG_HEADER)

    @property
    def algorithm_name(self) -> str:
        return ALGORITHM_NAMES.get(self.algorithm, f"unknown({self.algorithm})")

    @classmethod
    def unpack(cls, buf: bytes | memoryview, base: int = 0) -> ZFileHeader:
        """Parse and check one 512-byte slot (magic, struct size, digest when enabled)."""
        if len(buf) < SLOT:
            raise CorruptLayerError(
                "zfile header: truncated", field="header", offset=base, expected=SLOT,
                actual=len(buf),
            )
        (magic0, magic1, size, digest, flags, index_offset, index_size, original_size,
         index_crc, _reserved, block_size, algorithm, level, use_dict, _pad, _reserved2,
         dict_size, verify) = _HT.unpack_from(buf, 0)
        if magic0 != MAGIC0:
            raise CorruptLayerError(
                "zfile header: bad magic0", field="magic0", offset=base, expected=MAGIC0,
                actual=magic0,
            )
        if magic1 != MAGIC1:
            raise CorruptLayerError(
                "zfile header: bad magic1", field="magic1", offset=base + 8, expected=MAGIC1,
                actual=magic1,
            )
        if size != STRUCT_SIZE:
            raise CorruptLayerError(
                "zfile header: bad struct size", field="size", offset=base + 24,
                expected=STRUCT_SIZE, actual=size,
            )
        if flags & FLAG_DIGEST:
            slot = bytearray(buf[:SLOT])
            slot[28:32] = b"\0\0\0\0"
            computed = _accel.crc32c(slot, 0)
            if computed != digest:
                raise CorruptLayerError(
                    "zfile header: digest mismatch", field="digest", offset=base + 28,
                    expected=computed, actual=digest,
                )
        return cls(
            flags=flags, index_offset=index_offset, index_size=index_size,
            original_size=original_size, index_crc=index_crc, block_size=block_size,
            algorithm=algorithm, level=level, use_dict=use_dict, dict_size=dict_size,
            verify=bool(verify), digest=digest,
        )

    def pack(self) -> bytes:
        """The 512-byte slot, with the digest computed when FLAG_DIGEST is set."""
        slot = bytearray(SLOT)
        _HT.pack_into(
            slot, 0, MAGIC0, MAGIC1, STRUCT_SIZE, 0, self.flags, self.index_offset,
            self.index_size, self.original_size, self.index_crc, 0, self.block_size,
            self.algorithm, self.level, self.use_dict, 0, 0, self.dict_size, int(self.verify),
        )
        if self.flags & FLAG_DIGEST:
            struct.pack_into("<I", slot, 28, _accel.crc32c(slot, 0))
        return bytes(slot)


def is_zfile(buf: bytes | memoryview) -> bool:
    """True when ``buf`` starts with the ZFile magic."""
    return bytes(buf[:24]) == MAGIC0 + MAGIC1


def _check_options(ht: ZFileHeader, base: int) -> None:
    if ht.flags & FLAG_IDX_COMP and not ht.flags >> 6:
        raise UnsupportedFormatError(
            "zfile: compressed jump table (IDX_COMP flag) is not supported", field="flags",
            offset=base + 32, actual=ht.flags,
        )
    if ht.algorithm not in ALGORITHM_NAMES:
        raise UnsupportedFormatError(
            "zfile: unsupported compression algorithm", field="algo", offset=base + 76,
            expected="1 (lz4) or 2 (zstd)", actual=ht.algorithm,
        )
    if ht.block_size not in CHUNK_SIZES:
        raise CorruptLayerError(
            "zfile: block_size must be 4, 8, 16, 32 or 64 KiB", field="block_size",
            offset=base + 72, actual=ht.block_size,
        )
    if ht.use_dict or ht.dict_size:
        raise UnsupportedFormatError(
            "zfile: compression dictionaries are not supported", field="dict_size",
            offset=base + 84, actual=ht.dict_size,
        )
    if ht.index_size > MAX_INDEX_SIZE:
        raise CorruptLayerError(
            "zfile: index_size exceeds the maximum", field="index_size", offset=base + 48,
            expected=f"<= {MAX_INDEX_SIZE}", actual=ht.index_size,
        )
    chunks = -(-ht.original_size // ht.block_size)
    if chunks != ht.index_size:
        raise CorruptLayerError(
            "zfile: index_size does not match original_size / block_size", field="index_size",
            offset=base + 48, expected=chunks, actual=ht.index_size,
        )
    if ht.index_offset < SLOT:
        raise CorruptLayerError(
            "zfile: index_offset inside the header", field="index_offset", offset=base + 40,
            expected=f">= {SLOT}", actual=ht.index_offset,
        )


def parse_header(buf: bytes | memoryview) -> ZFileHeader:
    """Parse the slot at offset 0; it must be a header of a data file."""
    ht = ZFileHeader.unpack(buf, 0)
    if not ht.is_header or not ht.flag(FLAG_DATA):
        raise CorruptLayerError(
            "zfile header: flags must say header and data file", field="flags", offset=32,
            expected=FLAG_HEADER | FLAG_DATA, actual=ht.flags,
        )
    return ht


def index_header(header: ZFileHeader, trailer_buf: bytes | memoryview | None,
                 file_size: int | None) -> ZFileHeader:
    """The slot that describes the jump table: the header itself when it carries
    HEADER_OVERWRITE, else the trailer at ``file_size - 512`` (checked here)."""
    if header.flag(FLAG_OVERWRITE):
        _check_options(header, 0)
        if file_size is not None and header.index_offset + 4 * header.index_size > file_size:
            raise CorruptLayerError(
                "zfile header: jump table runs beyond the end of the blob", field="index_offset",
                offset=40, expected=f"<= {file_size}",
                actual=header.index_offset + 4 * header.index_size,
            )
        return header
    if trailer_buf is None or file_size is None:
        raise ValueError("this zfile has no header overwrite: the trailer is needed")
    base = file_size - SLOT
    if base < SLOT:
        raise CorruptLayerError(
            "zfile: blob too small for header and trailer", field="size", offset=0,
            expected=f">= {2 * SLOT}", actual=file_size,
        )
    trailer = ZFileHeader.unpack(trailer_buf, base)
    if trailer.is_header or not trailer.flag(FLAG_DATA) or not trailer.flag(FLAG_SEALED):
        raise CorruptLayerError(
            "zfile trailer: flags must say trailer, data file, sealed", field="flags",
            offset=base + 32, expected=FLAG_DATA | FLAG_SEALED, actual=trailer.flags,
        )
    _check_options(trailer, base)
    if 4 * trailer.index_size > base - trailer.index_offset:
        raise CorruptLayerError(
            "zfile trailer: jump table runs into the trailer", field="index_size",
            offset=base + 48, expected=f"<= {(base - trailer.index_offset) // 4}",
            actual=trailer.index_size,
        )
    return trailer


class ZFileIndex:
    """The decoded jump table of one ZFile: where every compressed chunk lives.

    ``starts`` has ``chunks + 1`` entries: chunk i occupies bytes
    ``[starts[i], starts[i+1])`` of the blob (payload plus 4-byte CRC when ``verify``).
    """

    __slots__ = ("chunk_size", "header", "last_length", "lengths", "starts")

    def __init__(self, header: ZFileHeader, starts: array, lengths: array) -> None:
        self.header = header
        self.starts = starts
        self.lengths = lengths
        self.chunk_size = header.block_size
        count = header.index_size
        self.last_length = header.original_size - (count - 1) * header.block_size if count else 0

    @classmethod
    def parse(cls, ht: ZFileHeader, table: bytes | memoryview) -> ZFileIndex:
        """Build the index from the checked slot ``ht`` and the raw u32 jump table bytes."""
        if len(table) != 4 * ht.index_size:
            raise CorruptLayerError(
                "zfile jump table: wrong length", field="jump table", offset=ht.index_offset,
                expected=4 * ht.index_size, actual=len(table),
            )
        if ht.flag(FLAG_DIGEST):
            crc = _accel.crc32c(table, 0)
            if crc != ht.index_crc:
                raise CorruptLayerError(
                    "zfile jump table: checksum mismatch", field="index_crc",
                    offset=ht.index_offset, expected=ht.index_crc, actual=crc,
                )
        lengths = array("I")
        lengths.frombytes(bytes(table))
        minimum = 5 if ht.verify else 1
        if lengths and min(lengths) < minimum:
            i = next(i for i, n in enumerate(lengths) if n < minimum)
            raise CorruptLayerError(
                f"zfile jump table: chunk {i} has an impossible stored length",
                field="jump table", offset=ht.index_offset + 4 * i,
                expected=f">= {minimum}", actual=lengths[i],
            )
        starts = array("Q", accumulate(lengths, initial=SLOT + ht.dict_size))
        if starts[-1] != ht.index_offset:
            raise CorruptLayerError(
                "zfile jump table: chunk lengths do not add up to index_offset",
                field="jump table", offset=ht.index_offset, expected=ht.index_offset,
                actual=starts[-1],
            )
        return cls(ht, starts, lengths)

    @property
    def chunks(self) -> int:
        return len(self.starts) - 1

    @property
    def original_size(self) -> int:
        return self.header.original_size

    def chunk_length(self, i: int) -> int:
        """Uncompressed length of chunk i."""
        return self.last_length if i == self.chunks - 1 else self.chunk_size

    def chunk_range(self, offset: int, length: int) -> tuple[int, int]:
        """Chunks ``[first, last]`` holding the uncompressed range (clamped to the file)."""
        end = min(offset + length, self.original_size)
        offset = min(offset, self.original_size)
        if end <= offset:
            return (0, -1)
        return offset // self.chunk_size, (end - 1) // self.chunk_size

    def compressed_span(self, first: int, last: int) -> tuple[int, int]:
        """Blob byte range ``(offset, length)`` holding chunks ``first..last``."""
        return self.starts[first], self.starts[last + 1] - self.starts[first]

    def compressed_range(self, offset: int, length: int) -> tuple[int, int]:
        """The blob byte range ``(offset, length)`` to fetch to read the uncompressed range."""
        first, last = self.chunk_range(offset, length)
        if last < first:
            return (self.starts[0], 0)
        return self.compressed_span(first, last)

    def stored_lengths(self, first: int, last: int) -> array:
        """Jump-table lengths of chunks first..last."""
        return self.lengths[first : last + 1]


def decode_chunks(index: ZFileIndex, first: int, buf: bytes | memoryview, count: int) -> bytes:
    """Check and decompress ``count`` consecutive chunks starting at ``first``.

    ``buf`` holds exactly their stored bytes. Returns the concatenated plaintext.
    Raises CorruptLayerError naming the chunk and its blob offset on a CRC or
    decompression failure.
    """
    last = first + count - 1
    offset, length = index.compressed_span(first, last)
    if len(buf) != length:
        raise CorruptLayerError(
            f"zfile chunks {first}..{last}: wrong number of bytes", field="chunk",
            offset=offset, expected=length, actual=len(buf),
        )
    last_length = index.chunk_length(last)
    try:
        return _accel.zfile_decode(
            buf, index.stored_lengths(first, last), index.header.algorithm,
            index.header.verify, index.chunk_size, last_length,
        )
    except ValueError as exc:
        bad, reason = exc.args[0]
        chunk = first + bad
        what = "checksum mismatch" if reason == "crc" else "does not decompress"
        raise CorruptLayerError(
            f"zfile chunk {chunk}: {what}", field="chunk", offset=index.starts[chunk],
        ) from None


class ZFileBuilder:
    """Produce a ZFile incrementally: ``head()``, ``add(data)``..., ``finish()``.

    Every call returns the bytes to append to the output. After ``finish()``,
    ``overwrite_header()`` returns the slot to write at offset 0 for the
    header-overwrite variant (what ``overlaybd-commit -z`` does); without it the file is
    the trailer-only variant (what ``overlaybd-zfile`` does).
    """

    def __init__(self, algorithm: int = ALGO_LZ4, chunk_size: int = 4096, verify: bool = True,
                 level: int = 0):
        if algorithm not in ALGORITHM_NAMES:
            raise ValueError(f"unknown zfile algorithm {algorithm}")
        if chunk_size not in CHUNK_SIZES:
            raise ValueError(f"chunk size {chunk_size} is not 4, 8, 16, 32 or 64 KiB")
        check_level(ALGORITHM_NAMES[algorithm], level)
        self._base = ZFileHeader(
            flags=FLAG_HEADER | FLAG_DATA | FLAG_DIGEST, block_size=chunk_size,
            algorithm=algorithm, level=level, verify=verify,
        )
        self._pending = bytearray()
        self._lengths = array("I")
        self._written = SLOT
        self._original = 0
        self._final: ZFileHeader | None = None

    def head(self) -> bytes:
        return self._base.pack()

    def _encode(self, data: bytes | memoryview) -> bytes:
        out, lengths = _accel.zfile_encode(
            data, self._base.algorithm, self._base.verify, self._base.block_size,
            self._base.level,
        )
        self._lengths.extend(lengths)
        self._written += len(out)
        return out

    def add(self, data: bytes | memoryview) -> bytes:
        """Feed uncompressed bytes; returns the compressed chunks completed so far."""
        if self._final is not None:
            raise ValueError("ZFileBuilder.add after finish")
        self._original += len(data)
        self._pending += data
        whole = len(self._pending) - len(self._pending) % self._base.block_size
        if not whole:
            return b""
        out = self._encode(memoryview(self._pending)[:whole])
        del self._pending[:whole]
        return out

    def finish(self) -> bytes:
        """Flush the last (short) chunk; return it plus the jump table and the trailer."""
        tail = self._encode(bytes(self._pending)) if self._pending else b""
        self._pending.clear()
        table = self._lengths.tobytes()
        self._final = replace(
            self._base, flags=FLAG_DATA | FLAG_SEALED | FLAG_DIGEST,
            index_offset=self._written, index_size=len(self._lengths),
            original_size=self._original, index_crc=_accel.crc32c(table, 0),
        )
        return tail + table + self._final.pack()

    def overwrite_header(self) -> bytes:
        if self._final is None:
            raise ValueError("overwrite_header before finish")
        flags = FLAG_HEADER | FLAG_DATA | FLAG_OVERWRITE | FLAG_DIGEST
        return replace(self._final, flags=flags).pack()


"""LSMT layer files: the 4096-byte header/trailer slot and the 16-byte segment mapping records.

Pure codec (spec section 1): bytes in, values out. Offsets and lengths inside records are in
512-byte sectors; ``index_offset`` and ``virtual_size`` in the header are bytes.
Nothing here reads files: callers hand in the bytes of a header, trailer or index.
"""

from __future__ import annotations

import re
import struct
from array import array
from dataclasses import dataclass, field

from .. import _accel
from ..errors import CorruptLayerError, FormatError, UnsupportedFormatError

__all__ = [
    "FLAG_DATA",
    "FLAG_HEADER",
    "FLAG_SEALED",
    "FLAG_SPARSE_RW",
    "HT_SPACE",
    "INVALID_OFFSET",
    "MAX_LENGTH",
    "MAX_RO_INDEX_SIZE",
    "NULL_UUID",
    "SECTOR",
    "LsmtHeader",
    "Segments",
    "is_lsmt",
    "parse_sealed_index",
    "parse_writable_log",
]

SECTOR = 512
HT_SPACE = 4096
MAGIC0 = b"LSMT\x00\x01\x02\x00"
MAGIC1 = bytes.fromhex("657e63d29444084ca2d2c8ec4fcfae8a")
STRUCT_SIZE = 390
NULL_UUID = "00000000-0000-0000-0000-000000000000"
MAX_LENGTH = 16383  # 14-bit record length, in sectors
MAX_OFFSET = (1 << 50) - 1
MAX_MOFFSET = (1 << 55) - 1
INVALID_OFFSET = _accel.INVALID_OFFSET
MAX_RO_INDEX_SIZE = 1_000_000
MAX_RW_INDEX_SIZE = 128_000_000
USER_TAG_SIZE = 256

FLAG_HEADER = 1 << 0
FLAG_DATA = 1 << 1
FLAG_SEALED = 1 << 2
FLAG_SPARSE_RW = 1 << 4

_HT = struct.Struct("<8s16sIIQQQ37s37sHBB256s")
assert _HT.size == STRUCT_SIZE
_UUID_RE = re.compile(
    r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$"
)


def _uuid_text(raw: bytes, name: str, base: int) -> str:
    text = raw.split(b"\x00", 1)[0]
    try:
        value = text.decode("ascii")
    except UnicodeDecodeError:
        raise CorruptLayerError(
            f"lsmt {name}: not ASCII text", field=name, offset=base, actual=text
        ) from None
    if value and not _UUID_RE.match(value):
        raise CorruptLayerError(
            f"lsmt {name}: not a UUID", field=name, offset=base, expected="8-4-4-4-12 hex",
            actual=value,
        )
    return value


def check_uuid(value: str, name: str = "uuid") -> str:
    """Return ``value`` as overlaybd writes UUIDs (upper case), or raise ValueError."""
    if not _UUID_RE.match(value):
        raise ValueError(f"{name} {value!r} is not a UUID (8-4-4-4-12 hex digits)")
    return value.upper()


@dataclass(frozen=True, slots=True)
class LsmtHeader:
    """One LSMT header or trailer (the same struct, told apart by FLAG_HEADER)."""

    flags: int
    index_offset: int = 0
    index_size: int = 0
    virtual_size: int = 0
    uuid: str = NULL_UUID
    parent_uuid: str = NULL_UUID
    user_tag: bytes = b""
    version: int = 1
    sub_version: int = 1
    reserved: int = 0

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def is_data_file(self) -> bool:
        return bool(self.flags & FLAG_DATA)

    @property
    def is_sealed(self) -> bool:
        return bool(self.flags & FLAG_SEALED)

    @property
    def is_sparse_rw(self) -> bool:
        return bool(self.flags & FLAG_SPARSE_RW)

    @property
    def message(self) -> str:
        """The user tag (commit message) as text."""
        return self.user_tag.decode("utf-8", errors="replace")

    @classmethod
    def unpack(cls, buf: bytes | memoryview, base: int = 0) -> LsmtHeader:
        """Parse a slot; ``base`` is its file offset, used only in error messages."""
        if len(buf) < STRUCT_SIZE:
            raise CorruptLayerError(
                "lsmt header: truncated", field="header", offset=base,
                expected=STRUCT_SIZE, actual=len(buf),
            )
        (magic0, magic1, size, flags, index_offset, index_size, virtual_size, uuid, parent,
         reserved, version, sub_version, user_tag) = _HT.unpack_from(buf, 0)
        if magic0 != MAGIC0:
            raise CorruptLayerError(
                "lsmt header: bad magic0", field="magic0", offset=base, expected=MAGIC0,
                actual=magic0,
            )
        if magic1 != MAGIC1:
            raise CorruptLayerError(
                "lsmt header: bad magic1", field="magic1", offset=base + 8, expected=MAGIC1,
                actual=magic1,
            )
        if size != STRUCT_SIZE:
            raise CorruptLayerError(
                "lsmt header: bad struct size", field="size", offset=base + 24,
                expected=STRUCT_SIZE, actual=size,
            )
        if virtual_size % SECTOR:
            raise CorruptLayerError(
                "lsmt header: virtual_size is not a multiple of 512", field="virtual_size",
                offset=base + 48, actual=virtual_size,
            )
        if index_offset % SECTOR:
            raise CorruptLayerError(
                "lsmt header: index_offset is not a multiple of 512", field="index_offset",
                offset=base + 32, actual=index_offset,
            )
        return cls(
            flags=flags,
            index_offset=index_offset,
            index_size=index_size,
            virtual_size=virtual_size,
            uuid=_uuid_text(uuid, "uuid", base + 56),
            parent_uuid=_uuid_text(parent, "parent_uuid", base + 93),
            user_tag=user_tag.split(b"\x00", 1)[0],
            version=version,
            sub_version=sub_version,
            reserved=reserved,
        )

    def pack(self) -> bytes:
        """The full 4096-byte slot, zero padded, as the original writes it."""
        if len(self.user_tag) > USER_TAG_SIZE:
            raise ValueError(f"user tag is {len(self.user_tag)} bytes, at most 256 allowed")
        slot = bytearray(HT_SPACE)
        _HT.pack_into(
            slot, 0, MAGIC0, MAGIC1, STRUCT_SIZE, self.flags, self.index_offset,
            self.index_size, self.virtual_size, (self.uuid or NULL_UUID).encode(),
            (self.parent_uuid or NULL_UUID).encode(), self.reserved, self.version,
            self.sub_version, self.user_tag,
        )
        return bytes(slot)


def is_lsmt(buf: bytes | memoryview) -> bool:
    """True when ``buf`` starts with the LSMT magic."""
    return bytes(buf[:24]) == MAGIC0 + MAGIC1


@dataclass(slots=True)
class Segments:
    """A table of segment mappings as five flat columns (sectors), not Python objects.

    ``offset`` (virtual sector), ``length`` (sectors), ``moffset`` (sector in the layer
    file), ``zeroed`` (0/1), ``tag`` (layer number in merged tables, else 0).
    """

    offset: array = field(default_factory=lambda: array("Q"))
    length: array = field(default_factory=lambda: array("I"))
    moffset: array = field(default_factory=lambda: array("Q"))
    zeroed: array = field(default_factory=lambda: array("B"))
    tag: array = field(default_factory=lambda: array("B"))

    @classmethod
    def from_columns(cls, columns: tuple[array, array, array, array, array]) -> Segments:
        return cls(*columns)

    def columns(self) -> tuple[array, array, array, array, array]:
        return self.offset, self.length, self.moffset, self.zeroed, self.tag

    def __len__(self) -> int:
        return len(self.offset)

    def append(self, offset: int, length: int, moffset: int, zeroed: int = 0, tag: int = 0):
        self.offset.append(offset)
        self.length.append(length)
        self.moffset.append(moffset)
        self.zeroed.append(zeroed)
        self.tag.append(tag)

    def record(self, i: int) -> tuple[int, int, int, int, int]:
        return self.offset[i], self.length[i], self.moffset[i], self.zeroed[i], self.tag[i]

    def records(self):
        """Iterate ``(offset, length, moffset, zeroed, tag)`` tuples (for tests and tools)."""
        return zip(self.offset, self.length, self.moffset, self.zeroed, self.tag, strict=True)

    def with_tag(self, tag: int) -> Segments:
        """A copy whose every record carries ``tag``."""
        return Segments(
            array("Q", self.offset), array("I", self.length), array("Q", self.moffset),
            array("B", self.zeroed), array("B", bytes([tag]) * len(self.offset)),
        )

    def encode(self) -> bytes:
        return _accel.encode_segments(*self.columns())

    def data_sectors(self) -> int:
        """Sectors of stored data (zeroed records excluded)."""
        return sum(n for n, z in zip(self.length, self.zeroed, strict=True) if not z)


def _record_error(message: str, index_base: int, i: int, segments: Segments, **kw) -> FormatError:
    off, length, moff, zeroed, tag = segments.record(i)
    return CorruptLayerError(
        f"lsmt index record #{i} (offset {off}, length {length}, moffset {moff}, "
        f"zeroed {zeroed}, tag {tag}): {message}",
        field="index", offset=index_base, **kw,
    )


def check_trailer(trailer: LsmtHeader, file_size: int) -> None:
    """Check a sealed layer's trailer against the file size, as the original's loader does."""
    base = file_size - HT_SPACE
    if trailer.is_header or not trailer.is_data_file or not trailer.is_sealed:
        raise CorruptLayerError(
            "lsmt trailer: flags must say trailer, data file, sealed", field="flags",
            offset=base + 28, expected=FLAG_DATA | FLAG_SEALED, actual=trailer.flags,
        )
    if trailer.index_size > MAX_RO_INDEX_SIZE:
        raise CorruptLayerError(
            "lsmt trailer: index_size exceeds the limit of a sealed layer", field="index_size",
            offset=base + 40, expected=f"<= {MAX_RO_INDEX_SIZE}", actual=trailer.index_size,
        )
    if trailer.index_offset < HT_SPACE or trailer.index_offset > base:
        raise CorruptLayerError(
            "lsmt trailer: index_offset outside the data area", field="index_offset",
            offset=base + 32, expected=f"in [{HT_SPACE}, {base}]", actual=trailer.index_offset,
        )
    if trailer.index_size * 16 > base - trailer.index_offset:
        raise CorruptLayerError(
            "lsmt trailer: index runs into the trailer", field="index_size", offset=base + 40,
            expected=f"<= {(base - trailer.index_offset) // 16}", actual=trailer.index_size,
        )


def parse_sealed_index(buf: bytes | memoryview, trailer: LsmtHeader) -> Segments:
    """Decode and validate the index of a sealed layer (``buf`` = the index bytes).

    Records must be sorted and non-overlapping, and map inside the data area
    ``[4096, index_offset)``. Any record with a non-zero tag marks a turboOCI layer, whose
    data partly lives in another blob: refused, never misread.
    """
    if len(buf) != trailer.index_size * 16:
        raise CorruptLayerError(
            "lsmt index: wrong length", field="index", offset=trailer.index_offset,
            expected=trailer.index_size * 16, actual=len(buf),
        )
    segments = Segments.from_columns(_accel.decode_segments(buf))
    base = trailer.index_offset
    if any(segments.tag):
        i = next(i for i, t in enumerate(segments.tag) if t)
        raise UnsupportedFormatError(
            f"lsmt index record #{i} has tag {segments.tag[i]}: this is a turboOCI layer "
            "(file data lives in the original OCI tar), which overlaybd-py does not read",
            field="tag", offset=base,
        )
    bad = _accel.first_unsorted(segments.offset, segments.length)
    if bad >= 0:
        raise _record_error("overlaps or precedes the previous record", base, bad, segments)
    bad = _accel.first_out_of_bounds(
        segments.moffset, segments.length, segments.zeroed, HT_SPACE // SECTOR,
        trailer.index_offset // SECTOR,
    )
    if bad >= 0:
        raise _record_error(
            "maps outside the data area", base, bad, segments,
            expected=f"sectors [{HT_SPACE // SECTOR}, {trailer.index_offset // SECTOR}]",
        )
    if trailer.virtual_size and len(segments):
        last = len(segments) - 1
        if segments.offset[last] + segments.length[last] > trailer.virtual_size // SECTOR:
            raise _record_error(
                "ends beyond the virtual size", base, last, segments,
                expected=f"end <= {trailer.virtual_size // SECTOR} sectors",
            )
    return segments


def parse_writable_log(buf: bytes | memoryview, data_size: int) -> Segments:
    """Decode the record log of a writable index file (the bytes after its 4096-byte header).

    The log is in write order; later records win. Tags are ignored (set to 0). A trailing
    partial record (a torn append) is an error, as is a record mapping beyond the data file.
    """
    if len(buf) % 16:
        raise CorruptLayerError(
            "lsmt writable index: log length is not a multiple of 16 (torn write?)",
            field="index", offset=HT_SPACE, actual=len(buf),
        )
    if len(buf) // 16 > MAX_RW_INDEX_SIZE:
        raise CorruptLayerError(
            "lsmt writable index: too many records", field="index_size", offset=HT_SPACE,
            expected=f"<= {MAX_RW_INDEX_SIZE}", actual=len(buf) // 16,
        )
    segments = Segments.from_columns(_accel.decode_segments(buf))
    segments.tag = array("B", bytes(len(segments)))
    bad = _accel.first_out_of_bounds(
        segments.moffset, segments.length, segments.zeroed, HT_SPACE // SECTOR,
        data_size // SECTOR,
    )
    if bad >= 0:
        raise _record_error(
            "maps outside the data file", HT_SPACE, bad, segments,
            expected=f"sectors [{HT_SPACE // SECTOR}, {data_size // SECTOR}]",
        )
    return segments

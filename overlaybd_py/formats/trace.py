"""Access traces: the original overlaybd trace file, its text priority list, our JSONL event
log, and the acceleration-layer tar that carries a trace in an image. Pure codec.

Trace file (spec section 4, the original's native structs, little-endian)::

    header  24 bytes: u32 magic 0xC2EF1820 | 4 pad | u64 data_size | u32 checksum | 4 pad
    record  24 bytes: u8 op 'R'/'W' | 3 pad | u32 layer_index | u64 count | i64 offset

``data_size`` = 24 * number of records; ``checksum`` is the raw CRC32C (spec 2.5) chained
over the record bytes as stored (padding included: the C++ writes its structs from memory,
so a reader must not assume the padding is zero). ``layer_index`` is the position in the
image's lowers (0 = bottom) and ``offset``/``count`` are bytes of that layer's uncompressed
LSMT file. A non-empty file without the magic is a *priority list*: absolute paths, one per
line, at most 64 KiB. An empty file means "record" to the original.

The JSONL log (``FILE.jsonl``, our own) holds one JSON object per line: a ``header`` (layers,
device size, clock origin), then ``read`` events (one per read of the device) and ``fetch``
events (one per range request to the registry), then an ``end`` record. Times are seconds
from the recorder's start. Nothing here does I/O.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Self

from .. import _accel
from ..errors import FormatError

__all__ = [
    "ACCELERATION_MEMBER",
    "JSONL_VERSION",
    "MAGIC",
    "MAX_PRIORITY_LIST",
    "EndEvent",
    "Event",
    "FetchEvent",
    "LayerInfo",
    "PriorityList",
    "ReadEvent",
    "ReadPiece",
    "TraceFile",
    "TraceHeader",
    "TraceLog",
    "TraceLogHeader",
    "TraceRecord",
    "acceleration_layer_tar",
    "decode_events",
    "decode_prefetch_input",
    "decode_priority_list",
    "decode_trace",
    "encode_event",
    "encode_priority_list",
    "encode_trace",
    "is_trace",
    "trace_from_acceleration_layer",
]

MAGIC = 0xC2EF1820  # CRC32 of "Container Image Trace Format", as the original defines it
HEADER = struct.Struct("<I4xQI4x")
RECORD = struct.Struct("<c3xIQq")
HEADER_SIZE = HEADER.size  # 24
RECORD_SIZE = RECORD.size  # 24
OP_READ = "R"
OP_WRITE = "W"
MAX_PRIORITY_LIST = 64 * 1024  # the original reads at most this much of a list
ACCELERATION_MEMBER = "trace"  # the one member of an acceleration layer's tar
JSONL_VERSION = 1
_U32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class TraceHeader:
    data_size: int  # bytes of records that follow
    checksum: int  # raw CRC32C over the record bytes
    magic: int = MAGIC

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> Self:
        if len(buf) < HEADER_SIZE:
            raise FormatError("trace header: truncated", field="header", offset=0,
                              expected=HEADER_SIZE, actual=len(buf))
        magic, data_size, checksum = HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            raise FormatError("trace header: bad magic", field="magic", offset=0,
                              expected=MAGIC, actual=magic)
        return cls(data_size, checksum, magic)

    def pack(self) -> bytes:
        return HEADER.pack(self.magic, self.data_size, self.checksum)


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """One recorded read (or write) of ``count`` bytes at ``offset`` of layer ``layer_index``
    (0 = bottom layer; offsets in the layer's uncompressed LSMT file)."""

    op: str
    layer_index: int
    count: int
    offset: int

    def __post_init__(self) -> None:
        if self.op not in (OP_READ, OP_WRITE):
            raise ValueError(f"trace record op must be 'R' or 'W', not {self.op!r}")
        if not 0 <= self.layer_index <= _U32 or not 0 <= self.count < 1 << 64:
            raise ValueError(f"trace record out of range: {self}")
        if not -(1 << 63) <= self.offset < 1 << 63:
            raise ValueError(f"trace record offset out of range: {self.offset}")

    @classmethod
    def unpack(cls, buf: bytes | memoryview, base: int = 0) -> Self:
        """Parse the 24 bytes at ``buf[0:24]``; ``base`` is their file offset (for errors)."""
        op, layer_index, count, offset = RECORD.unpack_from(buf, 0)
        if op not in (b"R", b"W"):
            raise FormatError("trace record: op is neither 'R' nor 'W'", field="op",
                              offset=base, expected=b"R", actual=op)
        return cls(op.decode(), layer_index, count, offset)

    def pack(self) -> bytes:
        return RECORD.pack(self.op.encode(), self.layer_index, self.count, self.offset)


@dataclass(frozen=True, slots=True)
class TraceFile:
    """A decoded trace: its records in file order."""

    records: tuple[TraceRecord, ...]

    def reads(self) -> Iterator[TraceRecord]:
        return (r for r in self.records if r.op == OP_READ)


@dataclass(frozen=True, slots=True)
class PriorityList:
    """A list of absolute paths in the image to prefetch. A path ending in ``/`` or ``*``
    names a directory whose files are all wanted."""

    paths: tuple[str, ...]


def encode_trace(records: Iterable[TraceRecord]) -> bytes:
    """The bytes of a trace file holding ``records`` (padding written as zeros)."""
    body = b"".join(r.pack() for r in records)
    return TraceHeader(len(body), _accel.crc32c(body, 0)).pack() + body


def is_trace(buf: bytes | memoryview) -> bool:
    """True when ``buf`` starts with the trace magic."""
    return len(buf) >= 4 and struct.unpack_from("<I", buf, 0)[0] == MAGIC


def decode_trace(buf: bytes | memoryview) -> TraceFile:
    """Check and decode a whole trace file, as the original's replay does: magic, file size
    = 24 + data_size, data_size a multiple of 24, checksum. Raises FormatError."""
    header = TraceHeader.unpack(buf)
    if len(buf) != HEADER_SIZE + header.data_size:
        raise FormatError("trace header: data_size does not match the file size",
                          field="data_size", offset=8, expected=len(buf) - HEADER_SIZE,
                          actual=header.data_size)
    if header.data_size % RECORD_SIZE:
        raise FormatError("trace header: data_size is not a multiple of 24",
                          field="data_size", offset=8, actual=header.data_size)
    body = memoryview(buf)[HEADER_SIZE:]
    crc = _accel.crc32c(body, 0)
    if crc != header.checksum:
        raise FormatError("trace: checksum of the records does not match the header",
                          field="checksum", offset=16, expected=header.checksum, actual=crc)
    records = tuple(
        TraceRecord.unpack(body[i : i + RECORD_SIZE], HEADER_SIZE + i)
        for i in range(0, len(body), RECORD_SIZE)
    )
    return TraceFile(records)


def encode_priority_list(paths: Iterable[str]) -> bytes:
    data = "".join(f"{p}\n" for p in paths).encode()
    if len(data) > MAX_PRIORITY_LIST:
        raise ValueError(f"priority list of {len(data)} bytes exceeds {MAX_PRIORITY_LIST}")
    return data


def decode_priority_list(buf: bytes | memoryview) -> PriorityList:
    """Paths of a priority list (blank lines skipped). Raises FormatError when it is too big,
    not UTF-8, or holds a relative path."""
    if len(buf) > MAX_PRIORITY_LIST:
        raise FormatError("priority list: larger than 64 KiB", field="size",
                          expected=MAX_PRIORITY_LIST, actual=len(buf))
    try:
        text = bytes(buf).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError("priority list: not UTF-8 text", field="text",
                          offset=exc.start) from None
    paths = []
    for lineno, line in enumerate(text.splitlines(), 1):
        path = line.strip()
        if not path:
            continue
        if not path.startswith("/") or "\0" in path:
            raise FormatError(f"priority list line {lineno}: not an absolute path",
                              field=f"line {lineno}", actual=path)
        paths.append(path)
    return PriorityList(tuple(paths))


def decode_prefetch_input(buf: bytes | memoryview) -> TraceFile | PriorityList:
    """Decide as the original does (``detect_mode``): the magic makes it a trace, any other
    non-empty content a priority list. Raises FormatError on an empty input (to the original
    an empty file means *record*, never prefetch)."""
    if len(buf) == 0:
        raise FormatError("prefetch input is empty (an empty trace file means 'record')",
                          field="size", actual=0)
    return decode_trace(buf) if is_trace(buf) else decode_priority_list(buf)


# -- the acceleration layer -------------------------------------------------------------------


def acceleration_layer_tar(trace: bytes) -> bytes:
    """A reproducible tar with one member, ``trace`` (mtime 0, mode 0644, root owned)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(ACCELERATION_MEMBER)
        info.size, info.mtime, info.mode = len(trace), 0, 0o644
        tar.addfile(info, io.BytesIO(trace))
    return out.getvalue()


def trace_from_acceleration_layer(blob: bytes) -> bytes:
    """The ``trace`` member of an acceleration layer's tar. Raises FormatError if absent."""
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            for member in tar:
                if member.name.lstrip("./") == ACCELERATION_MEMBER and member.isfile():
                    f = tar.extractfile(member)
                    assert f is not None  # a regular file always has content
                    return f.read()
    except tarfile.TarError as exc:
        raise FormatError(f"acceleration layer: not a tar ({exc})", field="tar") from None
    raise FormatError("acceleration layer: no member named 'trace'", field="tar",
                      expected=ACCELERATION_MEMBER)


# -- the JSONL event log ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LayerInfo:
    index: int  # 0 = bottom, as in the trace file
    digest: str
    blob_size: int  # bytes of the blob as stored in the registry
    lsmt_size: int  # bytes of the uncompressed LSMT file (trace offsets are into this)
    kind: str  # "zfile" or "lsmt"
    chunk_size: int | None  # ZFile chunk size in bytes, None for a plain LSMT


@dataclass(frozen=True, slots=True)
class TraceLogHeader:
    device_size: int
    layers: tuple[LayerInfo, ...]
    started_unix: float  # wall clock at t = 0
    creator: str
    version: int = JSONL_VERSION
    type: Literal["header"] = "header"


@dataclass(frozen=True, slots=True)
class ReadPiece:
    """The part of a device read served by one layer: LSMT offset/length, and the ZFile
    chunks it decoded (None for a plain LSMT layer)."""

    layer: int
    offset: int
    length: int
    first_chunk: int | None = None
    last_chunk: int | None = None


@dataclass(frozen=True, slots=True)
class ReadEvent:
    """One read of the device (one FUSE read, or one read of the recorder's device)."""

    id: int
    t: float  # start, seconds since the recorder started
    dt: float  # duration in seconds
    offset: int  # device bytes
    length: int
    pieces: tuple[ReadPiece, ...] = ()  # layer reads, in completion order (zeros: none)
    fetches: int = 0  # range requests this read issued itself (counted when they start)
    fetched: int = 0  # blob bytes those requests asked for (less any that failed in time)
    ok: bool = True
    type: Literal["read"] = "read"

    @property
    def cache(self) -> str:
        """``fetch`` when the read issued requests, else ``hit`` (it may still have waited for
        a request another read or the prefetcher issued: see ``dt``)."""
        return "fetch" if self.fetches else "hit"


@dataclass(frozen=True, slots=True)
class FetchEvent:
    """One range fetched from a layer blob (through the block cache: a miss being filled).
    The ranges of one multi-range request are one event each, with the request's time and
    duration and ``request`` = the id of its first event (None: a request of its own)."""

    id: int
    t: float
    dt: float
    layer: int
    offset: int  # blob bytes (compressed, tar included)
    length: int
    origin: str  # "read", "readahead", "prefetch" or "other"
    read: int | None = None  # the read event that issued it
    ok: bool = True
    request: int | None = None
    type: Literal["fetch"] = "fetch"


@dataclass(frozen=True, slots=True)
class EndEvent:
    t: float
    dropped: int = 0  # events not kept (the recorder's memory bound)
    type: Literal["end"] = "end"


Event = TraceLogHeader | ReadEvent | FetchEvent | EndEvent


def encode_event(event: Event) -> str:
    """One JSON line (no newline). ``ReadEvent.cache`` is written for readers' convenience."""
    obj = asdict(event)
    if isinstance(event, ReadEvent):
        obj["cache"] = event.cache
    return json.dumps(obj, separators=(",", ":"))


def _int(obj: dict[str, Any], key: str, where: str, *, optional: bool = False) -> Any:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{where}: '{key}' must be an integer", field=key, actual=value)
    return value


def _num(obj: dict[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise FormatError(f"{where}: '{key}' must be a number", field=key, actual=value)
    return float(value)


def _str(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise FormatError(f"{where}: '{key}' must be a string", field=key, actual=value)
    return value


def _parse(obj: Any, where: str) -> Event:
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: not a JSON object", field="line")
    kind = obj.get("type")
    if kind == "read":
        pieces = obj.get("pieces", [])
        if not isinstance(pieces, list) or not all(isinstance(p, dict) for p in pieces):
            raise FormatError(f"{where}: 'pieces' must be a list of objects", field="pieces")
        return ReadEvent(
            _int(obj, "id", where), _num(obj, "t", where), _num(obj, "dt", where),
            _int(obj, "offset", where), _int(obj, "length", where),
            tuple(ReadPiece(_int(p, "layer", where), _int(p, "offset", where),
                            _int(p, "length", where),
                            _int(p, "first_chunk", where, optional=True),
                            _int(p, "last_chunk", where, optional=True)) for p in pieces),
            _int(obj, "fetches", where), _int(obj, "fetched", where), bool(obj.get("ok", True)),
        )
    if kind == "fetch":
        return FetchEvent(
            _int(obj, "id", where), _num(obj, "t", where), _num(obj, "dt", where),
            _int(obj, "layer", where), _int(obj, "offset", where), _int(obj, "length", where),
            _str(obj, "origin", where), _int(obj, "read", where, optional=True),
            bool(obj.get("ok", True)), _int(obj, "request", where, optional=True),
        )
    if kind == "header":
        version = _int(obj, "version", where)
        if version != JSONL_VERSION:
            raise FormatError(f"{where}: unsupported trace log version", field="version",
                              expected=JSONL_VERSION, actual=version)
        layers = obj.get("layers")
        if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
            raise FormatError(f"{where}: 'layers' must be a list of objects", field="layers")
        return TraceLogHeader(
            _int(obj, "device_size", where),
            tuple(LayerInfo(_int(x, "index", where), _str(x, "digest", where),
                            _int(x, "blob_size", where), _int(x, "lsmt_size", where),
                            _str(x, "kind", where),
                            _int(x, "chunk_size", where, optional=True)) for x in layers),
            _num(obj, "started_unix", where), _str(obj, "creator", where), version,
        )
    if kind == "end":
        return EndEvent(_num(obj, "t", where), _int(obj, "dropped", where))
    raise FormatError(f"{where}: unknown event type", field="type", actual=kind)


@dataclass
class TraceLog:
    """A decoded JSONL log."""

    header: TraceLogHeader
    reads: list[ReadEvent] = field(default_factory=list)
    fetches: list[FetchEvent] = field(default_factory=list)
    end: EndEvent | None = None


def decode_events(text: str) -> TraceLog:
    """Parse a JSONL trace log; the first line must be the header. Raises FormatError naming
    the line. A log without its ``end`` record (the recorder was killed) is accepted."""
    log: TraceLog | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"trace log line {lineno}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise FormatError(f"{where}: not JSON ({exc})", field="line") from None
        event = _parse(obj, where)
        if log is None:
            if not isinstance(event, TraceLogHeader):
                raise FormatError(f"{where}: the first record must be the header",
                                  field="type", expected="header", actual=obj.get("type"))
            log = TraceLog(event)
        elif isinstance(event, ReadEvent):
            log.reads.append(event)
        elif isinstance(event, FetchEvent):
            log.fetches.append(event)
        elif isinstance(event, EndEvent):
            log.end = event
        else:
            raise FormatError(f"{where}: a second header", field="type")
    if log is None:
        raise FormatError("trace log: empty (no header)", field="header")
    return log


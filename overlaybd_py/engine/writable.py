"""A writable LSMT layer: a data file (appended sectors) and an index file (a record log).

The on-disk format is the original's (spec section 1.4), so ``overlaybd-commit`` and our
``layer commit`` can seal it. Every write appends its sectors at the end of the data file and
then appends one record per <= 4 MiB piece to the index log; the in-memory
``WritableIndex`` mirrors the log. Data is written before its record, so a crash leaves at
worst unreferenced data; a torn (partial) record at the end of the log is a write that was
never acknowledged and is dropped when the layer is opened again.
"""

from __future__ import annotations

import logging
import os
import struct
import uuid as uuidlib
from dataclasses import dataclass

import trio

from ..errors import CorruptLayerError, DeviceError, FormatError, UnsupportedFormatError
from ..formats import lsmt
from ..formats.lsmt import HT_SPACE, MAX_LENGTH, SECTOR, LsmtHeader
from ..formats.writable_index import WritableIndex
from .source import pread_exact

__all__ = ["WritableLayer"]

log = logging.getLogger(__name__)

MAX_WRITE_SECTORS = 8192  # the original splits writes at 4 MiB
_RECORD = struct.Struct("<QQ")


def _record(offset: int, length: int, moffset: int, zeroed: int) -> bytes:
    return _RECORD.pack(offset | (length << 50), moffset | (zeroed << 55))


@dataclass(frozen=True, slots=True)
class UpperPiece:
    """Part of a read served by the upper layer: ``kind`` is 'data' (at ``moffset`` bytes in
    the data file), 'zero', or 'lower' (not written here: ask the layers below)."""

    kind: str
    offset: int  # device byte offset
    length: int
    moffset: int = 0


class WritableLayer:
    """A writable data/index pair. Offsets and lengths of writes are 512-byte aligned."""

    def __init__(self, data_fd: int, index_fd: int, header: LsmtHeader, index: WritableIndex,
                 data_end: int, paths: tuple[str, str]) -> None:
        self._data_fd = data_fd
        self._index_fd = index_fd
        self._index_end = os.fstat(index_fd).st_size
        self.header = header
        self.index = index
        self._data_end = data_end
        self.paths = paths
        self.virtual_size = header.virtual_size

    @classmethod
    def create(cls, data_path: str, index_path: str, virtual_size: int, *,
               parent_uuid: str = lsmt.NULL_UUID, layer_uuid: str | None = None) -> WritableLayer:
        """Create a new empty pair (both files must not exist), like ``overlaybd-create``."""
        if virtual_size % SECTOR or virtual_size <= 0:
            raise ValueError(f"virtual size {virtual_size} is not a positive multiple of 512")
        layer_uuid = layer_uuid or str(uuidlib.uuid4()).upper()
        common = dict(virtual_size=virtual_size, uuid=layer_uuid, parent_uuid=parent_uuid)
        data_header = LsmtHeader(flags=lsmt.FLAG_HEADER | lsmt.FLAG_DATA, **common)
        index_header = LsmtHeader(flags=lsmt.FLAG_HEADER, index_offset=HT_SPACE, **common)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        data_fd = os.open(data_path, flags, 0o644)
        try:
            index_fd = os.open(index_path, flags, 0o644)
        except OSError:
            os.close(data_fd)
            os.unlink(data_path)
            raise
        os.pwrite(data_fd, data_header.pack(), 0)
        os.pwrite(index_fd, index_header.pack(), 0)
        return cls(data_fd, index_fd, data_header, WritableIndex(), HT_SPACE,
                   (data_path, index_path))

    @classmethod
    def open(cls, data_path: str, index_path: str, *, readonly: bool = False) -> WritableLayer:
        """Open an existing pair and replay its index log."""
        mode = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        data_fd = os.open(data_path, mode)
        index_fd = -1
        try:
            index_fd = os.open(index_path, mode)
            data_size = os.fstat(data_fd).st_size
            index_size = os.fstat(index_fd).st_size
            try:
                header = LsmtHeader.unpack(os.pread(data_fd, HT_SPACE, 0))
                index_header = LsmtHeader.unpack(os.pread(index_fd, HT_SPACE, 0))
            except FormatError as exc:
                raise exc.with_digest(f"{data_path} / {index_path}") from None
            _check_headers(header, index_header, data_path, index_path)
            torn = (index_size - HT_SPACE) % 16
            if torn:
                if readonly:
                    raise CorruptLayerError(
                        f"{index_path}: the record log ends with a torn {torn}-byte record",
                        field="index", offset=index_size - torn,
                    )
                log.warning("%s: dropping a torn %d-byte record at the end of the log "
                            "(an unacknowledged write)", index_path, torn)
                index_size -= torn
                os.ftruncate(index_fd, index_size)
            raw = pread_exact(index_fd, index_size - HT_SPACE, HT_SPACE, index_path)
            log_records = lsmt.parse_writable_log(raw, data_size)
        except BaseException:
            os.close(data_fd)
            if index_fd >= 0:
                os.close(index_fd)
            raise
        data_end = max(data_size, HT_SPACE)
        data_end += -data_end % SECTOR
        return cls(data_fd, index_fd, header, WritableIndex.from_log(log_records), data_end,
                   (data_path, index_path))

    def close(self) -> None:
        for fd in (self._data_fd, self._index_fd):
            if fd >= 0:
                os.close(fd)
        self._data_fd = self._index_fd = -1

    @property
    def data_end(self) -> int:
        return self._data_end

    def _append_records(self, records: list[bytes]) -> None:
        blob = b"".join(records)
        if os.pwrite(self._index_fd, blob, self._index_end) != len(blob):
            raise DeviceError(f"writable layer: short write to {self.paths[1]}")
        self._index_end += len(blob)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write sector-aligned ``data`` at device byte ``offset``."""
        length = len(data)
        if offset % SECTOR or length % SECTOR:
            raise DeviceError(f"writable layer: unaligned write {offset}+{length}")
        if offset + length > self.virtual_size:
            raise DeviceError(
                f"writable layer: write {offset}+{length} beyond the {self.virtual_size}-byte "
                "device"
            )
        if not length:
            return
        # Data first, then the records that point at it (crash safety, see module docstring).
        moffset = self._data_end
        written = os.pwrite(self._data_fd, data, moffset)
        if written != length:
            raise DeviceError(f"writable layer: short write to {self.paths[0]}")
        self._data_end += length
        records = []
        sector, msector, remaining = offset // SECTOR, moffset // SECTOR, length // SECTOR
        while remaining:
            n = min(remaining, MAX_WRITE_SECTORS)
            records.append(_record(sector, n, msector, 0))
            self.index.insert(sector, n, msector, 0)
            sector, msector, remaining = sector + n, msector + n, remaining - n
        self._append_records(records)

    def discard(self, offset: int, length: int) -> None:
        """Make a sector-aligned range read as zeros (TRIM), with zeroed records."""
        if offset % SECTOR or length % SECTOR or offset + length > self.virtual_size:
            raise DeviceError(f"writable layer: bad discard {offset}+{length}")
        records = []
        sector, remaining = offset // SECTOR, length // SECTOR
        msector = self._data_end // SECTOR
        while remaining:
            n = min(remaining, MAX_LENGTH)
            records.append(_record(sector, n, msector, 1))
            self.index.insert(sector, n, msector, 1)
            sector, remaining = sector + n, remaining - n
        if records:
            self._append_records(records)

    def lookup(self, offset: int, length: int) -> list[UpperPiece]:
        """Split a byte range into data / zero / lower pieces (any alignment)."""
        pieces: list[UpperPiece] = []
        pos, end = offset, offset + length
        first, last = offset // SECTOR, -(-end // SECTOR)
        for rec_off, rec_len, rec_moff, zeroed in self.index.overlapping(first, last):
            start = max(rec_off * SECTOR, offset)
            stop = min((rec_off + rec_len) * SECTOR, end)
            if start > pos:
                pieces.append(UpperPiece("lower", pos, start - pos))
            if zeroed:
                pieces.append(UpperPiece("zero", start, stop - start))
            else:
                moffset = rec_moff * SECTOR + (start - rec_off * SECTOR)
                pieces.append(UpperPiece("data", start, stop - start, moffset))
            pos = stop
        if pos < end:
            pieces.append(UpperPiece("lower", pos, end - pos))
        return pieces

    def read_data(self, moffset: int, length: int) -> bytes:
        return pread_exact(self._data_fd, length, moffset, self.paths[0])

    async def fsync(self) -> None:
        await trio.to_thread.run_sync(os.fsync, self._data_fd)
        await trio.to_thread.run_sync(os.fsync, self._index_fd)


def _check_headers(data: LsmtHeader, index: LsmtHeader, data_path: str, index_path: str) -> None:
    if not data.is_header or not data.is_data_file or data.is_sealed:
        raise CorruptLayerError(
            f"{data_path}: not the data file of a writable layer", field="flags", offset=28,
            expected=lsmt.FLAG_HEADER | lsmt.FLAG_DATA, actual=data.flags,
        )
    if data.is_sparse_rw:
        raise UnsupportedFormatError(
            f"{data_path}: sparse writable layers (overlaybd-create -s) are not supported",
            field="flags", offset=28, actual=data.flags,
        )
    if not index.is_header or index.is_data_file or index.is_sealed:
        raise CorruptLayerError(
            f"{index_path}: not the index file of a writable layer", field="flags", offset=28,
            expected=lsmt.FLAG_HEADER, actual=index.flags,
        )
    if index.index_offset != HT_SPACE:
        raise CorruptLayerError(
            f"{index_path}: index_offset must be 4096", field="index_offset", offset=32,
            expected=HT_SPACE, actual=index.index_offset,
        )

"""The one I/O seam: ``BlobSource`` (``size`` + ``async read_at``) and the simple sources.

Everything that provides bytes (a local file, an HTTP range reader, a ZFile decompressor,
the merged device) implements this protocol; features are added by wrapping sources.
``read_at`` returns exactly ``length`` bytes or raises: a short read is never data.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import trio

from ..errors import DeviceError

__all__ = [
    "BlobSource", "FileSource", "MemorySource", "SliceSource", "check_range", "pread_exact",
]

# Reads up to this size are served inline: a thread hop costs more than a cached pread.
_INLINE_READ = 256 * 1024


@runtime_checkable
class BlobSource(Protocol):
    """Anything that provides the bytes of a blob: ``size`` and ``read_at``, which returns
    exactly ``length`` bytes from ``offset`` or raises (a short read is never data). The
    result is a bytes-like object, not always ``bytes``: a remote blob read under
    ``RANGE_PROGRESS`` hands back a bytearray, the block cache and ZFile sources a memoryview
    of a larger buffer (saving a copy); treat it as read-only and take ``bytes()`` of it to
    keep or hash it."""

    size: int

    async def read_at(self, offset: int, length: int) -> bytes: ...


def check_range(source: BlobSource, offset: int, length: int, what: str = "blob") -> None:
    """Raise DeviceError unless ``[offset, offset+length)`` lies inside ``source``."""
    if offset < 0 or length < 0 or offset + length > source.size:
        raise DeviceError(
            f"read of {what} at {offset}+{length} is outside its {source.size} bytes"
        )


def pread_exact(fd: int, length: int, offset: int, what: str) -> bytes:
    """Exactly ``length`` bytes at ``offset`` (pread may return less on some filesystems)."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise DeviceError(f"{what}: short read at {offset}+{length} (file shrank?)")
        data += more
    return data


class MemorySource:
    """Bytes held in memory (tests, small blobs)."""

    def __init__(self, data: bytes) -> None:
        self._data = bytes(data)
        self.size = len(self._data)

    async def read_at(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length, "memory blob")
        return self._data[offset : offset + length]


class FileSource:
    """A local file read with pread. Built with ``open``; closed with ``aclose``."""

    def __init__(self, fd: int, size: int, path: str) -> None:
        self._fd = fd
        self.size = size
        self.path = path

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> FileSource:
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DeviceError(f"cannot open {path}: {exc.strerror}") from exc
        return cls(fd, os.fstat(fd).st_size, path)

    def _pread(self, offset: int, length: int) -> bytes:
        return pread_exact(self._fd, length, offset, self.path)

    async def read_at(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length, self.path)
        if length <= _INLINE_READ:
            return self._pread(offset, length)
        return await trio.to_thread.run_sync(self._pread, offset, length)

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def __aenter__(self) -> FileSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class SliceSource:
    """A window ``[offset, offset+size)`` of another source (the payload of a tar wrapper)."""

    def __init__(self, inner: BlobSource, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > inner.size:
            raise DeviceError(f"slice {offset}+{size} is outside the {inner.size}-byte source")
        self._inner = inner
        self._offset = offset
        self.size = size

    async def read_at(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length, "tar payload")
        return await self._inner.read_at(self._offset + offset, length)

"""The FUSE file system of the node: one directory per served image, holding ``block``.

``<mountpoint>/<image id>/block`` is a file of the device's virtual size; the kernel's loop
driver reads (and, for a writable image, writes) it, and every request is served by the
image's ``LayeredDevice``. Images come and go while the file system stays mounted. Errors
are mapped to errno in ``_errno`` and nowhere else.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyfuse3

from ..engine.layered import LayeredDevice
from ..errors import DeviceError, FormatError, OverlaybdError, RegistryError, UsageError

__all__ = ["BlockFs", "ServedImage"]

log = logging.getLogger(__name__)

BLOCK_NAME = b"block"


def _errno(exc: BaseException) -> int:
    """The one mapping from our exceptions to what the kernel (and the reader) sees."""
    if isinstance(exc, (DeviceError, FormatError, RegistryError)):
        return errno.EIO
    if isinstance(exc, UsageError):
        return errno.EINVAL
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


@contextmanager
def _as_fuse_errors(what: str) -> Iterator[None]:
    try:
        yield
    except pyfuse3.FUSEError:
        raise
    except (OverlaybdError, OSError) as exc:
        log.error("%s failed: %s", what, exc)
        raise pyfuse3.FUSEError(_errno(exc)) from None
    except BaseExceptionGroup as group:  # should not escape the engine, but never crash FUSE
        log.error("%s failed: %s", what, group)
        raise pyfuse3.FUSEError(errno.EIO) from None


@dataclass
class ServedImage:
    """One image in the file system, with the counters ``status`` reports."""

    name: str
    device: LayeredDevice
    dir_inode: int
    block_inode: int
    created: float = field(default_factory=time.time)
    open_handles: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0
    errors: int = 0
    on_read: Callable[[int, int, float], None] | None = None  # trace hook (offset, len, secs)

    @property
    def writable(self) -> bool:
        return self.device.writable


class BlockFs(pyfuse3.Operations):
    """pyfuse3 operations; images are added and removed with ``add``/``remove``."""

    def __init__(self) -> None:
        super().__init__()
        self._images: dict[str, ServedImage] = {}
        self._by_inode: dict[int, ServedImage] = {}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._started = time.time()

    # -- image registry -------------------------------------------------------------------

    def add(self, name: str, device: LayeredDevice) -> ServedImage:
        if not name or "/" in name or name in (".", "..") or name in self._images:
            raise UsageError(f"cannot serve image as {name!r}: bad or duplicate name")
        image = ServedImage(name, device, self._next_inode, self._next_inode + 1)
        self._next_inode += 2
        self._images[name] = image
        self._by_inode[image.dir_inode] = image
        self._by_inode[image.block_inode] = image
        return image

    def remove(self, name: str) -> ServedImage:
        image = self._images.pop(name)
        self._by_inode.pop(image.dir_inode, None)
        self._by_inode.pop(image.block_inode, None)
        return image

    def get(self, name: str) -> ServedImage | None:
        return self._images.get(name)

    def images(self) -> list[ServedImage]:
        return list(self._images.values())

    # -- attributes -----------------------------------------------------------------------

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_uid = attr.st_gid = 0
        attr.generation = 0
        attr.entry_timeout = attr.attr_timeout = 1.0
        attr.st_blksize = 4096
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o755
            attr.st_nlink = 2 + len(self._images)
            attr.st_size = 0
            ts = self._started
        else:
            image = self._by_inode.get(inode)
            if image is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            ts = image.created
            if inode == image.dir_inode:
                attr.st_mode = stat.S_IFDIR | 0o755
                attr.st_nlink = 2
                attr.st_size = 0
            else:
                attr.st_mode = stat.S_IFREG | (0o600 if image.writable else 0o400)
                attr.st_nlink = 1
                attr.st_size = image.device.size
        attr.st_blocks = -(-attr.st_size // 512)
        ns = int(ts * 1e9)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = ns
        return attr

    async def getattr(self, inode: int, ctx=None) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def setattr(self, inode, attr, fields, fh, ctx) -> pyfuse3.EntryAttributes:
        image = self._by_inode.get(inode)
        if fields.update_size and (image is None or inode != image.block_inode
                                   or attr.st_size != image.device.size):
            raise pyfuse3.FUSEError(errno.EPERM)  # the device size is fixed
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx=None) -> pyfuse3.EntryAttributes:
        if parent_inode == pyfuse3.ROOT_INODE:
            image = self._images.get(os.fsdecode(name))
            if image is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(image.dir_inode)
        image = self._by_inode.get(parent_inode)
        if image is None or parent_inode != image.dir_inode or name != BLOCK_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(image.block_inode)

    # -- directories ----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx) -> int:
        if inode != pyfuse3.ROOT_INODE:
            image = self._by_inode.get(inode)
            if image is None or inode != image.dir_inode:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token) -> None:
        if fh == pyfuse3.ROOT_INODE:
            entries = [(os.fsencode(img.name), img.dir_inode) for img in self._images.values()]
        else:
            image = self._by_inode.get(fh)
            entries = [(BLOCK_NAME, image.block_inode)] if image else []
        entries.sort(key=lambda e: e[1])
        for name, inode in entries:
            if inode <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), inode):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data

    # -- the block file -------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx) -> pyfuse3.FileInfo:
        image = self._by_inode.get(inode)
        if image is None or inode != image.block_inode:
            raise pyfuse3.FUSEError(errno.EISDIR if image else errno.ENOENT)
        if flags & os.O_ACCMODE != os.O_RDONLY and not image.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        image.open_handles += 1
        # A read-only image never changes: the kernel may keep its page cache across opens.
        return pyfuse3.FileInfo(fh=inode, keep_cache=not image.writable)

    def _image_of(self, fh: int) -> ServedImage:
        image = self._by_inode.get(fh)
        if image is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return image

    async def read(self, fh: int, off: int, size: int) -> bytes:
        image = self._image_of(fh)
        device = image.device
        if off >= device.size or size <= 0:
            return b""
        size = min(size, device.size - off)
        started = time.monotonic()
        try:
            with _as_fuse_errors(f"read of {image.name} at {off}+{size}"):
                data = await device.read_at(off, size)
        except pyfuse3.FUSEError:
            image.errors += 1
            raise
        image.reads += 1
        image.bytes_read += size
        if image.on_read is not None:
            image.on_read(off, size, time.monotonic() - started)
        return data

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        image = self._image_of(fh)
        if not image.writable:
            raise pyfuse3.FUSEError(errno.EROFS)
        if off + len(buf) > image.device.size:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        try:
            with _as_fuse_errors(f"write of {image.name} at {off}+{len(buf)}"):
                await image.device.write_at(off, buf)
        except pyfuse3.FUSEError:
            image.errors += 1
            raise
        image.writes += 1
        image.bytes_written += len(buf)
        return len(buf)

    async def fsync(self, fh: int, datasync: bool) -> None:
        image = self._image_of(fh)
        if image.device.upper is not None:
            with _as_fuse_errors(f"fsync of {image.name}"):
                await image.device.upper.fsync()

    async def flush(self, fh: int) -> None:
        return None

    async def release(self, fh: int) -> None:
        image = self._by_inode.get(fh)
        if image is not None:
            image.open_handles -= 1

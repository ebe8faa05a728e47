"""Make the ext4 filesystem of a new image inside a writable layer, without root.

``mke2fs`` runs on a sparse temporary file of the device's size with the options of spec
section 3.3 (no journal, no metadata checksums: the feature list is passed explicitly because
Debian's mke2fs.conf defaults differ) and fixed time, UUID and hash seed so that two runs give
identical bytes. Only the blocks mke2fs actually wrote are imported into the layer: data
extents found with SEEK_DATA/SEEK_HOLE, minus all-zero blocks, which an empty layer stack
reads as zeros anyway.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile

import trio

from ..errors import UsageError
from .writable import WritableLayer

__all__ = ["FEATURES", "mkfs_command", "mkfs_into"]

log = logging.getLogger(__name__)

FEATURES = (
    "none,ext_attr,resize_inode,dir_index,filetype,extent,64bit,flex_bg,sparse_super,"
    "sparse_super2,large_file,huge_file,dir_nlink,extra_isize"
)
# Fixed so that mkfs is reproducible; the original's seed is unparsable (null) and mke2fs
# would replace a null seed with a random one.
HASH_SEED = "6f766572-6c61-7962-642d-70792d657874"
FAKE_TIME = "1700000000"
_BLOCK = 4096
_READ = 4 * 1024 * 1024
_ZERO = bytes(_BLOCK)


def mkfs_command(path: str) -> list[str]:
    mke2fs = shutil.which("mke2fs") or shutil.which("mke2fs", path="/usr/sbin:/sbin")
    if mke2fs is None:
        raise UsageError("mke2fs not found: install e2fsprogs (scripts/bootstrap does)")
    return [
        mke2fs, "-t", "ext4", "-F", "-q", "-b", "4096", "-I", "256", "-i", "16384", "-m", "5",
        "-G", "1", "-O", FEATURES, "-U", "clear",
        "-E", f"root_owner=0:0,lazy_itable_init=1,nodiscard,hash_seed={HASH_SEED}",
        path,
    ]


def _data_extents(fd: int, size: int):
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end


def _import(layer: WritableLayer, path: str) -> int:
    """Copy the non-zero 4 KiB blocks of the data extents of ``path`` into ``layer``."""
    imported = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, end in _data_extents(fd, os.fstat(fd).st_size):
            start -= start % _BLOCK
            for pos in range(start, end, _READ):
                data = os.pread(fd, min(_READ, end - pos), pos)
                run_start = None
                for i in range(0, len(data) + _BLOCK, _BLOCK):
                    block = data[i : i + _BLOCK]
                    nonzero = bool(block) and block != _ZERO[: len(block)]
                    if nonzero and run_start is None:
                        run_start = i
                    elif not nonzero and run_start is not None:
                        chunk = data[run_start:i]
                        chunk += bytes(-len(chunk) % 512)
                        layer.write(pos + run_start, chunk)
                        imported += len(chunk)
                        run_start = None
    finally:
        os.close(fd)
    return imported


def _mkfs(layer: WritableLayer, tmpdir: str | None) -> int:
    with tempfile.TemporaryDirectory(prefix="obd-mkfs-", dir=tmpdir) as work:
        image = os.path.join(work, "ext4.img")
        with open(image, "wb") as f:
            f.truncate(layer.virtual_size)
        env = dict(os.environ, E2FSPROGS_FAKE_TIME=FAKE_TIME)
        proc = subprocess.run(mkfs_command(image), env=env, capture_output=True, text=True)
        if proc.returncode:
            raise UsageError(f"mke2fs failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return _import(layer, image)


async def mkfs_into(layer: WritableLayer, *, tmpdir: str | None = None) -> int:
    """Create an empty ext4 of the layer's virtual size inside ``layer`` (which must be the
    bottom layer: unmapped blocks must read as zeros). Returns the bytes imported."""
    if len(layer.index):
        raise UsageError("mkfs needs an empty writable layer")
    imported = await trio.to_thread.run_sync(_mkfs, layer, tmpdir)
    log.info("mkfs: imported %d bytes of ext4 metadata", imported)
    return imported

"""The FUSE operations called directly (no mount), as s3ql tests its file system API."""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3
import pytest
import trio

from overlaybd_py.engine.layer import open_layer
from overlaybd_py.engine.layered import LayeredDevice
from overlaybd_py.engine.source import FileSource, MemorySource
from overlaybd_py.engine.writable import WritableLayer
from overlaybd_py.errors import CorruptLayerError
from overlaybd_py.fusefs.fs import BLOCK_NAME, BlockFs, _errno
from tests.fixtures.testdata import sample


async def _device(tmp_path=None) -> LayeredDevice:
    layers = [await open_layer(await FileSource.open(sample(name)), key=name)
              for name in ("l0.commit", "l1.lz4.tar")]
    upper = None
    if tmp_path is not None:
        upper = WritableLayer.create(str(tmp_path / "d"), str(tmp_path / "i"), 1 << 30)
    return LayeredDevice(layers, upper)


def test_lookup_getattr_open_read():
    async def main():
        fs = BlockFs()
        device = await _device()
        image = fs.add("img1", device)
        root = await fs.getattr(pyfuse3.ROOT_INODE)
        assert stat.S_ISDIR(root.st_mode)
        d = await fs.lookup(pyfuse3.ROOT_INODE, b"img1")
        assert d.st_ino == image.dir_inode and stat.S_ISDIR(d.st_mode)
        b = await fs.lookup(d.st_ino, BLOCK_NAME)
        assert b.st_size == 1 << 30 and stat.S_IMODE(b.st_mode) == 0o400
        for parent, name in ((pyfuse3.ROOT_INODE, b"nope"), (d.st_ino, b"other")):
            with pytest.raises(pyfuse3.FUSEError) as info:
                await fs.lookup(parent, name)
            assert info.value.errno == errno.ENOENT
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fs.open(b.st_ino, os.O_RDWR, None)
        assert info.value.errno == errno.EROFS  # a read-only image
        fi = await fs.open(b.st_ino, os.O_RDONLY, None)
        assert fi.keep_cache
        assert await fs.read(fi.fh, 1024 + 56, 2) == b"\x53\xef"  # the ext4 magic
        assert await fs.read(fi.fh, (1 << 30) - 10, 100) == bytes(10)  # clamped at the end
        assert await fs.read(fi.fh, 1 << 30, 100) == b""
        assert image.reads == 2 and image.bytes_read == 12
        await fs.release(fi.fh)
        assert image.open_handles == 0
        fs.remove("img1")
        with pytest.raises(pyfuse3.FUSEError):
            await fs.getattr(b.st_ino)
        with pytest.raises(Exception, match="bad or duplicate"):
            fs.add("a/b", device)

    trio.run(main)


def test_writable_image_write_fsync_and_size_is_fixed(tmp_path):
    async def main():
        fs = BlockFs()
        image = fs.add("rw", await _device(tmp_path))
        fi = await fs.open(image.block_inode, os.O_RDWR, None)
        assert not fi.keep_cache
        assert await fs.write(fi.fh, 4096 * 1000 + 7, b"hello") == 5
        assert await fs.read(fi.fh, 4096 * 1000, 16) == bytes(7) + b"hello" + bytes(4)
        await fs.fsync(fi.fh, False)
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fs.write(fi.fh, (1 << 30) - 2, b"xyz")
        assert info.value.errno == errno.ENOSPC
        attr = pyfuse3.EntryAttributes()
        attr.st_size = 5

        class Fields:  # pyfuse3.SetattrFields is read-only from Python
            update_size = True

        fields = Fields()
        with pytest.raises(pyfuse3.FUSEError) as info:
            await fs.setattr(image.block_inode, attr, fields, fi.fh, None)
        assert info.value.errno == errno.EPERM

    trio.run(main)


@pytest.mark.allow_log_warnings
def test_engine_errors_become_eio():
    class Broken(MemorySource):
        async def read_at(self, offset, length):
            raise CorruptLayerError("chunk 3: checksum mismatch", field="chunk", offset=99)

    async def main():
        fs = BlockFs()
        device = await _device()
        device.layers[1].lsmt = Broken(bytes(device.layers[1].lsmt.size))
        image = fs.add("bad", device)
        fi = await fs.open(image.block_inode, os.O_RDONLY, None)
        # /data/pattern.bin lives in layer 1: some 64 KiB read of the device touches it
        failures = 0
        for offset in range(0, 8 << 20, 64 << 10):
            try:
                await fs.read(fi.fh, offset, 64 << 10)
            except pyfuse3.FUSEError as exc:
                assert exc.errno == errno.EIO
                failures += 1
        assert failures and image.errors == failures

    trio.run(main)
    assert _errno(OSError(errno.ENOSPC, "full")) == errno.ENOSPC

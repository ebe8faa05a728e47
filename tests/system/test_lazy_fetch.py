"""What crosses the network, counted by the registry itself (its access log)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from overlaybd_py.engine.layer import open_layer
from overlaybd_py.engine.source import FileSource
from overlaybd_py.formats import tar_wrapper, zfile
from overlaybd_py.formats.lsmt import HT_SPACE
from tests.fixtures.images import build_layers, push_layers
from tests.fixtures.node import Node
from tests.fixtures.registry import registry  # noqa: F401  (fixture)
from tests.fixtures.system import need_fuse

pytestmark = pytest.mark.system

BIG = 120 << 20


def _big_step(root: Path) -> None:
    (root / "small.txt").write_bytes(b"s" * 4096)
    with open(root / "big.bin", "wb") as f:
        rnd = random.Random(9)
        for _ in range(BIG >> 20):
            f.write(rnd.randbytes(1 << 20))


def _second_step(root: Path) -> None:
    (root / "other.txt").write_text("layer two\n")


@pytest.fixture(scope="module")
def big_image(tmp_path_factory, registry):  # noqa: F811
    need_fuse()
    work = tmp_path_factory.mktemp("big")
    layers, _raw = build_layers(work, [_big_step, _second_step])
    ref = push_layers(registry.host, "system/big:v1", layers)
    return ref, layers


def _blocks(ranges: list[tuple[int, int]], block: int = 4096) -> int:
    """Bytes of the 4 KiB blocks (the cache's fetch unit) that cover ``ranges``."""
    covered: set[int] = set()
    for offset, length in ranges:
        covered.update(range(offset // block, (offset + length - 1) // block + 1))
    return len(covered) * block


def metadata_bytes(path: Path) -> int:
    """Blob bytes a reader must fetch before any data: the tar head, the ZFile header,
    trailer and jump table, and the chunks holding the LSMT header, trailer and index."""

    async def run() -> int:
        async with await FileSource.open(path) as blob:
            layer = await open_layer(blob, key=str(path))
            base = layer.tar_offset or 0
            ranges = [(0, tar_wrapper.HEAD_PROBE)]
            z = layer.zfile
            assert z is not None
            index = z.index
            ranges.append((base, zfile.SLOT))
            ranges.append((base + index.header.index_offset, 4 * index.chunks))
            if not index.header.is_header:  # no header overwrite: the trailer is read too
                payload_end = blob.size if layer.tar_offset is None else base + (
                    tar_wrapper.find_payload(await blob.read_at(0, 4096), blob.size).size)
                ranges.append((payload_end - zfile.SLOT, zfile.SLOT))
            trailer = layer.trailer
            for offset, length in ((0, HT_SPACE), (layer.lsmt.size - HT_SPACE, HT_SPACE),
                                   (trailer.index_offset, trailer.index_size * 16)):
                start, size = index.compressed_range(offset, length)
                ranges.append((base + start, size))
            return _blocks(ranges)

    return trio.run(run)


def test_reading_one_small_file_fetches_almost_nothing(big_image, registry, tmp_path):  # noqa: F811
    ref, layers = big_image
    image_bytes = sum(os.path.getsize(p) for p in layers)
    assert image_bytes > 100 << 20
    meta = sum(metadata_bytes(p) for p in layers)
    node = Node(tmp_path / "node")
    try:
        mark = registry.log_mark()
        target = tmp_path / "t"
        node.mount(ref, target)
        assert (target / "small.txt").read_bytes() == b"s" * 4096
        fetched = registry.blob_bytes_served(since=mark)
        print(f"\nimage {image_bytes} bytes; fetched {fetched} bytes for mount + one 4 KiB "
              f"file, of which per-layer metadata {meta} bytes")
        assert fetched - meta <= 1 << 20, (fetched, meta)
        status = node.mount_status(target)
        assert status["bytes_fetched"] == fetched
        # Unmount, mount again, read the same file: nothing crosses the network.
        node.umount(target)
        mark = registry.log_mark()
        node.mount(ref, target)
        assert (target / "small.txt").read_bytes() == b"s" * 4096
        assert registry.blob_bytes_served(since=mark) == 0
        node.umount(target)
    finally:
        node.stop()


def test_small_cache_cap_stays_under_and_reads_stay_right(big_image, tmp_path):
    ref, _layers = big_image
    node = Node(tmp_path / "node", cache_size="16MiB")
    try:
        target = tmp_path / "t"
        node.mount(ref, target)
        rnd = random.Random(9)
        with open(target / "big.bin", "rb") as f:
            for i in range(BIG >> 20):  # read everything: far more than the cap
                want = rnd.randbytes(1 << 20)
                assert f.read(1 << 20) == want, f"MiB {i}"
        status = node.status()
        cache = status["cache"]
        assert cache["size"] <= 16 << 20 and cache["evictions"] > 0
        on_disk = sum(p.stat().st_blocks * 512 for p in (node.cache / "blobs").glob("*.data"))
        assert on_disk <= (16 << 20) + (2 << 20)
        ls = node.run("cache", "ls", "--json", "--cache-dir", str(node.cache))
        assert '"blobs"' in ls.stdout
        node.umount(target)
    finally:
        node.stop()


def test_corrupt_cache_file_is_detected_and_refetched(big_image, registry, tmp_path):  # noqa: F811
    ref, _layers = big_image
    node = Node(tmp_path / "node")
    try:
        target = tmp_path / "t"
        node.mount(ref, target)
        with open(target / "big.bin", "rb") as f:
            head = f.read(4 << 20)
        node.umount(target)
        node.stop()  # no daemon: the cache files are at rest
        # Flip bytes in every cached data file at many places.
        for data in (node.cache / "blobs").glob("*.data"):
            with open(data, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                for pos in range(0, min(size, 8 << 20), 64 << 10):
                    f.seek(pos + 100)
                    f.write(b"\xde\xad\xbe\xef")
        mark = registry.log_mark()
        node.mount(ref, target)
        with open(target / "big.bin", "rb") as f:
            assert f.read(4 << 20) == head
        registry.log_mark()  # the registry logs a request after its answer: let it settle
        assert registry.blob_bytes_served(since=mark) > 0  # refetched, not served corrupt
        assert node.status()["cache"]["corrupt_blocks"] > 0
        node.umount(target)
    finally:
        node.stop()

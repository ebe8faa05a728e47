"""The persistent block cache: blob bytes on local disk, keyed by blob digest and block.

Theory of operation
-------------------
Each cached blob has two files under ``<dir>/blobs/``: ``<hex>.data``, a sparse file holding
the blob's bytes at their own offsets, and ``<hex>.meta``, a memory-mapped table with, per
4 KiB block, a present flag and the block's CRC32C, and per 1 MiB region a last-access stamp
(the LRU clock). Blocks are the unit of presence and integrity; regions are the unit of
eviction (one hole punch, one stamp).

Concurrency protocol (one process, one trio thread; other processes see the same files):

* A block is *present* only after its bytes were written to ``.data`` and its CRC to
  ``.meta``; presence is published last. A reader trusts nothing: it re-computes the CRC of
  every block it serves, so a torn write, a crash between data and metadata, a truncated or
  corrupted file, or an eviction racing with the read (another process) is detected, the
  block is marked absent and fetched again. A block never reaches a caller unchecked.
* Within the process, a block being fetched is *claimed* in ``inflight`` (no ``await``
  between the presence scan and the claim); other readers wait for the claim's event and
  re-scan. So concurrent readers of one block share one fetch. A claim has one event per
  piece of PIECE_BLOCKS: as a long fetch's body arrives, each piece is stored, published
  and its readers woken, before the rest has come.
* Eviction (size above the cap) takes a ``flock`` on ``<dir>/lock`` so two processes do not
  evict at once, clears presence first, then punches the region's hole.

The on-disk format is versioned (``FORMAT``); a blob whose meta header does not match the
expected format, block size, blob size or digest is dropped and rebuilt, never misread.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import mmap
import os
import struct
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path

import trio

from .. import __version__, _accel
from ..errors import DeviceError, DigestMismatchError, UsageError
from ..registry.byteranges import Part
from ..registry.range_sockets import RANGE_PROGRESS
from ._tasks import run_concurrently
from .source import BlobSource, check_range

__all__ = [
    "READING_AHEAD", "BlockCache", "BlockCacheStatistics", "CachedBlobInfo", "CachedSource",
    "LatencyLog",
]

log = logging.getLogger(__name__)

FORMAT = 1
BLOCK = 4096
REGION_BLOCKS = 256  # 1 MiB eviction unit
MAGIC = b"OBDPY-BLOCKCACHE"
# magic, format, block size, blob size, region blocks, digest, creator, header crc
_HEADER = struct.Struct("<16sIIQI128s32sI")
META_HEADER = 4096
MAX_FETCH = 4 * 1024 * 1024  # bytes in one range request
# Read-ahead of sequential readers grows with what they read, up to this: fewer, larger range
# requests. docker-registry spends ~4 ms on every range request whatever its size, so a
# 256 KiB request runs at ~24 MB/s and a 4 MiB one at ~160 MB/s (~350 MB/s on the socket
# path). The window's missing part is fetched in the background once a quarter of it is
# missing (8 MiB: two concurrent 4 MiB requests), so a fast sequential reader keeps two
# requests in flight; with a 16 MiB cap the background fetches were smaller and the reader
# caught up with them more often (cold 256 MiB read: ~0.8 s against ~0.75 s, noisy).
MAX_READAHEAD = 32 * 1024 * 1024
# A miss that starts no stream (a new file, say) also fetches what follows it in the blob: the
# converter writes the files of a directory next to each other, so a start that has read a
# lot soon reads the neighbours, and a round trip costs more than the extra bytes. The
# window is at most LOCALITY_WINDOW and half what the blob has served (a mount that reads
# one small file gets no window). Windows stop once they have fetched WINDOW_ALLOWANCE bytes
# more than WINDOW_USE times what was read of them: scattered reads (a database, say) then
# fetch only what they read. (The numpy + pandas start reads about half of its windows; a
# budget tied to the bytes served instead cost it ~50 of its ~130 requests.)
# python3 -c "import numpy, pandas" (lz4; bench/README.md), 2 runs each, loopback / 200
# Mbit/10 ms: no window 4.3 s / 9.1 s (315 requests); a window of half the served bytes up
# to 2 MiB 2.6 s / 7.7 s, 4 MiB 2.45 s / 7.3 s, 8 MiB 2.3 s / 7.05 s (126 requests), with
# 93-99 MiB fetched in all cases for the 87 MiB the start reads.
LOCALITY_WINDOW = 8 * 1024 * 1024
WINDOW_ALLOWANCE = 16 * 1024 * 1024
WINDOW_USE = 4
# Set in background read-ahead tasks: a trace recorder marks their fetches as read-ahead.
READING_AHEAD: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "overlaybd_py_reading_ahead", default=False
)
# A fetch publishes its blocks (and wakes the readers waiting for them) in pieces of this
# many blocks as its body arrives (RANGE_PROGRESS), so the read that missed, at the front of
# a window, goes on after its own bytes, not the window's (8 MiB: ~0.35 s at 200 Mbit/s).
# python3 -c "import numpy, pandas", lazy, 4 runs each side (bench/README.md): 200 Mbit/10 ms
# (zstd, 64 KiB chunks) 5.95 s -> 5.04 s, loopback (lz4) 2.38 s -> 2.15 s. Fetching the
# window as a second request after the missed blocks instead (no streaming) cost loopback
# 10 % (one more request per miss) for 5 % at 200 Mbit.
PIECE_BLOCKS = 32
# A multi-range fetch the registry does not take as one request: this many of its ranges in
# flight at a time (the prefetcher runs half its workers when it batches, see prefetch.py).
SPLIT_FETCHES = 2
_STORE_IN_THREAD = 256 * 1024  # fetched runs from this size are written in a worker thread
EVICT_TO = 0.9  # evict down to this fraction of the cap

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_FALLOC_PUNCH = 0x01 | 0x02  # KEEP_SIZE | PUNCH_HOLE


def _punch_hole(fd: int, offset: int, length: int) -> None:
    res = _libc.fallocate(fd, _FALLOC_PUNCH, ctypes.c_long(offset), ctypes.c_long(length))
    if res != 0:
        err = ctypes.get_errno()
        if err != errno.EOPNOTSUPP:
            raise OSError(err, os.strerror(err))
        os.pwrite(fd, bytes(length), offset)  # no hole support: at least drop the content


def _digest_hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        raise UsageError(f"block cache keys are sha256 digests, got {digest!r}")
    return hexpart


@dataclass(frozen=True, slots=True)
class BlockCacheStatistics:
    hits: int  # blocks served from disk
    misses: int  # blocks fetched
    bytes_fetched: int
    bytes_served: int
    requests: int  # range requests sent to the source
    evictions: int  # regions evicted
    evicted_bytes: int
    corrupt_blocks: int  # entries found bad on read and fetched again
    size: int  # bytes cached now (this process's view)
    capacity: int


@dataclass(frozen=True, slots=True)
class CachedBlobInfo:
    digest: str
    blob_size: int
    cached_bytes: int
    last_access: float


class _BlobFiles:
    """The data + meta files of one blob, mapped; owned by BlockCache."""

    def __init__(self, digest: str, size: int, data_fd: int, meta_fd: int, meta: mmap.mmap):
        self.digest = digest
        self.size = size
        self.blocks = -(-size // BLOCK)
        self.regions = -(-self.blocks // REGION_BLOCKS)
        self.data_fd = data_fd
        self.meta_fd = meta_fd
        self.meta = meta
        view = memoryview(meta)
        crc_end = META_HEADER + 4 * self.blocks
        self.crcs = view[META_HEADER:crc_end].cast("I")
        self.present = view[crc_end : crc_end + self.blocks]
        stamp_start = crc_end + self.blocks
        stamp_start += -stamp_start % 4
        self.stamps = view[stamp_start : stamp_start + 4 * self.regions].cast("I")
        self.inflight: dict[int, trio.Event] = {}
        self.closed = False

    def touch(self, first: int, last: int) -> None:
        """Stamp the regions of blocks first..last as used now (LRU eviction)."""
        stamp = int(time.time())
        for region in range(first // REGION_BLOCKS, last // REGION_BLOCKS + 1):
            self.stamps[region] = stamp

    @staticmethod
    def meta_size(size: int) -> int:
        blocks = -(-size // BLOCK)
        regions = -(-blocks // REGION_BLOCKS)
        end = META_HEADER + 5 * blocks
        return end + (-end % 4) + 4 * regions

    def present_bytes(self) -> int:
        return self.present.tobytes().count(1) * BLOCK

    def close(self) -> None:
        self.closed = True
        for view in (self.crcs, self.present, self.stamps):
            view.release()
        self.meta.close()
        os.close(self.meta_fd)
        os.close(self.data_fd)


def _header(digest: str, size: int) -> bytes:
    body = _HEADER.pack(MAGIC, FORMAT, BLOCK, size, REGION_BLOCKS, digest.encode(),
                        f"overlaybd-py {__version__}".encode()[:32], 0)
    crc = _accel.crc32c(body[:-4], 0)
    return body[:-4] + struct.pack("<I", crc)


def _held_size(stored: bytes, digest: str) -> int | None:
    """The size a valid header of this cache format records for ``digest``, else None."""
    if len(stored) != _HEADER.size:
        return None
    size = _HEADER.unpack(stored)[3]
    return size if stored == _header(digest, size) else None


class BlockCache:
    """A directory of cached blobs with a size cap (bytes; 0 = unbounded).

    Built with ``BlockCache.open(dir, capacity)``; ``close()`` flushes and unmaps.
    """

    def __init__(self, root: Path, capacity: int) -> None:
        self.root = root
        self.capacity = capacity
        self._blobs: dict[str, _BlobFiles] = {}
        self._users: dict[str, int] = {}  # open CachedSources per digest
        self._size = 0  # bytes present in the blobs this process has opened or scanned
        self._sizes: dict[str, int] = {}  # digest -> present bytes, for blobs not opened
        self._counters = dict(hits=0, misses=0, bytes_fetched=0, bytes_served=0, requests=0,
                              evictions=0, evicted_bytes=0, corrupt_blocks=0)
        self._sources: weakref.WeakSet[CachedSource] = weakref.WeakSet()

    @classmethod
    def open(cls, root: str | os.PathLike[str], capacity: int = 0) -> BlockCache:
        root = Path(root)
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        version_file = root / "VERSION"
        want = {"format": FORMAT, "block_size": BLOCK}
        if version_file.exists():
            try:
                have = json.loads(version_file.read_text())
            except ValueError:
                have = {}
            if {k: have.get(k) for k in want} != want:
                raise UsageError(
                    f"cache directory {root} holds a different cache format ({have}); "
                    f"clear it with 'overlaybd-py cache clear --cache-dir {root}'"
                )
        else:
            tmp = version_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({**want, "creator": f"overlaybd-py {__version__}"}))
            tmp.rename(version_file)
        cache = cls(root, capacity)
        for info in cache.list_blobs():
            cache._sizes[info.digest] = info.cached_bytes
        cache._size = sum(cache._sizes.values())
        return cache

    def close(self) -> None:
        for files in self._blobs.values():
            files.meta.flush()
            files.close()
        self._blobs.clear()

    # -- blobs ------------------------------------------------------------------------------

    def _paths(self, digest: str) -> tuple[Path, Path]:
        hexpart = _digest_hex(digest)
        base = self.root / "blobs" / hexpart
        return base.with_suffix(".data"), base.with_suffix(".meta")

    def _open_blob(self, digest: str, size: int) -> _BlobFiles:
        files = self._blobs.get(digest)
        if files is not None:
            if files.size != size:
                raise DeviceError(
                    f"blob {digest}: size {size} differs from the cached {files.size}"
                )
            return files
        data_path, meta_path = self._paths(digest)
        expected_meta = _BlobFiles.meta_size(size)
        header = _header(digest, size)
        fresh = True
        try:
            with open(meta_path, "rb") as f:
                stored = f.read(len(header))
            fresh = stored != header or meta_path.stat().st_size != expected_meta
            held = _held_size(stored, digest)
            if held is not None and held != size:
                # The same content at another size: the request's size is wrong (the entry's
                # came from the registry's range answers). Keep the entry, refuse the request.
                raise DigestMismatchError(
                    f"blob {digest}: {size} bytes asked for, but the registry served it as "
                    f"{held} bytes (the block cache holds it at that size); is the image's "
                    "manifest or layer list right?")
            if fresh:
                log.info("cache entry for %s does not match this format or size; rebuilding",
                         digest)
        except FileNotFoundError:
            pass
        if fresh:
            self._drop_files(digest)
            tmp = meta_path.with_name(meta_path.name + f".tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                f.write(header.ljust(META_HEADER, b"\0"))
                f.truncate(expected_meta)
            with open(data_path, "wb") as f:
                f.truncate(size)
            tmp.rename(meta_path)  # published: an empty, valid table
        data_fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        meta_fd = os.open(meta_path, os.O_RDWR | os.O_CLOEXEC)
        meta = mmap.mmap(meta_fd, expected_meta)
        files = _BlobFiles(digest, size, data_fd, meta_fd, meta)
        self._blobs[digest] = files
        present = files.present_bytes()
        self._size += present - self._sizes.get(digest, 0)
        self._sizes[digest] = present
        return files

    def _drop_files(self, digest: str) -> None:
        for path in self._paths(digest):
            path.unlink(missing_ok=True)

    def source(self, remote: BlobSource, digest: str) -> CachedSource:
        """A ``BlobSource`` serving ``remote``'s bytes through this cache; ``aclose`` it
        when done, so the blob's files are closed once no source reads it."""
        source = CachedSource(self, remote, digest)
        self._users[digest] = self._users.get(digest, 0) + 1
        self._sources.add(source)
        return source

    async def stop_background(self) -> None:
        """Stop the background fetches of every open source and wait for them: call it
        before ``close`` while sources stay open (a daemon that keeps its mounts)."""
        for source in list(self._sources):
            await source.stop_background()

    def _release(self, digest: str) -> None:
        """One source of ``digest`` closed. Closing the last one closes the blob's files
        (its entry stays on disk), so an unmounted image pins neither descriptors nor
        entries that ``clear`` would keep."""
        users = self._users.get(digest, 0) - 1
        if users > 0:
            self._users[digest] = users
            return
        self._users.pop(digest, None)
        files = self._blobs.get(digest)
        if files is not None and not files.inflight:
            del self._blobs[digest]
            files.meta.flush()
            files.close()

    # -- accounting and eviction --------------------------------------------------------------

    def _added(self, files: _BlobFiles, nbytes: int) -> None:
        self._size += nbytes
        self._sizes[files.digest] = self._sizes.get(files.digest, 0) + nbytes
        if self.capacity and self._size > self.capacity:
            self.evict(int(self.capacity * EVICT_TO))

    def _forget(self, files: _BlobFiles, blocks: list[int]) -> None:
        """Mark blocks absent (found bad, or invalidated by a layer above)."""
        dropped = 0
        for block in blocks:
            if files.present[block]:
                files.present[block] = 0
                dropped += BLOCK
        self._size -= dropped
        self._sizes[files.digest] = self._sizes.get(files.digest, 0) - dropped

    def _all_regions(self) -> Iterator[tuple[int, str, int]]:
        """(stamp, digest, region) of every region with present blocks, any blob on disk."""
        for info in self.list_blobs():
            try:
                files = self._open_blob(info.digest, info.blob_size)
            except OSError:
                continue
            present = files.present.tobytes()
            for region in range(files.regions):
                start = region * REGION_BLOCKS
                if present.find(1, start, start + REGION_BLOCKS) >= 0:
                    yield files.stamps[region], info.digest, region

    def evict(self, target: int) -> int:
        """Evict least recently used regions until at most ``target`` bytes remain.
        Returns the bytes evicted."""
        lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        evicted = 0
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            for _stamp, digest, region in sorted(self._all_regions()):
                if self._size <= target:
                    break
                files = self._blobs[digest]
                start = region * REGION_BLOCKS
                end = min(start + REGION_BLOCKS, files.blocks)
                if any(b in files.inflight for b in range(start, end)):
                    continue
                count = files.present[start:end].tobytes().count(1)
                files.present[start:end] = bytes(end - start)  # presence first, then data
                _punch_hole(files.data_fd, start * BLOCK, (end - start) * BLOCK)
                nbytes = count * BLOCK
                self._size -= nbytes
                self._sizes[digest] -= nbytes
                evicted += nbytes
                self._counters["evictions"] += 1
                self._counters["evicted_bytes"] += nbytes
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)
            # The pass opened every blob on disk; close those no source reads.
            for digest in [d for d in self._blobs if not self._users.get(d)]:
                files = self._blobs[digest]
                if not files.inflight:
                    del self._blobs[digest]
                    files.meta.flush()
                    files.close()
        if evicted:
            log.info("block cache: evicted %d bytes (now %d, cap %d)", evicted, self._size,
                     self.capacity)
        return evicted

    # -- inspection ---------------------------------------------------------------------------

    def list_blobs(self) -> list[CachedBlobInfo]:
        """Every blob in the cache directory with its cached bytes (for ``cache ls``)."""
        out = []
        for meta_path in sorted((self.root / "blobs").glob("*.meta")):
            digest = "sha256:" + meta_path.stem
            files = self._blobs.get(digest)
            if files is not None:
                stamps = files.stamps.tolist()
                out.append(CachedBlobInfo(digest, files.size, files.present_bytes(),
                                          float(max(stamps, default=0))))
                continue
            try:
                raw = meta_path.read_bytes()
                (magic, fmt, block, size, region, stored_digest, _creator,
                 _crc) = _HEADER.unpack_from(raw)
            except (OSError, struct.error):
                continue
            if (magic, fmt, block, region) != (MAGIC, FORMAT, BLOCK, REGION_BLOCKS) or \
                    stored_digest.rstrip(b"\0").decode(errors="replace") != digest or \
                    len(raw) != _BlobFiles.meta_size(size):
                continue
            blocks = -(-size // BLOCK)
            crc_end = META_HEADER + 4 * blocks
            present = raw[crc_end : crc_end + blocks].count(1) * BLOCK
            stamp_start = crc_end + blocks
            stamp_start += -stamp_start % 4
            stamps = struct.unpack_from(f"<{-(-blocks // REGION_BLOCKS)}I", raw, stamp_start)
            out.append(CachedBlobInfo(digest, size, present, float(max(stamps, default=0))))
        return out

    def size(self) -> int:
        return self._size

    def clear(self) -> int:
        """Remove every cached blob not currently open. Returns the bytes freed."""
        freed = 0
        for info in self.list_blobs():
            if info.digest in self._blobs:
                continue
            self._drop_files(info.digest)
            freed += info.cached_bytes
            self._size -= self._sizes.pop(info.digest, 0)
        for tmp in (self.root / "blobs").glob("*.tmp-*"):
            tmp.unlink(missing_ok=True)
        return freed

    def statistics(self) -> BlockCacheStatistics:
        return BlockCacheStatistics(**self._counters, size=self._size, capacity=self.capacity)


class CachedSource:
    """``BlobSource`` over a remote blob, reading through the block cache.

    Missing blocks are fetched in coalesced runs (at most MAX_FETCH bytes per request);
    when reads are sequential the run is extended ahead (read-ahead, up to MAX_READAHEAD) so
    the next read finds its blocks cached without another round trip, and a miss elsewhere
    brings a locality window. Such a fetch goes on in the background once the read's own
    blocks, at its front, have landed: the read does not wait for what it did not ask for.
    """

    def __init__(self, cache: BlockCache, remote: BlobSource, digest: str) -> None:
        self._cache = cache
        self._remote = remote
        self.digest = digest
        self.size = remote.size
        self._files = cache._open_blob(digest, remote.size)
        self._streams = _Streams()
        # Per-source counters (the image's share of the cache-wide statistics).
        self._closed = False
        self._ahead: tuple[trio.CancelScope, trio.Event] | None = None  # background read-ahead
        self._stop_ahead = False  # asks the read-ahead task to stop after its current fetch
        self._behind: set[trio.CancelScope] = set()  # fetches that go on behind their read
        self._behind_idle = trio.Event()
        self._behind_idle.set()
        self.background_read_ahead = True  # off while a prefetch plan drives the fetching
        self.fetch_latencies = LatencyLog()  # seconds, one per range request
        self.bytes_fetched = 0
        self.bytes_served = 0
        self._windows = bytearray(self._files.blocks)  # 1: fetched by a window, not read yet
        self._window_blocks = 0  # fetched by windows
        self._window_reads = 0  # of those, read since
        self.requests = 0
        self.hits = 0  # blocks
        self.misses = 0  # blocks

    async def read_at(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length, self.digest)
        if length == 0:
            return b""
        readahead, stream, advancing = self._streams.readahead(offset, length)
        window = readahead
        if not window and (self._window_blocks - WINDOW_USE * self._window_reads) * BLOCK \
                <= WINDOW_ALLOWANCE:
            window = min(LOCALITY_WINDOW, self.bytes_served // 2)
        readahead, window = self._capped(readahead), self._capped(window)
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        files = self._files
        if files.present[first : last + 1].tobytes().find(0) >= 0:
            stream[2] = 1
        # Only a stream that has missed reads ahead in the background: one served from the
        # cache (warm, or prefetched from a trace) fetches nothing it does not read.
        if readahead and stream[2] and advancing:
            self._read_ahead_async(last, readahead, stream)
        for attempt in range(3):
            fetched, beyond = await self._ensure(first, last, window)
            beyond = min(beyond, len(self._windows) - last - 1)
            if beyond > 0 and not readahead:
                self._windows[last + 1 : last + 1 + beyond] = b"\x01" * beyond
                self._window_blocks += beyond
            data = os.pread(files.data_fd, (last + 1 - first) * BLOCK, first * BLOCK)
            bad = self._check(data, first, last)
            if not bad:
                self._cache._counters["hits"] += last + 1 - first - fetched
                self.hits += last + 1 - first - fetched
                files.touch(first, last)
                self._cache._counters["bytes_served"] += length
                self.bytes_served += length
                if self._window_blocks:
                    read = self._windows[first : last + 1].count(1)
                    if read:
                        self._windows[first : last + 1] = bytes(last + 1 - first)
                        self._window_reads += read
                start = offset - first * BLOCK
                if start == 0 and length == len(data):
                    return data
                # A view, not a copy: most reads are of ZFile chunks, which do not start on a
                # block (cold 256 MiB read, 8 interleaved rounds: 0.62 s -> 0.56 s).
                return memoryview(data)[start : start + length]
            self._cache._counters["corrupt_blocks"] += len(bad)
            level = logging.WARNING if attempt else logging.INFO
            log.log(level, "block cache: %d bad block(s) of %s (first %d); fetching again",
                    len(bad), self.digest, bad[0])
            self._cache._forget(files, bad)
        raise DeviceError(f"{self.digest}: cached blocks keep failing their checksum")

    def _read_ahead_async(self, last: int, readahead: int, stream: list[int]) -> None:
        """Fetch the rest of a sequential reader's window in the background once a quarter
        of it is missing, so the stream does not stop and wait for each window in turn
        (the kernel's asynchronous read-ahead, in blocks). One such task per source at a
        time; when a fetch lands it goes on with the window of where the stream has got to
        meanwhile, so the link stays busy while the reader keeps up. A failure is left to
        the read that needs the blocks."""
        if self._ahead is not None or self._closed or not self.background_read_ahead:
            return
        span = self._ahead_span(last, readahead)
        if span is None:
            return
        scope, done = trio.CancelScope(), trio.Event()
        self._ahead = scope, done
        self._stop_ahead = False

        async def fetch_ahead(start: int, end: int) -> None:
            READING_AHEAD.set(True)
            try:
                with scope:
                    while True:
                        await self._ensure(start, end, 0)
                        if self._stop_ahead or not self.background_read_ahead:
                            break
                        front = (stream[0] - 1) // BLOCK
                        next_span = self._ahead_span(
                            front, self._capped(self._streams.window(stream)))
                        if next_span is None:
                            break
                        start, end = next_span
            except Exception as exc:  # the reader that needs the blocks fetches them again
                log.debug("read-ahead of %s blocks %d-%d failed: %s", self.digest, start, end, exc)
            finally:
                self._ahead = None
                done.set()

        trio.lowlevel.spawn_system_task(fetch_ahead, *span,
                                        name=f"read-ahead {self.digest[:19]}")

    def _capped(self, window: int) -> int:
        """A window larger than a capped cache would evict itself: at most 1/8 of the cap."""
        return min(window, self._cache.capacity // 8) if self._cache.capacity else window

    def _ahead_span(self, last: int, readahead: int) -> tuple[int, int] | None:
        """The blocks after ``last`` to fetch ahead: from the first missing one to the end of
        the window, when at least a quarter of the window is missing (or the window reaches
        the end of the blob) and nobody fetches it."""
        files = self._files
        end = min(files.blocks - 1, last + readahead // BLOCK)
        hole = files.present[last + 1 : end + 1].tobytes().find(0)
        start = last + 1 + hole
        if hole < 0 or start in files.inflight:
            return None
        if (end + 1 - start) * BLOCK < readahead // 4 and end < files.blocks - 1:
            return None
        return start, end

    def _check(self, data: bytes, first: int, last: int) -> list[int]:
        """Blocks whose bytes do not match their recorded CRC (or that are not present)."""
        files = self._files
        flags = files.present[first : last + 1].tobytes()
        if flags.find(0) >= 0:
            return [first + i for i, flag in enumerate(flags) if not flag]
        # The last block of a blob may be short: its piece of ``data`` is then short too,
        # exactly as it was when its CRC was recorded.
        computed = _accel.crc32c_blocks(data, BLOCK)
        recorded = files.crcs[first : last + 1]
        if computed == recorded.tobytes():
            return []
        got = memoryview(computed).cast("I")
        bad = [first + i for i in range(len(got)) if got[i] != recorded[i]]
        return bad + list(range(first + len(got), last + 1))  # a short read: the rest too

    async def _ensure(self, first: int, last: int, readahead: int) -> tuple[int, int]:
        """Make blocks first..last present, fetching missing ones (and read-ahead).
        Returns how many of first..last this call fetched itself, and how many after them."""
        files = self._files
        inflight = files.inflight
        fetched = beyond = 0
        mine: list[_Claim] = []  # fetches this call started that go on behind the read
        while True:
            flags = files.present[first : last + 1].tobytes()
            hole = flags.find(0)
            if hole < 0:
                return fetched, beyond
            missing: list[int] = []
            waits: dict[int, trio.Event] = {}
            while hole >= 0:
                event = inflight.get(first + hole)
                if event is None:
                    missing.append(first + hole)
                else:
                    waits[id(event)] = event
                hole = flags.find(0, hole + 1)
            for claim in mine:  # a fetch this read started behind it failed for its blocks
                if claim.error is not None and any(claim.first <= b <= claim.last
                                                   for b in missing):
                    raise claim.error
            fetched += len(missing)
            extra = 0
            if missing and missing[-1] == last and readahead:
                extra_end = min(files.blocks - 1, last + readahead // BLOCK)
                stop = files.present[last + 1 : extra_end + 1].tobytes().find(1)
                if stop >= 0:
                    extra_end = last + stop
                block = last + 1
                while block <= extra_end and block not in inflight:
                    missing.append(block)
                    block += 1
                extra = block - last - 1
                beyond += extra
            if missing:
                # No await between the scan above and the claims here.
                claims = [_Claim(inflight, a, b) for a, b in _runs(missing)]
                if extra >= PIECE_BLOCKS and not self._closed:
                    # The read-ahead behind the read goes on without it: wait for the
                    # pieces of first..last only (they arrive first).
                    self._fetch_behind(claims)
                    mine += claims
                    for block in range(first, last + 1):
                        event = inflight.get(block)
                        if event is not None:
                            waits[id(event)] = event
                else:
                    try:
                        await run_concurrently([partial(self._fetch, claim) for claim in claims])
                    finally:
                        for claim in claims:
                            claim.release(inflight, claim.last)
            for event in waits.values():
                await event.wait()
            # Re-scan: a waited-for fetch may have failed; then we fetch it ourselves.

    def _fetch_behind(self, claims: list[_Claim]) -> None:
        """Fetch ``claims`` in a background task (in the context of the read that started
        them, so a trace recorder still sees whose they are). A failure is kept on its claim
        for that read to raise; other readers of the blocks fetch them again."""
        inflight = self._files.inflight
        scope = trio.CancelScope()
        self._behind.add(scope)
        if self._behind_idle.is_set():
            self._behind_idle = trio.Event()

        async def fetch_one(claim: _Claim) -> None:
            try:
                await self._fetch(claim)
            except Exception as exc:
                claim.error = exc
                log.debug("fetch of %s blocks %d-%d behind a read failed: %s", self.digest,
                          claim.first, claim.last, exc)
            finally:
                claim.release(inflight, claim.last)

        async def fetch_all() -> None:
            try:
                with scope:
                    await run_concurrently([partial(fetch_one, claim) for claim in claims])
            finally:
                for claim in claims:
                    claim.release(inflight, claim.last)
                self._behind.discard(scope)
                if not self._behind:
                    self._behind_idle.set()

        trio.lowlevel.spawn_system_task(fetch_all, name=f"fetch {self.digest[:19]}",
                                        context=contextvars.copy_context())

    async def _fetch(self, claim: _Claim) -> None:
        first, last = claim.first, claim.last
        offset = first * BLOCK
        length = min((last + 1) * BLOCK, self.size) - offset
        started = time.monotonic()
        landed = _Landed()
        token = None
        if last - first >= PIECE_BLOCKS:
            token = RANGE_PROGRESS.set(partial(self._arriving, claim, landed,
                                               trio.lowlevel.current_trio_token()))
        try:
            data = await self._remote.read_at(offset, length)
        except BaseException:
            if landed.published:  # what arrived before the failure is cached: count it
                self._count_fetch(landed.published, landed.published * BLOCK)
            raise
        finally:
            if token is not None:
                RANGE_PROGRESS.reset(token)
        self.fetch_latencies.append(time.monotonic() - started)
        if len(data) != length:
            raise DeviceError(f"{self.digest}: source returned {len(data)} of {length} bytes")
        self._count_fetch(last - first + 1, length)
        done = landed.published  # blocks already published while the body arrived
        if done <= last - first:
            rest = memoryview(data)[done * BLOCK :]
            if len(rest) >= _STORE_IN_THREAD:  # both release the GIL: the event loop goes on
                crcs = await trio.to_thread.run_sync(self._store, rest, offset + done * BLOCK)
            else:
                crcs = self._store(rest, offset + done * BLOCK)
            self._publish(first + done, last, crcs)

    def _count_fetch(self, blocks: int, nbytes: int) -> None:
        counters = self._cache._counters
        counters["requests"] += 1
        counters["misses"] += blocks
        counters["bytes_fetched"] += nbytes
        self.requests += 1
        self.misses += blocks
        self.bytes_fetched += nbytes

    def _arriving(self, claim: _Claim, landed: _Landed, trio_token: trio.lowlevel.TrioToken,
                  body: memoryview, received: int) -> None:
        """RANGE_PROGRESS callback (worker thread): hand each new whole piece of the body to
        the event loop, which stores and publishes it."""
        blocks = received // BLOCK // PIECE_BLOCKS * PIECE_BLOCKS
        if blocks <= landed.handed or landed.failed:
            return  # a retried read going over what has landed already, or a failed store
        start, landed.handed = landed.handed, blocks
        piece = body[start * BLOCK : blocks * BLOCK]  # final bytes: a view, not a copy
        with contextlib.suppress(trio.RunFinishedError):  # the loop has ended: drop it
            trio_token.run_sync_soon(self._land, claim, landed, start, piece)

    def _land(self, claim: _Claim, landed: _Landed, start: int, piece: memoryview) -> None:
        """Store and publish blocks ``start``.. of a fetch that is still arriving (trio
        thread), and wake the readers of the pieces they complete. A read abandoned by a
        cancelled fetch may still deliver: its bytes are good, but not once the files are
        closed."""
        if self._closed or self._files.closed or landed.failed:
            return
        first = claim.first + start
        last = first + len(piece) // BLOCK - 1
        try:  # a callback must not raise (trio would end the run): the fetch stores it
            self._publish(first, last, self._store(piece, first * BLOCK))
        except Exception as exc:
            landed.failed = True
            log.info("block cache: storing part of a fetch of %s failed: %s", self.digest, exc)
            return
        landed.published = start + len(piece) // BLOCK
        claim.release(self._files.inflight, last)

    def _publish(self, first: int, last: int, crcs: bytes) -> None:
        files = self._files
        newly = files.present[first : last + 1].tobytes().count(0)
        files.crcs[first : last + 1] = memoryview(crcs).cast("I")
        files.present[first : last + 1] = b"\x01" * (last + 1 - first)  # published last
        files.touch(first, last)  # fetched counts as used: unread read-ahead is not evicted first
        self._cache._added(files, newly * BLOCK)

    def _store(self, data: bytes | bytearray | memoryview, offset: int) -> bytes:
        """Write fetched bytes to the data file; their per-block CRCs (to publish)."""
        written = os.pwrite(self._files.data_fd, data, offset)
        if written != len(data):
            raise DeviceError(f"block cache: short write for {self.digest}")
        return _accel.crc32c_blocks(data, BLOCK)

    @property
    def remote(self) -> BlobSource:
        """The source misses are fetched from (a trace recorder observes its reads)."""
        return self._remote

    async def fill(self, offset: int, length: int) -> int:
        """Make the blocks of ``[offset, offset+length)`` present without reading them back
        and without read-ahead: the prefetcher's entry (``read_at`` would take its ordered
        spans for a sequential reader and fetch far beyond them). Shares in-flight fetches
        with concurrent readers. Returns the blocks this call fetched."""
        check_range(self, offset, length, self.digest)
        if length == 0:
            return 0
        return (await self._ensure(offset // BLOCK, (offset + length - 1) // BLOCK, 0))[0]

    async def fill_many(self, ranges: list[tuple[int, int]]) -> int:
        """``fill`` for several ranges: their missing blocks come in one multi-range request
        when the remote can do that (``read_ranges``), each run of blocks published as its
        part arrives. Returns the blocks this call fetched."""
        if len(ranges) < 2 or getattr(self._remote, "read_ranges", None) is None:
            fetched = 0
            for offset, length in ranges:
                fetched += await self.fill(offset, length)
            return fetched
        files = self._files
        inflight = files.inflight
        missing: set[int] = set()
        for offset, length in ranges:
            check_range(self, offset, length, self.digest)
            if not length:
                continue
            first, last = offset // BLOCK, (offset + length - 1) // BLOCK
            flags = files.present[first : last + 1].tobytes()
            hole = flags.find(0)
            while hole >= 0:
                if first + hole not in inflight:
                    missing.add(first + hole)
                hole = flags.find(0, hole + 1)
        # No await between the scan above and the claims here.
        claims = [_Claim(inflight, a, b) for a, b in _runs(sorted(missing))]
        if claims:
            try:
                await self._fetch_parts(claims)
            finally:
                for claim in claims:
                    claim.release(inflight, claim.last)
        fetched = len(missing)
        for offset, length in ranges:  # blocks others were fetching (or failed to)
            if length:
                fetched += (await self._ensure(offset // BLOCK,
                                               (offset + length - 1) // BLOCK, 0))[0]
        return fetched

    async def _fetch_parts(self, claims: list[_Claim]) -> None:
        """Fetch several claims in one multi-range request."""
        spans = [(c.first * BLOCK, min((c.last + 1) * BLOCK, self.size) - c.first * BLOCK)
                 for c in claims]
        landed = [False] * len(claims)
        trio_token = trio.lowlevel.current_trio_token()

        def on_part(body: memoryview, part: Part) -> None:  # worker thread
            with contextlib.suppress(trio.RunFinishedError):
                trio_token.run_sync_soon(self._land_part, claims, spans, landed, body, part)

        started = time.monotonic()
        data = await self._remote.read_ranges(spans, on_part)
        if data is None:  # the registry takes one range per request
            await self._fetch_split(claims)
            return
        self.fetch_latencies.append(time.monotonic() - started)
        self._count_fetch(sum(c.last + 1 - c.first for c in claims),
                          sum(length for _, length in spans))
        for i, claim in enumerate(claims):
            if landed[i]:
                continue
            if len(data[i]) != spans[i][1]:
                raise DeviceError(f"{self.digest}: source returned {len(data[i])} of "
                                  f"{spans[i][1]} bytes")
            self._publish(claim.first, claim.last, self._store(data[i], spans[i][0]))
            landed[i] = True

    async def _fetch_split(self, claims: list[_Claim]) -> None:
        """Fetch claims one request each, SPLIT_FETCHES at a time, each released (its
        readers woken) as soon as it has landed."""
        limiter = trio.CapacityLimiter(SPLIT_FETCHES)
        inflight = self._files.inflight

        async def one(claim: _Claim) -> None:
            async with limiter:
                try:
                    await self._fetch(claim)
                finally:
                    claim.release(inflight, claim.last)

        await run_concurrently([partial(one, claim) for claim in claims])

    def _land_part(self, claims: list[_Claim], spans: list[tuple[int, int]],
                   landed: list[bool], body: memoryview, part: Part) -> None:
        """Store and publish the claims a part of a multi-range answer holds (trio thread;
        must not raise: what fails here is stored at the end of the fetch)."""
        if self._closed or self._files.closed:
            return
        for i, (offset, length) in enumerate(spans):
            if landed[i] or not (part.start <= offset
                                 and offset + length <= part.start + part.length):
                continue
            at = part.body_offset + offset - part.start
            claim = claims[i]
            try:
                self._publish(claim.first, claim.last,
                              self._store(body[at : at + length], offset))
            except Exception as exc:
                log.info("block cache: storing part of a fetch of %s failed: %s",
                         self.digest, exc)
                return
            landed[i] = True
            claim.release(self._files.inflight, claim.last)

    async def settle(self) -> None:
        """Wait for the fetches in flight, background read-ahead included (so their bytes
        are counted before a final status or trace). Bounded: the read-ahead task stops
        after its current fetch, and fetches that start meanwhile are not waited for (twice
        over, so a read-ahead a read started meanwhile is caught too)."""
        for _ in range(2):
            if self._ahead is not None:
                self._stop_ahead = True
                await self._ahead[1].wait()
            for event in set(self._files.inflight.values()):
                await event.wait()

    async def aclose(self) -> None:
        """Stop reading through the cache (the remote is not closed: it is not ours)."""
        if not self._closed:
            self._closed = True
            await self.stop_background()  # their writes must end before the files close
            self._cache._release(self.digest)

    async def stop_background(self) -> None:
        """Cancel the background read-ahead and the fetches behind reads, and wait for them."""
        if self._ahead is not None:
            scope, done = self._ahead
            scope.cancel()
            await done.wait()
        for scope in self._behind:
            scope.cancel()
        await self._behind_idle.wait()

    async def invalidate(self, offset: int, length: int) -> None:
        """Forget the cached blocks of a range (a layer above found them bad)."""
        blocks = range(offset // BLOCK, (offset + max(length, 1) - 1) // BLOCK + 1)
        self._cache._forget(self._files, list(blocks))


class LatencyLog(Sequence[float]):
    """An append-only log of fetch latencies that keeps only the last ``keep`` in memory.

    Indexes are absolute (``len`` counts every value ever appended), so a reader that
    remembers how far it got can ask for ``log[seen:]`` (the metrics histogram does), while a
    long-running daemon's memory stays bounded; iteration yields the values kept.
    """

    def __init__(self, keep: int = 50_000) -> None:
        self._values: deque[float] = deque(maxlen=keep)
        self._total = 0

    def append(self, value: float) -> None:
        self._values.append(value)
        self._total += 1

    def __len__(self) -> int:
        return self._total

    def __iter__(self) -> Iterator[float]:
        return iter(self._values)

    def __getitem__(self, index):  # type: ignore[override]
        dropped = self._total - len(self._values)
        if isinstance(index, slice):
            start, stop, step = index.indices(self._total)
            first = max(start - dropped, 0)
            return list(islice(self._values, first, max(stop - dropped, first), step))
        if index < 0:
            index += self._total
        if not dropped <= index < self._total:
            raise IndexError("latency no longer kept")
        return self._values[index - dropped]


class _Streams:
    """Sequential-read detection over a few concurrent streams.

    The kernel's read-ahead sends several reads of one sequential stream at once, out of
    order, and a container reads several files at a time, so "this read starts where the
    last one ended" is too strict. A read belongs to a stream when it starts near (at most
    _NEAR before, _GAP after) where the stream got to. Its read-ahead is what the stream has
    read so far (at least _FIRST, at most MAX_READAHEAD): a stream that stops early has
    fetched at most about twice what it read (a locality window, CachedSource, aside).

    Why any read-ahead below a megabyte: ext4 places the files of a directory next to each
    other, so a start that imports modules one by one reads a "stream" of neighbouring small
    files; fetching ahead turns hundreds of round trips into a few (python3 -c "import numpy,
    pandas" on loopback: 5.7 s when read-ahead waited for 512 KiB of a stream, 3.4 s when it
    doubled per read from 64 KiB, but the doubling fetched more than a whole small image for
    a start that read a sixth of it).
    """

    _MAX = 8
    _NEAR = 4 << 20
    _GAP = 256 << 10
    _FIRST = 64 << 10

    def __init__(self) -> None:
        # [end offset, bytes read, missed (0/1)], most recent last
        self._streams: list[list[int]] = []

    def window(self, stream: list[int]) -> int:
        """The read-ahead of a stream: what it has read, within _FIRST..MAX_READAHEAD."""
        return min(max(stream[1], self._FIRST), MAX_READAHEAD)

    def readahead(self, offset: int, length: int) -> tuple[int, list[int], bool]:
        """The read-ahead for a read, the stream it belongs to, and whether the read moves
        the stream's front (a read behind it, e.g. the same range again, does not)."""
        for i, stream in enumerate(self._streams):
            end, done, _missed = stream
            if end - self._NEAR <= offset <= end + self._GAP:
                stream[0] = max(end, offset + length)
                stream[1] = done + length
                self._streams.append(self._streams.pop(i))
                return self.window(stream), stream, offset + length > end
        stream = [offset + length, length, 0]
        self._streams.append(stream)
        if len(self._streams) > self._MAX:
            self._streams.pop(0)
        return 0, stream, True


class _Claim:
    """Blocks ``first..last`` one fetch has claimed in ``inflight``, in pieces of
    PIECE_BLOCKS with an event each: a reader waits for its piece, not the whole fetch."""

    __slots__ = ("error", "events", "first", "last", "released")

    def __init__(self, inflight: dict[int, trio.Event], first: int, last: int) -> None:
        self.first, self.last = first, last
        self.events = [trio.Event() for _ in range((last - first) // PIECE_BLOCKS + 1)]
        for i, event in enumerate(self.events):
            start = first + i * PIECE_BLOCKS
            inflight.update(dict.fromkeys(range(start, min(last, start + PIECE_BLOCKS - 1) + 1),
                                          event))
        self.released = 0  # pieces
        self.error: Exception | None = None  # of a fetch in the background

    def release(self, inflight: dict[int, trio.Event], upto: int) -> None:
        """Release the pieces that end at or before block ``upto`` and wake their readers."""
        while self.released < len(self.events):
            start = self.first + self.released * PIECE_BLOCKS
            end = min(self.last, start + PIECE_BLOCKS - 1)
            if end > upto:
                return
            for block in range(start, end + 1):
                del inflight[block]
            self.events[self.released].set()
            self.released += 1


@dataclass(slots=True)
class _Landed:
    """How far a fetch's body has got: handed to the event loop (worker thread's count) and
    published (the event loop's), in blocks from the fetch's first."""

    handed: int = 0
    published: int = 0
    failed: bool = False  # storing a piece failed: the fetch stores the rest itself


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    per_run = MAX_FETCH // BLOCK
    for block in sorted(blocks):
        if runs and block == runs[-1][1] + 1 and block - runs[-1][0] < per_run:
            runs[-1] = (runs[-1][0], block)
        else:
            runs.append((block, block))
    return runs

"""A decompressing ``BlobSource`` over a ZFile blob, with a small cache of decoded chunks.

Opening reads the header (and the trailer unless the header carries HEADER_OVERWRITE) and
the jump table, once. A read maps its range to chunks and fetches them as one run (one
``read_at`` of the inner source, bounded in size), checks them (salted CRC32C) and
decompresses them, off the event loop when the batch is large. The edge chunks of each read
are kept decoded in an in-memory LRU, so neighbouring small reads decode a chunk once.
Sharing concurrent fetches is the job of the block cache below. A chunk that fails its
check is fetched once more (the inner source may be a cache holding a bad copy, see
``invalidate``); a second failure is a CorruptLayerError, never bad data.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import trio

from ..errors import CorruptLayerError, FormatError
from ..formats import zfile
from ._tasks import run_concurrently
from .source import BlobSource, check_range

__all__ = ["DecodedChunkCache", "ZFileSource", "open_zfile_index"]

log = logging.getLogger(__name__)

# A fetch run covers at most this many compressed bytes (one HTTP Range request).
MAX_RUN_BYTES = 4 * 1024 * 1024
# Decode inline below this many compressed bytes. A thread hop costs ~50-100 us; the native
# decoder does ~1 GB/s of lz4 output, so 256 KiB of input (~0.5 MiB out) takes about as long
# as a hop and blocks the event loop for well under a millisecond (STYLE rule 6).
INLINE_DECODE_BYTES = 256 * 1024

# One limiter for all CPU work handed to threads (decompression, CRC, hashing).
CPU_LIMITER = trio.CapacityLimiter(4)


class DecodedChunkCache:
    """LRU of decoded chunks keyed by (blob key, chunk number), bounded in bytes.

    Shared by every ZFileSource of a process; ``key`` is usually the blob digest.
    """

    def __init__(self, capacity: int = 64 * 1024 * 1024) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: str, chunk: int) -> bytes | None:
        data = self._entries.get((key, chunk))
        if data is not None:
            self._entries.move_to_end((key, chunk))
        return data

    def put(self, key: str, chunk: int, data: bytes) -> None:
        if self.capacity <= 0:
            return
        old = self._entries.pop((key, chunk), None)
        if old is not None:
            self._bytes -= len(old)
        self._entries[(key, chunk)] = data
        self._bytes += len(data)
        while self._bytes > self.capacity and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted)


async def open_zfile_index(inner: BlobSource) -> zfile.ZFileIndex:
    """Read and check the header, trailer (if needed) and jump table of a ZFile blob."""
    if inner.size < 2 * zfile.SLOT:
        raise CorruptLayerError(
            "zfile: blob too small", field="size", offset=0, expected=f">= {2 * zfile.SLOT}",
            actual=inner.size,
        )
    header = zfile.parse_header(await inner.read_at(0, zfile.SLOT))
    trailer = None
    if not header.flag(zfile.FLAG_OVERWRITE):
        trailer = await inner.read_at(inner.size - zfile.SLOT, zfile.SLOT)
    ht = zfile.index_header(header, trailer, inner.size)
    fill = getattr(inner, "fill", None)  # a cached blob's
    if fill is not None and ht.index_size and inner.size - ht.index_offset > TAIL_FILL:
        # A jump table larger than the open's tail fill (layer._read_head): the chunks
        # before it hold the LSMT trailer and index, read next; fetch them with it.
        start = max(0, ht.index_offset - LSMT_TABLES_FILL)
        await fill(start, min(inner.size, ht.index_offset + 4 * ht.index_size) - start)
    table = await inner.read_at(ht.index_offset, 4 * ht.index_size) if ht.index_size else b""
    return zfile.ZFileIndex.parse(ht, table)


# What opening a cached ZFile fetches ahead: its last TAIL_FILL bytes with its head (the
# jump table and the chunks of the LSMT tables before it, for most layers), and when the
# jump table starts before them, LSMT_TABLES_FILL bytes before the jump table with it.
TAIL_FILL = 256 << 10
LSMT_TABLES_FILL = 256 << 10


@dataclass
class ZFileStatistics:
    chunks_decoded: int = 0
    chunk_hits: int = 0
    bytes_decoded: int = 0
    crc_failures: int = 0


class ZFileSource:
    """The uncompressed view of a ZFile blob (``size`` = the original file size)."""

    def __init__(
        self,
        inner: BlobSource,
        index: zfile.ZFileIndex,
        *,
        key: str,
        chunk_cache: DecodedChunkCache | None = None,
    ) -> None:
        self._inner = inner
        self.index = index
        self.size = index.original_size
        self._key = key
        self._cache = chunk_cache if chunk_cache is not None else DecodedChunkCache(8 << 20)
        self.stats = ZFileStatistics()

    @classmethod
    async def open(
        cls,
        inner: BlobSource,
        *,
        key: str,
        chunk_cache: DecodedChunkCache | None = None,
    ) -> ZFileSource:
        try:
            index = await open_zfile_index(inner)
        except FormatError as exc:
            raise exc.with_digest(key) from None
        return cls(inner, index, key=key, chunk_cache=chunk_cache)

    async def check_chunks(self, first: int, last: int) -> None:
        """Fetch and check chunks first..last without caching them (``layer verify``)."""
        offset, length = self.index.compressed_span(first, last)
        raw = await self._inner.read_at(offset, length)
        try:
            await trio.to_thread.run_sync(
                zfile.decode_chunks, self.index, first, raw, last - first + 1,
                limiter=CPU_LIMITER,
            )
        except FormatError as exc:
            raise exc.with_digest(self._key) from None

    async def read_at(self, offset: int, length: int) -> bytes:
        check_range(self, offset, length, f"zfile {self._key}")
        if length == 0:
            return b""
        first, last = self.index.chunk_range(offset, length)
        base = first * self.index.chunk_size
        # Only the edge chunks go through the decoded-chunk cache: small reads that share a
        # chunk hit it; the interior of a large read is kept by the kernel's page cache.
        head = self._cache.get(self._key, first)
        tail = self._cache.get(self._key, last) if last != first else head
        if head is not None and last == first:
            self.stats.chunk_hits += 1
            return head[offset - base : offset - base + length]
        lo = first + 1 if head is not None else first
        hi = last - 1 if tail is not None else last
        parts: list[bytes] = []
        if head is not None:
            parts.append(head)
            self.stats.chunk_hits += 1
        if lo <= hi:
            parts.append(await self._decode_range(lo, hi))
        if tail is not None and last != first:
            parts.append(tail)
            self.stats.chunk_hits += 1
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if offset == base and length == len(data):
            return data
        return memoryview(data)[offset - base : offset - base + length]

    async def _decode_range(self, first: int, last: int) -> bytes:
        """Plaintext of chunks first..last: one inner read per run of at most MAX_RUN_BYTES
        compressed bytes (runs of a huge read are fetched concurrently)."""
        runs = self._runs(first, last)
        if len(runs) == 1:
            return await self._fetch_run(*runs[0])
        results: dict[int, bytes] = {}

        async def one(run_first: int, run_last: int) -> None:
            results[run_first] = await self._fetch_run(run_first, run_last)

        await run_concurrently([partial(one, a, b) for a, b in runs])
        return b"".join(results[a] for a, _ in runs)

    def _runs(self, first: int, last: int) -> list[tuple[int, int]]:
        starts = self.index.starts
        runs = []
        run_first = first
        for chunk in range(first + 1, last + 1):
            if starts[chunk + 1] - starts[run_first] > MAX_RUN_BYTES:
                runs.append((run_first, chunk - 1))
                run_first = chunk
        runs.append((run_first, last))
        return runs

    async def _fetch_run(self, first: int, last: int) -> bytes:
        offset, length = self.index.compressed_span(first, last)
        count = last - first + 1
        for attempt in (1, 2):
            raw = await self._inner.read_at(offset, length)
            try:
                if length < INLINE_DECODE_BYTES:
                    plain = zfile.decode_chunks(self.index, first, raw, count)
                else:
                    plain = await trio.to_thread.run_sync(
                        zfile.decode_chunks, self.index, first, raw, count, limiter=CPU_LIMITER
                    )
                break
            except CorruptLayerError as exc:
                self.stats.crc_failures += 1
                exc.with_digest(self._key)
                if attempt == 2:
                    raise
                log.warning("%s; fetching it again", exc)
                invalidate = getattr(self._inner, "invalidate", None)
                if invalidate is not None:
                    await invalidate(offset, length)
        size = self.index.chunk_size
        self._cache.put(self._key, first, plain[:size])
        if last != first:
            self._cache.put(self._key, last, plain[(count - 1) * size :])
        self.stats.chunks_decoded += count
        self.stats.bytes_decoded += len(plain)
        return plain

"""Prefetch: replay a trace (or a priority list of paths) into the block cache while the
workload runs.

Theory of operation
-------------------
A trace lists the per-layer reads of an earlier start, in order. Replaying them one by one,
as the original does with 16 workers, costs one round trip per record; the plan below first
*coalesces*: per layer, records closer than ``gap`` bytes are merged into spans of at most
``max_span`` bytes, each span ranked by the earliest record it holds, and spans are issued
in rank order by ``concurrency`` workers. So data the workload needs first is asked for
first, and a start arrives in large range requests instead of one per read (importing numpy
and pandas reads 87 MiB in ~1,050 reads: ~1,040 trace records became 156 requests).

A span is prefetched *below* decompression: its compressed range (via the ZFile jump table)
is filled into the layer's block-cache source, which fetches the missing blocks, checks and
stores them, with no read-ahead of its own. Nothing is decompressed twice, and a workload
read of the same blocks either finds them cached or waits for the prefetch's in-flight
fetch (the cache shares fetches).
Without a block cache there is nowhere to keep the bytes: the prefetcher then reads through
the decompressing source, which only warms the small decoded-chunk cache.

A priority list names files; their extents come from FIEMAP on the mounted filesystem
(physical offsets of the loop device = device offsets), mapped through the merged index to
layer ranges, then planned like a trace. FIEMAP makes the kernel read inodes and extent
trees through this very process, so it runs in a worker thread, never on the trio thread.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import os
import stat
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..errors import OverlaybdError, UsageError
from ..formats.trace import PriorityList, TraceFile
from .block_cache import CachedSource
from .trace_recorder import PREFETCHING

if TYPE_CHECKING:
    from .image import OpenImage

__all__ = [
    "DEFAULT_CONCURRENCY",
    "PrefetchRequest",
    "PrefetchStatistics",
    "Prefetcher",
    "device_ranges_of_paths",
    "plan_prefetch",
    "records_from_device_ranges",
    "records_from_trace",
    "run_prefetch",
]

log = logging.getLogger(__name__)

# The original uses 16 workers. Our registry client allows 16 requests in flight per host
# (ClientConfig.max_parallel) and serves them in arrival order, so 16 prefetch workers would
# queue every read the trace missed behind them: keep half the slots for the workload.
DEFAULT_CONCURRENCY = 8
# Merge records less than this far apart. On a slow link bytes are the cost (at 10 ms RTT
# and 200 Mbit/s a round trip costs as much as ~250 KB of transfer, shared by 8 requests in
# flight); on a fast one each request's fixed cost is (docker-registry ~4 ms of CPU, the
# client ~1 ms, on the cores the start runs on), and the bytes fetched should stay near the
# bytes read (the target is <= 1.5x). numpy + pandas start, lz4, prefetch variant (medians,
# bench/README.md): loopback 64 KiB 1.81-2.0 s, 128 KiB 1.77 s, 256 KiB 1.33-1.56 s, 1 MiB
# 1.45 s; 1 Gbit/2 ms 64/128/256 KiB 1.92/1.80/1.98 s (noise); 200 Mbit/10 ms 64 KiB 3.18 s,
# 128 KiB 3.18 s, 256 KiB 3.4 s, 1 MiB 3.9 s. 128 KiB loses nowhere; a node on a fast link
# can set more (config ``[prefetch] gap``). Choosing it per mount from the link did not
# work out: the mount's first fetches are too few and too slow (a cold registry, fresh
# connections), and a line fitted through the prefetch's first 16 fetches picked 1 MiB at
# 200 Mbit too (8 requests share the link, so a fetch's time hardly follows its own size).
DEFAULT_GAP = 128 * 1024
# Largest span (uncompressed LSMT bytes; ~1-2 MiB compressed, within the cache's 4 MiB per
# request). Each request costs the client ~1-2 ms of CPU and the registry ~4 ms whatever its
# size, and the start competes for the same two cores: on the numpy + pandas start at
# 200 Mbit/10 ms, 4 MiB spans (153 requests) finished ~0.5 s sooner than 1 MiB spans (224).
DEFAULT_MAX_SPAN = 4 * 1024 * 1024
# Where the registry answers multi-range requests (docker-registry does, from its own
# storage), neighbouring spans of a layer, in rank order, go in one request of at most
# BATCH_SPANS spans and BATCH_BYTES blob bytes, and half the workers run (each request may
# become two in flight when the registry turns out not to: see
# RegistryClient.read_blob_ranges). Every request costs docker-registry ~4-5 ms of CPU on
# the cores the start runs on. numpy + pandas start, lazy + prefetch, medians of 3, rounds
# alternating (bench/README.md): 200 Mbit/10 ms (zstd level 19) 1.50/1.50 s against
# 1.63/1.52 s, registry CPU 0.31 against 0.55 CPU-s; loopback (lz4) 1.12/1.02 s against
# 1.30/1.24 s. Larger batches or all 8 workers kept more in flight and arrived later in
# rank order (8 workers, 1 MiB: 1.62/1.57 s).
BATCH_SPANS = 16
BATCH_BYTES = 512 * 1024
MAX_LIST_FILES = 100_000

Record = tuple[int, int, int]  # (layer index, LSMT offset, length)


@dataclass(frozen=True, slots=True, order=True)
class PrefetchRequest:
    rank: int  # position of the earliest trace record the span holds
    layer: int
    offset: int  # bytes of the layer's uncompressed LSMT file
    length: int


@dataclass(frozen=True, slots=True)
class PrefetchStatistics:
    running: bool
    planned_requests: int
    planned_bytes: int  # uncompressed LSMT bytes the plan covers
    requests: int  # done
    bytes: int  # blob bytes read through the cache by the done requests
    failed: int
    skipped_records: int  # records naming a layer or range the image does not have
    seconds: float


def records_from_trace(trace: TraceFile) -> list[Record]:
    """The read records of a trace as (layer, offset, length); writes are ignored."""
    return [(r.layer_index, r.offset, r.count) for r in trace.reads()]


def records_from_device_ranges(image: OpenImage, ranges: Iterable[tuple[int, int]]
                               ) -> list[Record]:
    """Map device byte ranges through the merged index to per-layer records (holes and
    zeroed ranges need no fetch and are dropped)."""
    merged = image.device.merged
    size = image.device.size
    out: list[Record] = []
    for offset, length in ranges:
        offset, end = max(0, offset), min(size, offset + length)
        if end <= offset:
            continue
        out.extend((layer, layer_offset, n)
                   for layer, layer_offset, n in merged.lookup(offset, end - offset)
                   if layer >= 0)
    return out


def plan_prefetch(records: Sequence[Record], layer_sizes: Sequence[int], *,
                  gap: int = DEFAULT_GAP, max_span: int = DEFAULT_MAX_SPAN
                  ) -> tuple[list[PrefetchRequest], int]:
    """Coalesce ``records`` into spans (see the module docstring), in the order to fetch.

    Returns ``(requests, skipped)``: records naming a layer the image lacks or lying wholly
    outside its layer are skipped (a trace of another image); ranges are clipped to the
    layer. Spans never overlap and never exceed ``max_span`` bytes.
    """
    if gap < 0 or max_span <= 0:
        raise UsageError("prefetch: gap must be >= 0 and max_span > 0")
    per_layer: dict[int, list[tuple[int, int, int]]] = {}  # layer -> (start, end, rank)
    skipped = 0
    for rank, (layer, offset, length) in enumerate(records):
        if not 0 <= layer < len(layer_sizes):
            skipped += 1
            continue
        start, end = max(0, offset), min(layer_sizes[layer], offset + length)
        if end <= start:
            skipped += 1
            continue
        per_layer.setdefault(layer, []).append((start, end, rank))
    requests: list[PrefetchRequest] = []
    for layer, ranges in per_layer.items():
        ranges.sort()
        spans = _coalesce([(start, end) for start, end, _ in ranges], gap, max_span)
        starts = [start for start, _ in spans]
        ranks = [len(records)] * len(spans)
        for start, end, rank in ranges:  # a span is needed as early as any record it serves
            i = max(0, bisect.bisect_right(starts, start) - 1)
            while i < len(spans) and spans[i][0] < end:
                if spans[i][1] > start:
                    ranks[i] = min(ranks[i], rank)
                i += 1
        requests.extend(PrefetchRequest(rank, layer, start, end - start)
                        for (start, end), rank in zip(spans, ranks, strict=True))
    requests.sort()
    return requests, skipped


def _coalesce(ranges: list[tuple[int, int]], gap: int, max_span: int) -> list[tuple[int, int]]:
    """Sorted ranges -> disjoint spans: neighbours closer than ``gap`` merge while the span
    stays within ``max_span``; a longer single range is cut into ``max_span`` pieces."""
    spans: list[tuple[int, int]] = []
    cur_start, cur_end = ranges[0]
    for start, end in ranges[1:]:
        if end <= cur_end:
            continue
        if start <= cur_end + gap and end - cur_start <= max_span:
            cur_end = end
            continue
        spans.append((cur_start, cur_end))
        cur_start, cur_end = max(start, cur_end), end  # never fetch a byte twice
    spans.append((cur_start, cur_end))
    return [(pos, min(end, pos + max_span)) for start, end in spans
            for pos in range(start, end, max_span)]


# -- priority lists: paths -> device ranges (FIEMAP) ------------------------------------------

_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP = struct.Struct("=QQIIII")  # fm_start, fm_length, flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQ16xI12x")  # logical, physical, length, flags
_FIEMAP_FLAG_SYNC = 0x1
_EXTENT_LAST = 0x1
_EXTENT_UNUSABLE = 0x2 | 0x4 | 0x8 | 0x200  # unknown, delalloc, encoded, inline data
_BATCH = 256


def _fiemap(fd: int, size: int) -> list[tuple[int, int]]:
    """Physical (offset, length) byte extents of an open file."""
    out: list[tuple[int, int]] = []
    start = 0
    while start < size:
        buf = bytearray(_FIEMAP.size + _BATCH * _EXTENT.size)
        _FIEMAP.pack_into(buf, 0, start, size - start, _FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
        mapped = _FIEMAP.unpack_from(buf, 0)[3]
        if mapped == 0:
            break
        last = False
        for i in range(mapped):
            logical, physical, length, flags = _EXTENT.unpack_from(
                buf, _FIEMAP.size + i * _EXTENT.size)
            if not flags & _EXTENT_UNUSABLE:
                out.append((physical, length))
            start = logical + length
            last = bool(flags & _EXTENT_LAST)
        if last:
            break
    return out


def _resolve_in(root: str, path: str, limit: int = 40) -> str | None:
    """``path`` (absolute inside the image) as a host path under ``root``, following
    symlinks as the image sees them (absolute targets are relative to ``root``). None when
    it does not exist or loops."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        host = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(host)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > limit:
                return None
            target = os.readlink(host)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _files_of(root: str, path: str) -> list[str]:
    """Host paths of the regular files a list entry names (a directory: every file below)."""
    directory = path.endswith(("/", "*"))
    host = _resolve_in(root, path.rstrip("*"))
    if host is None:
        return []
    if not directory:
        return [host] if os.path.isfile(host) and not os.path.islink(host) else []
    found = []
    for dirpath, _dirs, files in os.walk(host):  # os.walk does not follow symlinked dirs
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            if not os.path.islink(p) and os.path.isfile(p):
                found.append(p)
    return found


def device_ranges_of_paths(root: str, paths: Iterable[str]) -> list[tuple[int, int]]:
    """Device byte ranges holding the data of the files ``paths`` names, in list order
    (blocking: FIEMAP on the filesystem mounted at ``root``; call it from a thread)."""
    ranges: list[tuple[int, int]] = []
    files = 0
    for path in paths:
        for host in _files_of(root, path):
            files += 1
            if files > MAX_LIST_FILES:
                log.info("priority list: more than %d files; ignoring the rest",
                         MAX_LIST_FILES)
                return ranges
            try:
                fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                ranges.extend(_fiemap(fd, os.fstat(fd).st_size))
            except OSError as exc:
                log.info("priority list: no extents for %s: %s", host, exc)
            finally:
                os.close(fd)
    return ranges


# -- running ----------------------------------------------------------------------------------


@dataclass
class Prefetcher:
    """Replays one plan into an open image. ``run`` once (in a nursery the caller owns);
    ``statistics`` any time."""

    image: OpenImage
    source: TraceFile | PriorityList
    concurrency: int = DEFAULT_CONCURRENCY
    root: str | None = None  # the mounted filesystem; needed for a priority list
    gap: int | None = DEFAULT_GAP  # None: DEFAULT_GAP
    max_span: int = DEFAULT_MAX_SPAN
    _plan: list[PrefetchRequest] = field(default_factory=list)
    _counters: dict[str, int] = field(default_factory=lambda: dict(
        requests=0, bytes=0, failed=0, skipped=0))
    _running: bool = False
    _started: float | None = None
    _ended: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise UsageError(f"prefetch concurrency must be >= 1, not {self.concurrency}")
        if isinstance(self.source, PriorityList) and self.root is None:
            raise UsageError("a priority list needs the mounted filesystem (root) to resolve")
        # The plan says what the start reads: speculative background read-ahead would only
        # compete with it for the link (reads that miss still read ahead as they fetch).
        for source in self.image.cached_sources:
            source.background_read_ahead = False

    def statistics(self) -> PrefetchStatistics:
        c = self._counters
        end = self._ended if self._ended is not None else (
            trio.current_time() if self._started is not None else 0.0)
        return PrefetchStatistics(
            self._running, len(self._plan), sum(r.length for r in self._plan),
            c["requests"], c["bytes"], c["failed"], c["skipped"],
            round(end - (self._started or end), 6),
        )

    async def plan(self) -> list[PrefetchRequest]:
        if isinstance(self.source, TraceFile):
            records = records_from_trace(self.source)
        else:
            assert self.root is not None
            ranges = await trio.to_thread.run_sync(
                device_ranges_of_paths, self.root, self.source.paths, abandon_on_cancel=True)
            records = records_from_device_ranges(self.image, ranges)
        sizes = [layer.lsmt.size for layer in self.image.layers]
        gap = DEFAULT_GAP if self.gap is None else self.gap
        plan, skipped = plan_prefetch(records, sizes, gap=gap, max_span=self.max_span)
        self._counters["skipped"] = skipped
        if skipped:
            log.info("prefetch: %d of %d records do not fit this image (another image's "
                     "trace?); skipped", skipped, len(records))
        return plan

    async def run(self) -> PrefetchStatistics:
        """Plan, then fetch every span; returns when all are done. A failed span is counted
        and logged, never raised: prefetch is an optimisation, reads still fetch on demand."""
        token = PREFETCHING.set(True)  # inherited by the worker tasks started below
        self._running = True
        self._started = trio.current_time()
        try:
            self._plan = await self.plan()
            queue = deque(self._plan)
            workers = self.concurrency
            if any(self._batching(i) for i in range(len(self.image.layers))):
                workers = max(1, self.concurrency // 2)
            async with trio.open_nursery() as nursery:
                for _ in range(min(workers, len(self._plan))):
                    nursery.start_soon(self._worker, queue)
        finally:
            self._running = False
            self._ended = trio.current_time()
            PREFETCHING.reset(token)
        stats = self.statistics()
        if stats.failed:
            log.warning("prefetch: %d of %d requests failed; those blocks load on demand",
                        stats.failed, stats.planned_requests)
        log.info("prefetch done: %d requests, %d blob bytes in %.3f s", stats.requests,
                 stats.bytes, stats.seconds)
        return stats

    async def _worker(self, queue: deque[PrefetchRequest]) -> None:
        while queue:  # shared queue: workers take spans in rank order
            batch = self._take_batch(queue)
            try:
                if len(batch) == 1:
                    nbytes = await self._fetch(batch[0])
                else:
                    nbytes = await self._fetch_batch(batch)
            except (OverlaybdError, OSError) as exc:
                self._counters["failed"] += len(batch)
                log.info("prefetch of layer %d at %d+%d (%d spans) failed: %s",
                         batch[0].layer, batch[0].offset, batch[0].length, len(batch), exc)
                continue
            self._counters["requests"] += len(batch)
            self._counters["bytes"] += nbytes

    def _blob_range(self, request: PrefetchRequest) -> tuple[int, int]:
        layer = self.image.layers[request.layer]
        base = layer.tar_offset or 0
        if layer.zfile is not None:
            start, length = layer.zfile.index.compressed_range(request.offset, request.length)
        else:
            start, length = request.offset, request.length
        return base + start, length

    def _take_batch(self, queue: deque[PrefetchRequest]) -> list[PrefetchRequest]:
        """The next span, and the spans after it of the same layer that fit in one
        multi-range request with it."""
        first = queue.popleft()
        batch = [first]
        if not self._batching(first.layer):
            return batch
        total = self._blob_range(first)[1]
        while queue and len(batch) < BATCH_SPANS and queue[0].layer == first.layer:
            length = self._blob_range(queue[0])[1]
            if total + length > BATCH_BYTES:
                break
            total += length
            batch.append(queue.popleft())
        return batch

    def _batching(self, layer: int) -> bool:
        """Whether spans of this layer go in multi-range requests."""
        blob = self.image.layers[layer].blob
        return isinstance(blob, CachedSource) and hasattr(blob.remote, "read_ranges")

    async def _fetch_batch(self, batch: list[PrefetchRequest]) -> int:
        layer = self.image.layers[batch[0].layer]
        assert isinstance(layer.blob, CachedSource)
        ranges = sorted({self._blob_range(r) for r in batch if r.length})
        await layer.blob.fill_many(ranges)
        return sum(length for _, length in ranges)

    async def _fetch(self, request: PrefetchRequest) -> int:
        layer = self.image.layers[request.layer]
        base = layer.tar_offset or 0
        if not isinstance(layer.blob, CachedSource):
            await layer.lsmt.read_at(request.offset, request.length)
            return 0
        if layer.zfile is not None:
            start, length = layer.zfile.index.compressed_range(request.offset, request.length)
        else:
            start, length = request.offset, request.length
        await layer.blob.fill(base + start, length)
        return length


async def run_prefetch(image: OpenImage, source: TraceFile | PriorityList, *,
                       concurrency: int = DEFAULT_CONCURRENCY, root: str | None = None,
                       gap: int = DEFAULT_GAP, max_span: int = DEFAULT_MAX_SPAN
                       ) -> PrefetchStatistics:
    """Prefetch ``source`` into ``image``'s block cache; see ``Prefetcher``."""
    return await Prefetcher(image, source, concurrency, root, gap, max_span).run()

"""Prometheus exposition of the node daemon's ``statistics()`` snapshots, and its endpoint.

``render`` turns a :class:`NodeStatistics` (built by the daemon from the FUSE, image and
block-cache statistics) into the Prometheus text format with ``prometheus_client``;
``serve_metrics`` answers ``GET /metrics`` on the configured address inside the daemon's
trio nursery. Nothing here reads the engine's objects directly; the only live state is
:class:`LatencyHistogram`, which folds fetch latencies into buckets as they arrive.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from . import __version__
from .config import parse_address
from .engine.block_cache import BlockCacheStatistics
from .errors import UsageError

__all__ = [
    "FETCH_BUCKETS",
    "LatencyHistogram",
    "MountStatistics",
    "NodeStatistics",
    "render",
    "serve_metrics",
]

log = logging.getLogger(__name__)

PREFIX = "overlaybd_py"
# Upper bounds (seconds) of the fetch latency histogram: one range request to a registry
# takes ~1 ms on loopback, tens of ms across a region, seconds when retried.
FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# generate_latest writes the classic text format (names escaped with underscores), which
# every Prometheus version reads under this content type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_REQUEST = 8192  # bytes of an HTTP request head we read before giving up
_REQUEST_TIMEOUT = 10.0  # seconds a scraper gets to send its request


class LatencyHistogram:
    """Bucket counts of latencies appended to growing lists (one list per blob source).

    ``update`` reads only what was appended since the previous call, so a scrape costs
    the new requests, not every request since the mount.
    """

    def __init__(self, bounds: Sequence[float] = FETCH_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._seen: list[int] = []
        self.sum = 0.0
        self.count = 0

    def update(self, lists: Sequence[Sequence[float]]) -> None:
        if len(self._seen) < len(lists):
            self._seen.extend([0] * (len(lists) - len(self._seen)))
        for i, values in enumerate(lists):
            for value in values[self._seen[i]:]:
                self._counts[bisect.bisect_left(self.bounds, value)] += 1
                self.sum += value
                self.count += 1
            self._seen[i] = len(values)

    def cumulative(self) -> tuple[int, ...]:
        """Counts of observations <= each bound, then the total (the +Inf bucket)."""
        out, running = [], 0
        for n in self._counts:
            running += n
            out.append(running)
        return tuple(out)


@dataclass(frozen=True, slots=True)
class MountStatistics:
    """One served mount: the FUSE counters of its block file and its image's fetches."""

    id: str
    image: str  # what the user or containerd asked for (reference or image-ref label)
    target: str
    owner: str  # "cli" or "snapshotter:<root>"
    serving: bool  # False while the daemon recovers it after a restart
    bytes_read: int
    reads: int
    bytes_written: int
    errors: int  # reads and writes answered with an error
    bytes_fetched: int
    requests: int  # range requests to the registry
    cache_hits: int  # 4 KiB blocks
    cache_misses: int
    fetch_buckets: tuple[int, ...]  # cumulative, per FETCH_BUCKETS bound, then +Inf
    fetch_seconds: float  # sum of fetch latencies


@dataclass(frozen=True, slots=True)
class NodeStatistics:
    started: float  # Unix time the daemon started
    mounts: tuple[MountStatistics, ...]
    cache: BlockCacheStatistics | None
    recoveries: int  # mounts re-served after a restart
    recovery_failures: int  # attempts to re-serve a mount that failed (and are retried)


def _per_mount(stats: NodeStatistics) -> Iterator[Metric]:
    labels = ["image", "target"]
    counters = {
        "image_read_bytes": ("Bytes read from the image's block device", "bytes_read"),
        "image_reads": ("Reads of the image's block device", "reads"),
        "image_written_bytes": ("Bytes written to the image's writable layer",
                                "bytes_written"),
        "image_fetched_bytes": ("Blob bytes fetched from registries", "bytes_fetched"),
        "image_fetch_requests": ("Range requests sent to registries", "requests"),
        "image_cache_hits": ("4 KiB blocks served from the block cache", "cache_hits"),
        "image_cache_misses": ("4 KiB blocks fetched because the cache lacked them",
                               "cache_misses"),
        "image_errors": ("Reads and writes of the block device that failed (EIO)", "errors"),
    }
    for name, (doc, attr) in counters.items():
        family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
        for m in stats.mounts:
            family.add_metric([m.image, m.target], getattr(m, attr))
        yield family
    serving = GaugeMetricFamily(f"{PREFIX}_image_serving",
                                "1 when the mount is served, 0 while it is being recovered",
                                labels=[*labels, "id", "owner"])
    hist = HistogramMetricFamily(f"{PREFIX}_image_fetch_duration_seconds",
                                 "Latency of range requests to registries", labels=labels)
    bounds = [*(repr(float(b)) for b in FETCH_BUCKETS), "+Inf"]
    for m in stats.mounts:
        serving.add_metric([m.image, m.target, m.id, m.owner], 1 if m.serving else 0)
        hist.add_metric([m.image, m.target], list(zip(bounds, m.fetch_buckets, strict=True)),
                        m.fetch_seconds)
    yield serving
    yield hist


def _global(stats: NodeStatistics) -> Iterator[Metric]:
    info = GaugeMetricFamily(f"{PREFIX}_build_info", "overlaybd-py version", labels=["version"])
    info.add_metric([__version__], 1)
    yield info
    yield GaugeMetricFamily(f"{PREFIX}_daemon_start_time_seconds",
                            "Unix time the node daemon started", value=stats.started)
    yield GaugeMetricFamily(f"{PREFIX}_mounts", "Mounts the daemon serves or recovers",
                            value=len(stats.mounts))
    yield CounterMetricFamily(f"{PREFIX}_recoveries", "Mounts re-served after a restart",
                              value=stats.recoveries)
    yield CounterMetricFamily(f"{PREFIX}_recovery_failures",
                              "Failed attempts to re-serve a mount after a restart",
                              value=stats.recovery_failures)
    cache = stats.cache
    if cache is None:
        return
    yield GaugeMetricFamily(f"{PREFIX}_cache_size_bytes", "Bytes held by the block cache",
                            value=cache.size)
    yield GaugeMetricFamily(f"{PREFIX}_cache_capacity_bytes",
                            "Size cap of the block cache (0: none)", value=cache.capacity)
    counters = {
        "cache_evictions": ("1 MiB regions evicted to stay under the cap", cache.evictions),
        "cache_evicted_bytes": ("Bytes evicted to stay under the cap", cache.evicted_bytes),
        "cache_hits": ("4 KiB blocks served from the cache", cache.hits),
        "cache_misses": ("4 KiB blocks fetched into the cache", cache.misses),
        "cache_fetched_bytes": ("Bytes fetched into the cache", cache.bytes_fetched),
        "cache_corrupt_blocks": ("Cached blocks that failed their checksum and were refetched",
                                 cache.corrupt_blocks),
    }
    for name, (doc, value) in counters.items():
        yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class _Snapshot:
    """A prometheus_client collector over one NodeStatistics."""

    def __init__(self, stats: NodeStatistics) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        yield from _global(self._stats)
        yield from _per_mount(self._stats)


def render(stats: NodeStatistics) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of ``stats``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats))
    return generate_latest(registry)


def _response(status: str, body: bytes, content_type: str, head_only: bool) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head if head_only else head + body


async def _answer(stream: trio.SocketStream, snapshot: Callable[[], NodeStatistics]) -> None:
    async with stream:
        request = b""
        with trio.move_on_after(_REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in request and len(request) < _MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                request += chunk
        parts = request.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            reply = _response("400 Bad Request", b"bad request\n", "text/plain", False)
        elif parts[0] not in (b"GET", b"HEAD"):
            reply = _response("405 Method Not Allowed", b"GET only\n", "text/plain", False)
        elif parts[1].split(b"?")[0] not in (b"/metrics", b"/"):
            reply = _response("404 Not Found", b"try /metrics\n", "text/plain", False)
        else:
            reply = _response("200 OK", render(snapshot()), CONTENT_TYPE,
                              parts[0] == b"HEAD")
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(reply)


async def serve_metrics(address: str, snapshot: Callable[[], NodeStatistics], *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``GET /metrics`` on ``address`` (``host:port``) until cancelled."""
    host, port = parse_address(address, "metrics address")
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {address}: {exc.strerror}") from None
    log.info("metrics at http://%s/metrics", address)
    async with trio.open_nursery() as nursery:
        task_status.started()
        await trio.serve_listeners(lambda s: _answer(s, snapshot), listeners,
                                   handler_nursery=nursery)

"""An image description (layer blobs, bottom first) -> cached, decompressed, merged device.

The engine does not know HTTP: the caller passes ``open_blob(digest, size)``, which returns
any ``BlobSource`` (the registry's range reader, a local file). Each remote blob is wrapped
by the block cache, then peeled (tar, ZFile) into its LSMT layer; all layers are opened
concurrently, so opening an N-layer image costs a few round trips, not N times a few.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import trio

from ..errors import UnsupportedFormatError
from ..formats.lsmt import Segments
from ._tasks import run_concurrently
from .block_cache import BlockCache, CachedSource
from .heap import compact_heap
from .layer import Layer, open_layer
from .layered import LayeredDevice
from .source import BlobSource
from .writable import WritableLayer
from .zfile_source import DecodedChunkCache

__all__ = ["ImageStatistics", "LayerBlob", "OpenImage", "open_image"]

log = logging.getLogger(__name__)

BlobOpener = Callable[[str, int], Awaitable[BlobSource]]

_EROFS_MAGIC = b"\xe2\xe1\xf5\xe0"


@dataclass(frozen=True, slots=True)
class LayerBlob:
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class ImageStatistics:
    bytes_fetched: int
    requests: int
    cache_hits: int
    cache_misses: int
    fetch_p50_ms: float
    fetch_p99_ms: float
    unverified_layers: list[str]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class OpenImage:
    """A ready device plus what ``status`` needs to report about it."""

    device: LayeredDevice
    layers: list[Layer]
    sources: list[BlobSource] = field(default_factory=list)  # cached sources, per layer
    remotes: list[BlobSource] = field(default_factory=list)

    @property
    def cached_sources(self) -> list[CachedSource]:
        return [source for source in self.sources if isinstance(source, CachedSource)]

    def statistics(self) -> ImageStatistics:
        latencies: list[float] = []
        fetched = requests = hits = misses = 0
        for source in self.cached_sources:
            latencies.extend(source.fetch_latencies)
            fetched += source.bytes_fetched
            requests += source.requests
            hits += source.hits
            misses += source.misses
        return ImageStatistics(
            bytes_fetched=fetched,
            requests=requests,
            cache_hits=hits,
            cache_misses=misses,
            fetch_p50_ms=round(_percentile(latencies, 0.50) * 1000, 3),
            fetch_p99_ms=round(_percentile(latencies, 0.99) * 1000, 3),
            unverified_layers=[layer.key for layer in self.layers if not layer.verified],
        )

    async def settle(self) -> None:
        """Let the fetches in flight finish, background read-ahead included (before a final
        status or trace)."""
        for source in self.cached_sources:
            await source.settle()

    async def aclose(self) -> None:
        for source in self.cached_sources:  # read-ahead stops, blob files are released
            await source.aclose()
        for remote in self.remotes:
            close = getattr(remote, "aclose", None)
            if close is not None:
                await close()
        if self.device.upper is not None:
            await self.device.upper.fsync()
            self.device.upper.close()


async def open_image(
    blobs: list[LayerBlob],
    open_blob: BlobOpener,
    *,
    cache: BlockCache | None = None,
    chunk_cache: DecodedChunkCache | None = None,
    upper: WritableLayer | None = None,
) -> OpenImage:
    """Open every layer (concurrently) and stack them into a device."""
    layers: list[Layer | None] = [None] * len(blobs)
    sources: list[BlobSource | None] = [None] * len(blobs)
    remotes: list[BlobSource | None] = [None] * len(blobs)

    async def one(i: int, blob: LayerBlob) -> None:
        remote = await open_blob(blob.digest, blob.size)
        remotes[i] = remote
        source = cache.source(remote, blob.digest) if cache is not None else remote
        sources[i] = source
        layers[i] = await open_layer(source, key=blob.digest, chunk_cache=chunk_cache)

    with compact_heap():  # index building peaks at several times the index's final size
        try:
            await run_concurrently([partial(one, i, blob) for i, blob in enumerate(blobs)])
        except BaseException:
            for remote in remotes:
                if remote is not None and hasattr(remote, "aclose"):
                    with trio.CancelScope(shield=True):
                        await remote.aclose()
            raise
        device = LayeredDevice([layer for layer in layers if layer is not None], upper)
        for layer in device.layers:
            # The merged index answers every read; the per-layer tables (22 bytes a record)
            # would only double the memory of a large image.
            layer.segments = Segments()
    await _check_filesystem(device)
    return OpenImage(device, list(device.layers), [s for s in sources if s is not None],
                     [r for r in remotes if r is not None])


async def _check_filesystem(device: LayeredDevice) -> None:
    """Refuse erofs images clearly (we mount ext4 only); anything else is left to mount."""
    head = await device.read_at(1024, 64)
    if head[:4] == _EROFS_MAGIC:
        raise UnsupportedFormatError(
            "this image holds an erofs filesystem; overlaybd-py mounts ext4 images only",
            field="superblock", offset=1024,
        )

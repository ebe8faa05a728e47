"""Open one overlaybd layer blob: peel the tar wrapper and the ZFile, then read the LSMT index.

A blob may be ``[tar] -> [zfile] -> sealed LSMT`` in any of the combinations the original
accepts; each wrapper is detected from its magic. The result, ``Layer``, exposes the sealed
LSMT file as a ``BlobSource`` (``lsmt``) plus its trailer and checked index.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from ..errors import CorruptLayerError, FormatError
from ..formats import lsmt, tar_wrapper, zfile
from ..formats.lsmt import HT_SPACE, LsmtHeader, Segments
from ._tasks import run_concurrently
from .source import BlobSource, FileSource, SliceSource
from .writable import WritableLayer
from .zfile_source import TAIL_FILL, DecodedChunkCache, ZFileSource

__all__ = ["Layer", "open_layer", "unwrap_tar", "writable_as_layer"]

log = logging.getLogger(__name__)


@dataclass
class Layer:
    """A sealed layer ready for reads: ``lsmt`` is the (decompressed) LSMT file."""

    key: str  # digest or path: names the blob in messages and caches
    blob: BlobSource  # the blob as stored
    lsmt: BlobSource  # the sealed LSMT file inside it
    header: LsmtHeader
    trailer: LsmtHeader
    segments: Segments
    tar_offset: int | None = None  # where the payload starts, when tar-wrapped
    zfile: ZFileSource | None = None

    @property
    def kind(self) -> str:
        return "zfile" if self.zfile is not None else "lsmt"

    @property
    def virtual_size(self) -> int:
        return self.trailer.virtual_size

    @property
    def verified(self) -> bool:
        """True when every data byte is covered by a checksum (ZFile with verify)."""
        return self.zfile is not None and self.zfile.index.header.verify


async def unwrap_tar(blob: BlobSource, head: bytes) -> tuple[BlobSource, int | None]:
    """The payload of a tar-wrapped blob and its offset, or the blob itself and None.

    ``head`` is the blob's first bytes (``tar_wrapper.HEAD_PROBE`` suffice).
    """
    if not tar_wrapper.is_tar(head):
        return blob, None
    payload = tar_wrapper.find_payload(head, blob.size)
    return SliceSource(blob, payload.offset, payload.size), payload.offset


# Opening a layer reads its blob's head (ZFile header, then the first chunk for the LSMT
# header) and its tables, which sit at the end (ZFile trailer and jump table, 4 bytes a
# chunk, and before them the chunks of the LSMT trailer and index): five round trips one
# after another on a cold cache. A cached blob fetches its first 128 KiB and its last
# 256 KiB at once instead, and the opening reads them from the cache. 256 KiB holds both
# tables of a 64 KiB-chunk ZFile of up to ~2 GiB, or of a 4 KiB-chunk one of ~100 MiB; a
# larger one reads what is missing as before.
HEAD_FILL = 128 << 10


async def _read_head(blob: BlobSource) -> bytes:
    """The blob's first ``HEAD_PROBE`` bytes, its head and tail fetched into the cache first
    when it has one."""
    fill = getattr(blob, "fill", None)  # a CachedSource's: into the cache, no read-ahead
    if fill is not None:
        head = min(HEAD_FILL, blob.size)
        tail = max(head, blob.size - TAIL_FILL)
        await run_concurrently([lambda: fill(0, head), lambda: fill(tail, blob.size - tail)])
    return await blob.read_at(0, min(tar_wrapper.HEAD_PROBE, blob.size))


async def _peel(blob: BlobSource, key: str, chunk_cache: DecodedChunkCache | None):
    """Return (tar payload offset or None, zfile source or None, the LSMT source)."""
    if blob.size < tar_wrapper.BLOCK:
        raise CorruptLayerError(
            "layer blob too small to be a layer", field="size", offset=0,
            expected=f">= {2 * HT_SPACE}", actual=blob.size,
        )
    head = await _read_head(blob)
    inner, tar_offset = await unwrap_tar(blob, head)
    if tar_offset is not None:
        head = await inner.read_at(0, min(512, inner.size))
    zsource = None
    if zfile.is_zfile(head):
        zsource = await ZFileSource.open(inner, key=key, chunk_cache=chunk_cache)
        inner = zsource
        head = await inner.read_at(0, min(HT_SPACE, inner.size))
    if not lsmt.is_lsmt(head):
        raise CorruptLayerError(
            "not an overlaybd layer: no LSMT, ZFile or tar magic", field="magic", offset=0,
            expected=lsmt.MAGIC0, actual=bytes(head[:8]),
        )
    return tar_offset, zsource, inner


async def writable_as_layer(layer: WritableLayer, key: str) -> Layer:
    """A read-only view of a writable layer, usable as a lower before it is sealed.

    Its index maps device sectors to sectors of the data file, which is exactly how a
    sealed layer's index maps into its LSMT file, so the data file serves as ``lsmt``. The
    converter stacks layer i+1 on this view while layer i is sealed and compressed.
    """
    data = await FileSource.open(layer.paths[0])
    segments = layer.index.segments()
    trailer = replace(layer.header, flags=lsmt.FLAG_DATA | lsmt.FLAG_SEALED)
    return Layer(key=key, blob=data, lsmt=data, header=layer.header, trailer=trailer,
                 segments=segments)


async def open_layer(
    blob: BlobSource, *, key: str, chunk_cache: DecodedChunkCache | None = None
) -> Layer:
    """Open a sealed layer blob (plain, ZFile or tar-wrapped). Raises FormatError naming
    ``key`` when the blob is not a layer overlaybd-py can read."""
    try:
        tar_offset, zsource, source = await _peel(blob, key, chunk_cache)
        if source.size < 2 * HT_SPACE:
            raise CorruptLayerError(
                "lsmt: file too small for header and trailer", field="size", offset=0,
                expected=f">= {2 * HT_SPACE}", actual=source.size,
            )
        header = LsmtHeader.unpack(await source.read_at(0, HT_SPACE), 0)
        if not header.is_header or not header.is_data_file:
            raise CorruptLayerError(
                "lsmt header: flags must say header of a data file", field="flags", offset=28,
                expected=lsmt.FLAG_HEADER | lsmt.FLAG_DATA, actual=header.flags,
            )
        trailer_offset = source.size - HT_SPACE
        trailer = LsmtHeader.unpack(await source.read_at(trailer_offset, HT_SPACE), trailer_offset)
        lsmt.check_trailer(trailer, source.size)
        raw_index = await source.read_at(trailer.index_offset, trailer.index_size * 16)
        segments = lsmt.parse_sealed_index(raw_index, trailer)
    except FormatError as exc:
        raise exc.with_digest(key) from None
    return Layer(
        key=key, blob=blob, lsmt=source, header=header, trailer=trailer, segments=segments,
        tar_offset=tar_offset, zfile=zsource,
    )

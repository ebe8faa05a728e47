"""The virtual block device: N sealed layers under one merged index, plus an optional
writable upper layer.

Reads consult the upper layer first (its records win; zeroed records read as zeros), then
the merged index of the lower layers; pieces that are contiguous in one layer's file are
read with a single ``read_at`` so that the ZFile source below can coalesce its fetches.
Pieces of different layers are read concurrently. Writes go to the upper layer only; the
lower blobs are never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import trio

from ..errors import DeviceError, UsageError
from ..formats.lsmt import SECTOR
from ..formats.merged_index import MergedIndex
from ._tasks import run_concurrently
from .layer import Layer
from .writable import WritableLayer

__all__ = ["LayeredDevice", "device_size"]

log = logging.getLogger(__name__)


def device_size(layers: Sequence[Layer], upper: WritableLayer | None) -> int:
    """The topmost non-zero virtual size (spec 3.2); the upper's when it has one."""
    if upper is not None and upper.virtual_size:
        return upper.virtual_size
    for layer in reversed(layers):
        if layer.virtual_size:
            return layer.virtual_size
    raise UsageError("no layer declares a virtual size; cannot size the device")


@dataclass
class DeviceStatistics:
    bytes_read: int = 0
    bytes_written: int = 0
    reads: int = 0
    writes: int = 0


class LayeredDevice:
    """``BlobSource`` of the merged device (``size`` = virtual size), writable with an upper."""

    def __init__(self, layers: Sequence[Layer], upper: WritableLayer | None = None,
                 merged: MergedIndex | None = None) -> None:
        self.layers = list(layers)
        self.upper = upper
        self.merged = merged if merged is not None else MergedIndex.build(
            [layer.segments for layer in self.layers]
        )
        self.size = device_size(self.layers, upper)
        self.stats = DeviceStatistics()
        # Serialises writes: a read-modify-write awaits between its read and its write.
        self._write_lock = trio.Lock()

    @property
    def writable(self) -> bool:
        return self.upper is not None

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DeviceError(f"device access {offset}+{length} beyond its {self.size} bytes")

    async def read_at(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        self.stats.reads += 1
        self.stats.bytes_read += length
        if self.upper is None:
            pieces = self.merged.lookup(offset, length)
            if len(pieces) == 1:
                # The common case of a read-only image: one layer holds the whole range (or
                # nobody does). No assembly buffer, no copies.
                layer, layer_offset, _ = pieces[0]
                if layer < 0:
                    return bytes(length)
                return await self.layers[layer].lsmt.read_at(layer_offset, length)
            out = bytearray(length)
            await self._read_lower(out, offset, offset, length)
            return out  # the assembly buffer itself: a copy of it would be one more pass
        out = bytearray(length)
        lower_parts = []
        for piece in self.upper.lookup(offset, length):
            at = piece.offset - offset
            if piece.kind == "data":
                out[at : at + piece.length] = self.upper.read_data(piece.moffset, piece.length)
            elif piece.kind == "lower":
                lower_parts.append(piece)
        if lower_parts:
            await run_concurrently([
                partial(self._read_lower, out, offset, piece.offset, piece.length)
                for piece in lower_parts
            ])
        return out

    async def _read_lower(self, out: bytearray, base: int, offset: int, length: int) -> None:
        """Fill ``out[offset-base : ...+length]`` from the lower layers."""
        runs: list[list[int]] = []  # [layer, layer offset, length, device offset]
        pos = offset
        for layer, layer_offset, piece_length in self.merged.lookup(offset, length):
            if layer >= 0:
                last = runs[-1] if runs else None
                if last and last[0] == layer and last[1] + last[2] == layer_offset \
                        and last[3] + last[2] == pos:
                    last[2] += piece_length
                else:
                    runs.append([layer, layer_offset, piece_length, pos])
            pos += piece_length  # zero pieces: ``out`` is already zero-filled
        if runs:
            await run_concurrently([partial(self._read_run, out, base, *run) for run in runs])

    async def _read_run(self, out: bytearray, base: int, layer: int, layer_offset: int,
                        length: int, device_offset: int) -> None:
        source = self.layers[layer].lsmt
        data = await source.read_at(layer_offset, length)
        at = device_offset - base
        out[at : at + length] = data

    async def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset``; unaligned edges are read, merged and rewritten."""
        if self.upper is None:
            raise DeviceError("the device is read-only")
        length = len(data)
        self._check(offset, length)
        self.stats.writes += 1
        self.stats.bytes_written += length
        start = offset - offset % SECTOR
        end = offset + length + (-(offset + length) % SECTOR)
        async with self._write_lock:
            if start != offset or end != offset + length:
                # Read-modify-write of the partial sectors at either end.
                buf = bytearray(await self.read_at(start, end - start))
                buf[offset - start : offset - start + length] = data
                data = bytes(buf)
            self.upper.write(start, data)

    async def discard(self, offset: int, length: int) -> None:
        """TRIM: the whole sectors inside the range read as zeros afterwards."""
        if self.upper is None:
            raise DeviceError("the device is read-only")
        self._check(offset, length)
        start = offset + (-offset % SECTOR)
        end = (offset + length) - (offset + length) % SECTOR
        if end > start:
            self.upper.discard(start, end - start)

"""The merged index of a stack of sealed layers: one sorted table, top layer wins.

Pure (spec section 1.6). Built once per mounted image from every layer's index; a device
read asks ``lookup`` which layer holds each part of a byte range. Records live in flat
columns (``Segments``), and the heavy loops run in ``_accel`` (native when built), since a
large image has millions of records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .. import _accel
from ..errors import UsageError
from .lsmt import SECTOR, Segments

__all__ = ["MAX_LAYERS", "MergedIndex", "Piece"]

MAX_LAYERS = 255  # the merged record's tag is 8 bits
Piece = tuple[int, int, int]  # (layer or -1 for zeros, byte offset in that layer, byte length)


@dataclass(frozen=True, slots=True)
class MergedIndexStatistics:
    layers: int
    records: int
    mapped_bytes: int


class MergedIndex:
    """Sorted data records of all layers, each tagged with its layer (0 = bottom)."""

    __slots__ = ("_layer_count", "segments")

    def __init__(self, segments: Segments, layer_count: int) -> None:
        self.segments = segments
        self._layer_count = layer_count

    @classmethod
    def build(cls, layers: Sequence[Segments]) -> MergedIndex:
        """Stack ``layers`` (bottom first; each sorted and non-overlapping, as the layer
        parser guarantees)."""
        if len(layers) > MAX_LAYERS:
            raise UsageError(f"an image may stack at most {MAX_LAYERS} layers, got {len(layers)}")
        merged = _accel.merge([layer.columns() for layer in layers])
        return cls(Segments.from_columns(merged), len(layers))

    def __len__(self) -> int:
        return len(self.segments)

    def lookup(self, offset: int, length: int) -> list[Piece]:
        """Split the device byte range ``[offset, offset+length)`` into pieces.

        Each piece is ``(layer, byte offset in that layer's LSMT file, length)``, or
        ``(-1, 0, length)`` for bytes no layer maps (they read as zeros). The pieces
        cover the range exactly, in order.
        """
        if length <= 0:
            return []
        s = self.segments
        return _accel.lookup(s.offset, s.length, s.moffset, s.tag, offset, length)

    def statistics(self) -> MergedIndexStatistics:
        return MergedIndexStatistics(
            layers=self._layer_count,
            records=len(self.segments),
            mapped_bytes=sum(self.segments.length) * SECTOR,
        )

"""Per-layer progress of a conversion: a live display on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from ..formats.oci import Descriptor

__all__ = ["Progress"]

log = logging.getLogger(__name__)


class Progress:
    """Tracks each layer's phase (mkfs, apply, seal, upload, done) and bytes."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
        self.enabled = enabled
        self._rows: list[list] = []  # [short digest, phase, done bytes, total bytes]
        self._platform = ""
        self._drawn = 0
        self._last_draw = 0.0

    def start_image(self, platform: str, layers: Sequence[Descriptor]) -> None:
        self._platform = platform
        self._rows = [[d.digest.partition(":")[2][:12], "waiting", 0, d.size] for d in layers]
        self._drawn = 0
        if self.enabled and not self.live:
            print(f"converting {len(layers)} layers for {platform}", file=self.stream,
                  flush=True)

    def phase(self, index: int, phase: str, total: int | None = None) -> None:
        row = self._rows[index]
        row[1] = phase
        if total is not None:
            row[2], row[3] = 0, total
        self._report(index)

    def bytes(self, index: int, done: int) -> None:
        self._rows[index][2] = done
        if self.live and time.monotonic() - self._last_draw > 0.2:
            self._draw()

    def layer_done(self, index: int, how: str) -> None:
        self._rows[index][1] = how
        self._report(index)

    def _report(self, index: int) -> None:
        if not self.enabled:
            return
        if self.live:
            self._draw()
            return
        digest, phase, _, total = self._rows[index]
        print(f"layer {index + 1}/{len(self._rows)} {digest}: {phase}"
              + (f" ({total} bytes)" if phase in ("apply", "upload") else ""),
              file=self.stream, flush=True)

    def _draw(self) -> None:
        self._last_draw = time.monotonic()
        out = self.stream
        if self._drawn:
            out.write(f"\x1b[{self._drawn}A")
        for i, (digest, phase, done, total) in enumerate(self._rows):
            pct = f"{100 * done / total:5.1f}%" if total and phase in ("apply", "upload") else ""
            out.write(f"\x1b[2K layer {i + 1}/{len(self._rows)} {digest} {phase:<8} {pct}\n")
        self._drawn = len(self._rows)
        out.flush()

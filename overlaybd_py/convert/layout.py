"""Where a converted layer puts its files: the order their data is written to the ext4.

The converter writes each layer's files through the kernel's ext4 in one pinned thread with
``nodelalloc``, so blocks follow the order of the writes. In tar order a package's sources
sit between the files a start reads: ``numpy/core/*.py`` next to ``numpy/core/*.so`` and the
``__pycache__`` bytecode. A lazy start fetches what follows each miss (the block cache's
locality windows, the kernel's read-ahead), so those never-read sources ride along.

``cold-last`` (the default) writes the data of *cold files* after every other file of the
same layer (``tar_apply``'s ``defer``): sources and headers that a starting process does not
read because a compiled form is there (Python reads a module's ``.py`` only to compile it
again when its ``__pycache__`` bytecode is stale or missing; C, C++ and Cython sources and
headers feed compilers). Everything else keeps tar order, and so do the cold files among
themselves, at the end. The filesystem's contents are the same; only block placement moves.
In an image without bytecode the ``.py`` files are read at startup, from their own contiguous
run instead of beside the extension modules. ``tar`` keeps tar order throughout.

Measured on the cold-start benchmark (``bench/README.md``): ``import numpy, pandas`` at
200 Mbit/10 ms (zstd 64 KiB) fetched 56.5-58.4 MiB lazily instead of 64.3-64.6 MiB in
112 requests instead of 121, and its trace prefetch took 123 requests instead of 152.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["COLD_SUFFIXES", "DEFAULT_LAYOUT", "LAYOUTS", "cold_file", "deferral"]

LAYOUTS = ("cold-last", "tar")
DEFAULT_LAYOUT = "cold-last"
COLD_SUFFIXES = (".py", ".pyi", ".pxd", ".pyx", ".c", ".h", ".cc", ".cpp", ".hpp")


def cold_file(path: str) -> bool:
    """A file whose data ``cold-last`` writes at the end of its layer."""
    return path.endswith(COLD_SUFFIXES)


def deferral(layout: str) -> Callable[[str], bool] | None:
    """The ``defer`` predicate ``tar_apply`` takes for ``layout`` (None: tar order)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    return cold_file if layout == "cold-last" else None

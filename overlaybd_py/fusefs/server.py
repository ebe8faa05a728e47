"""The FUSE mount's lifecycle: mount, serve inside a trio nursery, unmount.

pyfuse3 keeps global state, so a process serves at most one FUSE file system; the node
daemon (or a ``--foreground`` mount) owns it and adds images to it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pyfuse3
import trio

from ..engine.heap import keep_large_buffers
from ..errors import MountError
from .fs import BlockFs

__all__ = ["serve_blockfs"]

log = logging.getLogger(__name__)

# Concurrent request handlers: reads of different blocks proceed in parallel while some
# wait on the network; beyond ~64 more tasks only add scheduling overhead.
MAX_TASKS = 64


@asynccontextmanager
async def serve_blockfs(mountpoint: str) -> AsyncIterator[BlockFs]:
    """Mount a BlockFs at ``mountpoint`` and serve it until the block exits."""
    os.makedirs(mountpoint, exist_ok=True)
    keep_large_buffers()
    fs = BlockFs()
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"fsname=overlaybd-py", "subtype=overlaybd-py", "default_permissions"}
    try:
        pyfuse3.init(fs, mountpoint, options)
    except RuntimeError as exc:
        raise MountError(f"cannot mount FUSE at {mountpoint}: {exc} (is /dev/fuse usable and "
                         "are you root?)") from exc
    log.info("FUSE file system mounted at %s", mountpoint)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main, 1, MAX_TASKS)
            try:
                yield fs
            finally:
                pyfuse3.terminate()
    finally:
        pyfuse3.close(unmount=True)
        log.info("FUSE file system at %s unmounted", mountpoint)

"""The node daemon (and the ``--foreground`` server): serving images over FUSE + loop + ext4,
the control API, metrics, and the records that let a restart re-serve what was mounted.

``_server`` owns the trio nursery and the mounts, ``_records`` what is left on disk and its
clean-up, ``_clients`` registry access with credential reload.
"""

import importlib
from typing import Any

from ..config import DAEMON_DIR
from ._records import (
    LayerSpec,
    MountRecord,
    cleanup_stale,
    dead_server_dirs,
    read_records,
    remove_unserved,
    server_dirs,
    socket_of,
)

__all__ = [
    "DAEMON_DIR",
    "LayerSpec",
    "MountRecord",
    "NodeServer",
    "cleanup_stale",
    "dead_server_dirs",
    "read_records",
    "remove_unserved",
    "run_foreground",
    "serve_control",
    "serve_until_stopped",
    "server_dirs",
    "socket_of",
]

# The serving side (trio, FUSE, the engine) loads on first use, so that the CLI's status and
# umount, which only read the records, start quickly.
_SERVING = {"NodeServer": "_server", "run_foreground": "_server",
            "serve_until_stopped": "_server", "serve_control": "_control"}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SERVING))


def __getattr__(name: str) -> Any:
    module = _SERVING.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

"""The node daemon (and the ``--foreground`` server): serving images over FUSE + loop + ext4,
the control API, metrics, and the records that let a restart re-serve what was mounted.

``_server`` owns the trio nursery and the mounts, ``_records`` what is left on disk and its
clean-up, ``_clients`` registry access with credential reload.
"""

from ..config import DAEMON_DIR
from ._control import serve_control
from ._records import (
    LayerSpec,
    MountRecord,
    cleanup_stale,
    read_records,
    remove_unserved,
    server_dirs,
    socket_of,
)
from ._server import NodeServer, run_foreground, serve_until_stopped

__all__ = [
    "DAEMON_DIR",
    "LayerSpec",
    "MountRecord",
    "NodeServer",
    "cleanup_stale",
    "read_records",
    "remove_unserved",
    "run_foreground",
    "serve_control",
    "serve_until_stopped",
    "server_dirs",
    "socket_of",
]

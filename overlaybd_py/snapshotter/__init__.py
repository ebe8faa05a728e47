"""containerd integration: the snapshots v1 gRPC service (``overlaybd-py snapshotter``) and
the ``pull`` client that commits remote snapshots through containerd.

Depends on the node daemon only through its control API (the daemon mounts the images);
gRPC code generated from our own ``.proto`` files lives in ``_proto/``.
"""

from .pull import PullResult, chain_ids, pull
from .server import serve
from .service import (
    LABEL_CRI_IMAGE_REF,
    LABEL_IMAGE_REF,
    LABEL_REMOTE,
    LABEL_SNAPSHOT_REF,
    Mount,
    SnapshotError,
    SnapshotService,
)

__all__ = [
    "LABEL_CRI_IMAGE_REF",
    "LABEL_IMAGE_REF",
    "LABEL_REMOTE",
    "LABEL_SNAPSHOT_REF",
    "Mount",
    "PullResult",
    "SnapshotError",
    "SnapshotService",
    "chain_ids",
    "pull",
    "serve",
]

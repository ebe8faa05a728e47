"""The merged overlaybd devices the snapshotter stacks containers on, mounted by the node
daemon over its control API.

The image of a chain of overlaybd layers (the bottom of an image, up to a committed snapshot
*X*) is mounted read-only at ``<root>/snapshots/<X>/image`` and shared by every container
and view stacked on *X*. It is mounted when the first of them is prepared (or asked for its
mounts: after a reboot nothing is mounted) and unmounted when the last one is removed.
Each snapshot id has its own lock, so mounting one image never waits for another.
Synchronous (gRPC handler threads); the daemon is reached, or started, on every call.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import NodeConfig
from ..control import ensure_daemon, request
from ..mount import is_mountpoint, mounts_under

__all__ = ["ImageMounts"]

log = logging.getLogger(__name__)

# A first mount of a lazily fetched image reads layer metadata from the registry; its
# retries are bounded by the daemon's retry deadline (60 s by default), so allow more.
_MOUNT_TIMEOUT = 300.0


class ImageMounts:
    """Mounts and unmounts images through the node daemon, tagged with ``owner``."""

    def __init__(self, root: Path, config: NodeConfig, config_file: str | None) -> None:
        self.root = root
        self.owner = f"snapshotter:{root}"
        self._config = config
        self._config_file = config_file
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def target(self, snapshot_id: int) -> Path:
        return self.root / "snapshots" / str(snapshot_id) / "image"

    def _socket(self) -> str:
        return ensure_daemon(self._config, self._config_file)

    @contextlib.contextmanager
    def _locked(self, snapshot_id: int) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault(snapshot_id, threading.Lock())
        with lock:
            yield

    def served(self, sock: str | None = None) -> list[dict[str, Any]]:
        """The daemon's mounts that belong to this snapshotter root."""
        return request(sock or self._socket(), "status", owner=self.owner)["mounts"]

    def _is_served(self, sock: str, target: Path) -> bool:
        mounts = request(sock, "status", target=str(target))["mounts"]
        return any(m["owner"] == self.owner for m in mounts)

    def ensure(self, snapshot_id: int, layers: list[dict[str, Any]], name: str,
               record_trace: str | None = None,
               acceleration: dict[str, Any] | None = None) -> Path:
        """Make sure the image of ``layers`` (bottom first) is mounted for ``snapshot_id``;
        returns the mount point. Raises what the daemon raises (MountError, RegistryError...).
        ``record_trace``: record the image's reads from its mount on into that path (written
        when the image is unmounted, or when ``PATH.lock`` is deleted); an image mounted
        already for another container is not recorded (its start is over).
        ``acceleration``: the image's acceleration layer (a remote blob holding a trace, or
        a local trace file unpacked from one), prefetched as the image is mounted."""
        target = self.target(snapshot_id)
        with self._locked(snapshot_id):
            sock = self._socket()  # one ping (and daemon start) per call, not per request
            if self._is_served(sock, target):
                if record_trace:
                    log.warning("image %s is mounted already (another container uses it): "
                                "no trace recorded into %s", name, record_trace)
                return target  # serving, or being re-served after a daemon restart
            target.mkdir(parents=True, exist_ok=True)
            for point in mounts_under(str(target)):  # a dead mount the daemon forgot
                log.warning("removing stale mount %s", point)
                _lazy_umount(point)
            extra: dict[str, Any] = {"record_trace": record_trace} if record_trace else {}
            if acceleration is not None and acceleration.get("path"):
                extra["prefetch"] = acceleration["path"]
            elif acceleration is not None:
                extra["acceleration_layer"] = {k: acceleration[k] for k in ("digest", "size",
                                                                            "ref")}
            request(sock, "mount_layers", timeout=_MOUNT_TIMEOUT, target=str(target),
                    layers=layers, name=name, owner=self.owner, **extra)
            log.info("mounted image %s for snapshot %d", name, snapshot_id)
        return target

    def release(self, snapshot_id: int, users: Callable[[], int]) -> None:
        """Unmount ``snapshot_id``'s image unless ``users()`` (checked under the lock, so a
        concurrent ``ensure`` is never undone) says something still stacks on it."""
        target = self.target(snapshot_id)
        with self._locked(snapshot_id):
            if users() > 0:
                return
            self._unmount(target)

    def _unmount(self, target: Path) -> None:
        # Nothing mounted, nothing to ask: the daemon is not started just to learn that.
        if not mounts_under(str(target)):
            return
        sock = self._socket()
        if self._is_served(sock, target):
            request(sock, "umount", target=str(target))
            log.info("unmounted image at %s", target)
        for point in mounts_under(str(target)):
            _lazy_umount(point)

    def unmount_under(self, directory: Path) -> None:
        """Unmount every image mounted at or below ``directory`` (before removing it)."""
        if not mounts_under(str(directory)):
            return
        sock = self._socket()
        for mount in self.served(sock):
            target = Path(mount["target"])
            if target == directory or directory in target.parents:
                request(sock, "umount", target=str(target))
        for point in mounts_under(str(directory)):
            _lazy_umount(point)

    def reconcile(self, needed: set[int]) -> None:
        """Unmount this root's images that no snapshot stacks on any more (after a crash, or
        snapshots removed while the daemon was down)."""
        if not mounts_under(str(self.root / "snapshots")):
            return
        keep = {str(self.target(i)) for i in needed}
        sock = self._socket()
        for mount in self.served(sock):
            if mount["target"] not in keep:
                log.info("unmounting unused image at %s", mount["target"])
                request(sock, "umount", target=mount["target"])


def _lazy_umount(point: str) -> None:
    done = subprocess.run(["umount", "--lazy", point], capture_output=True, text=True,
                          check=False)
    if done.returncode and is_mountpoint(point):
        log.warning("umount --lazy %s failed: %s", point, done.stderr.strip())

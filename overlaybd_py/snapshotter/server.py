"""The gRPC edge of the snapshotter: containerd's snapshots v1 service on a unix socket.

Requests are translated to :class:`SnapshotService` calls on grpcio's handler threads;
errors become gRPC status codes in :func:`_status_of` and nowhere else (containerd maps
NotFound, AlreadyExists, FailedPrecondition, InvalidArgument and Unavailable back to its
error classes; anything else is Unknown). The process is ``overlaybd-py snapshotter``: it
runs beside the node daemon, which it starts if needed, and stops at SIGINT/SIGTERM.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from ..config import NodeConfig
from ..errors import (
    FormatError,
    MountError,
    OverlaybdError,
    RegistryError,
    TransientError,
    UsageError,
)
from ._proto import snapshots_pb2 as pb
from ._proto import snapshots_pb2_grpc as pb_grpc
from ._proto import types_pb2
from .images import ImageMounts
from .service import Mount, SnapshotError, SnapshotService
from .store import Snapshot

__all__ = ["serve"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
}
_LIST_BATCH = 100  # snapshots per List response message
_WORKERS = 16  # concurrent requests (mounting an image waits on the network)


def _status_of(exc: BaseException) -> grpc.StatusCode:
    """The one mapping from our exceptions to what containerd sees."""
    if isinstance(exc, SnapshotError):
        return _CODES[exc.code]
    if isinstance(exc, UsageError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, MountError | TransientError):
        return grpc.StatusCode.UNAVAILABLE  # the daemon or the registry: try again later
    if isinstance(exc, FormatError | RegistryError):
        return grpc.StatusCode.FAILED_PRECONDITION  # this image cannot be served
    return grpc.StatusCode.UNKNOWN


def _rpc(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: _Servicer, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return method(self, request, context)
        except (OverlaybdError, OSError) as exc:
            code = _status_of(exc)
            if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE):
                log.warning("%s failed: %s", method.__name__, exc)
            else:
                log.debug("%s: %s", method.__name__, exc)
            context.abort(code, str(exc) or type(exc).__name__)
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable")  # context.abort raises

    return wrapper


def _mounts_pb(mounts: list[Mount]) -> list[types_pb2.Mount]:
    return [types_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]


def _info_pb(snapshot: Snapshot) -> pb.Info:
    info = pb.Info(name=snapshot.name, parent=snapshot.parent, kind=int(snapshot.kind),
                   labels=snapshot.labels)
    info.created_at.FromNanoseconds(int(snapshot.created * 1e9))
    info.updated_at.FromNanoseconds(int(snapshot.updated * 1e9))
    return info


class _Servicer(pb_grpc.SnapshotsServicer):
    """containerd's method names (CapWords, fixed by the service definition)."""

    def __init__(self, service: SnapshotService) -> None:
        self.service = service

    @_rpc
    def Prepare(self, request, context):
        mounts = self.service.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts_pb(mounts))

    @_rpc
    def View(self, request, context):
        mounts = self.service.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts_pb(mounts))

    @_rpc
    def Mounts(self, request, context):
        return pb.MountsResponse(mounts=_mounts_pb(self.service.mounts(request.key)))

    @_rpc
    def Commit(self, request, context):
        self.service.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request, context):
        self.service.remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request, context):
        return pb.StatSnapshotResponse(info=_info_pb(self.service.stat(request.key)))

    @_rpc
    def Update(self, request, context):
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        updated = self.service.update(request.info.name, dict(request.info.labels), paths)
        return pb.UpdateSnapshotResponse(info=_info_pb(updated))

    def List(self, request, context):
        # A stream: errors are raised before the first message, so _rpc's translation
        # is done here by hand for the one error a filter can cause.
        try:
            found = list(self.service.walk(list(request.filters)))
        except UsageError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for i in range(0, len(found), _LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[_info_pb(s) for s in found[i:i + _LIST_BATCH]])

    @_rpc
    def Usage(self, request, context):
        size, inodes = self.service.usage(request.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    @_rpc
    def Cleanup(self, request, context):
        self.service.cleanup()
        return empty_pb2.Empty()


def _claim_socket(path: str) -> None:
    """Remove a stale socket file; refuse if something still answers on it."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise UsageError(f"something already serves {path}")


@contextlib.contextmanager
def _serving(service: SnapshotService, path: str) -> Iterator[grpc.Server]:
    server = grpc.server(ThreadPoolExecutor(max_workers=_WORKERS,
                                            thread_name_prefix="snapshots"))
    pb_grpc.add_SnapshotsServicer_to_server(_Servicer(service), server)
    _claim_socket(path)
    old_umask = os.umask(0o177)  # the socket is root's only (it can mount things)
    try:
        if not server.add_insecure_port(f"unix://{os.path.abspath(path)}"):
            raise MountError(f"cannot listen on {path}")
        server.start()
    finally:
        os.umask(old_umask)
    try:
        yield server
    finally:
        server.stop(grace=5).wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def serve(socket_path: str, root: str, config: NodeConfig, config_file: str | None,
          *, ready: Callable[[], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM. Reaches (or starts) the node daemon first, to put back
    the images in use after a crash or reboot; an unreachable daemon only delays that."""
    if os.geteuid() != 0:
        raise UsageError("the snapshotter needs root (mounts, and the node daemon)")
    root_path = Path(os.path.realpath(root))
    service = SnapshotService.open(root_path, ImageMounts(root_path, config, config_file))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            service.recover()
        except OverlaybdError as exc:
            log.warning("recovery of mounted images incomplete: %s", exc)
        with _serving(service, socket_path):
            log.info("containerd snapshotter serving %s on %s", root_path, socket_path)
            if ready is not None:
                ready()
            while not stop.wait(1.0):
                pass
            log.info("stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.close()

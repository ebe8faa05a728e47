"""The serving process: one trio nursery owning the FUSE file system, the control API, the
metrics endpoint and every mounted image's background work. What it leaves on disk (the
server directory and its mount records) is ``_records``' business.

Theory of operation: stops and restarts
---------------------------------------
A ``--foreground`` server unmounts everything when it stops; if it is killed, the next
command removes what it left (``cleanup_stale``). The node daemon instead keeps its mounts
across a stop, so that a restart (an upgrade, a crash, ``systemctl restart``) does not take
images away from their users:

* At SIGTERM/SIGINT it unmounts writable mounts cleanly (their upper is kept and the record
  marked *suspended*) and leaves read-only mounts in place. When the process exits, its FUSE
  file system goes away; the loop devices and ext4 mounts stay, and every read the page
  cache cannot answer fails with EIO (never a hang, never wrong bytes).
* At SIGKILL the same holds for every mount, and writable ones are torn.
* At start, the daemon reads its records. A read-only mount whose target still holds the
  old ext4 mount is *re-served*: the image is opened again (layer metadata comes from the
  block cache, so usually without network), a new loop device and ext4 mount replace the old
  ones at the same target (the old mount is detached lazily, the old loop device freed when
  its last user closes it). A suspended writable mount is mounted again on its upper. A
  mount whose target was unmounted meanwhile (its consumer is gone) and a torn writable
  mount are cleaned up instead. Re-serving runs in the background, retried with backoff
  while a registry is unreachable; ``status`` shows such mounts as ``recovering``.

The kernel cannot switch a mounted loop device to a new backing file: ``LOOP_CHANGE_FD``
shuts the mounted ext4 down (checked on Linux 6.18). Hence the re-mount: files opened
before the restart keep failing with EIO; paths resolved after it see the image again. The
README's "Node daemon restarts" section is the user-facing account.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from .. import __version__
from ..config import NodeConfig
from ..engine.block_cache import BlockCache
from ..engine.image import ImageStatistics, LayerBlob, OpenImage, open_image
from ..engine.prefetch import Prefetcher
from ..engine.source import BlobSource, FileSource
from ..engine.trace_recorder import TraceRecorder, attach_recorder
from ..engine.writable import WritableLayer
from ..engine.zfile_source import DecodedChunkCache
from ..errors import (
    AuthError,
    DigestMismatchError,
    FormatError,
    OverlaybdError,
    RegistryError,
    UsageError,
)
from ..formats import oci
from ..formats import trace as tracefmt
from ..formats.oci import Platform
from ..fusefs import BlockFs, serve_blockfs
from ..metrics import LatencyHistogram, MountStatistics, NodeStatistics, serve_metrics
from ..mount import (
    attach_loop,
    choose_read_ahead_kb,
    detach_loop,
    is_mountpoint,
    mount_ext4,
    source_of,
    unmount,
)
from ..registry import Reference, preload
from ..resolve import resolve_overlaybd
from ._clients import ClientPool, RegistryBlob
from ._control import serve_control
from ._records import (
    LayerSpec,
    MountRecord,
    _drop_record,
    _forget,
    _loop_serves,
    _read_pid,
    _release_fuse,
    _teardown,
    _write_record,
    cleanup_stale,
    read_records,
    socket_of,
)

__all__ = ["NodeServer", "run_foreground", "serve_until_stopped"]

log = logging.getLogger(__name__)

_RECOVERY_BACKOFF_MAX = 60.0  # seconds between attempts to re-serve a mount


@dataclass
class _Served:
    record: MountRecord
    image: OpenImage | None  # None while recovering
    cancel: trio.CancelScope
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)
    recorder: TraceRecorder | None = None  # mount --record-trace
    prefetcher: Prefetcher | None = None  # mount --prefetch, or the acceleration layer
    # Scopes of this mount's other background tasks (a scope is entered by one task only).
    scopes: list[trio.CancelScope] = field(default_factory=list)

    def cancel_all(self) -> None:
        self.cancel.cancel()
        for scope in self.scopes:
            scope.cancel()


async def _prefetch_source(params: dict[str, Any]
                           ) -> tracefmt.TraceFile | tracefmt.PriorityList | None:
    """The ``prefetch`` file of a mount request, decoded (trace or priority list)."""
    path = params.get("prefetch")
    if not path:
        return None
    try:
        data = await trio.Path(str(path)).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the prefetch file {path}: {exc.strerror}") from None
    try:
        return tracefmt.decode_prefetch_input(data)
    except FormatError as exc:
        raise UsageError(f"{path} is neither a trace nor a priority list: {exc}") from None


class NodeServer:
    """Serves images over FUSE + loop + ext4 and answers the control API.

    ``daemon=True`` makes it the node daemon: one per state directory (a lock), metrics,
    and mounts kept across a stop and re-served at the next start (module docstring).
    """

    def __init__(self, config: NodeConfig, server_dir: str, *, exit_when_idle: bool = False,
                 daemon: bool = False):
        self.config = config
        self.dir = Path(server_dir)
        self.exit_when_idle = exit_when_idle
        self.daemon = daemon
        self.fs: BlockFs | None = None
        self.cache: BlockCache | None = None
        self.chunk_cache = DecodedChunkCache(config.memory_cache_size)
        self._served: dict[str, _Served] = {}  # by target
        self._clients = ClientPool(config)
        self._shutdown = trio.Event()
        self._unmount_at_stop = not daemon
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()  # one mount/umount at a time
        self._lock_file: int | None = None
        self._recoveries = 0
        self._recovery_failures = 0
        self.started = time.time()

    @property
    def socket_path(self) -> str:
        return socket_of(self.dir)

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if os.geteuid() != 0:
            raise UsageError("serving images needs root (FUSE, loop devices and mounts)")
        if self.daemon:
            self._take_lock()
        await cleanup_stale(self.config.state_dir, daemon=False)
        try:
            self.dir.mkdir(parents=True, mode=0o700, exist_ok=True)
            for sub in ("mounts", "uppers"):
                (self.dir / sub).mkdir(mode=0o700, exist_ok=True)
            self.cache = BlockCache.open(self.config.cache_dir, self.config.cache_size)
        except OSError as exc:
            raise UsageError(f"cannot use {exc.filename or self.dir}: {exc.strerror}") from None
        left = read_records(self.dir) if self.daemon else []
        await _release_fuse(self.dir)
        try:  # before the first request: it would wait for this otherwise (~50 ms)
            await trio.to_thread.run_sync(preload, self.config.ca_file)
        except UsageError as exc:  # mounts will say it again, each its own error
            log.warning("registry clients: %s", exc)
        (self.dir / "pid").write_text(f"{os.getpid()} overlaybd-py {__version__}\n")
        try:
            async with serve_blockfs(str(self.dir / "fuse")) as fs:
                self.fs = fs
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(serve_control, self.socket_path, self.handle)
                    if self.daemon and self.config.metrics_address:
                        await nursery.start(serve_metrics, self.config.metrics_address,
                                            self.statistics)
                    for record in left:
                        self._recover(record)
                    task_status.started(self)
                    await self._shutdown.wait()
                    await self._stop()
                    nursery.cancel_scope.cancel()
        finally:
            await self._clients.aclose()
            self.cache.close()
            if not read_records(self.dir):
                shutil.rmtree(self.dir, ignore_errors=True)
            if self._lock_file is not None:
                os.close(self._lock_file)

    def _take_lock(self) -> None:
        os.makedirs(self.config.state_dir, mode=0o755, exist_ok=True)
        fd = os.open(self.config.daemon_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        # A starter probing whether a daemon runs holds the lock for an instant
        # (control._lock_held): only a lock held for a second means another daemon.
        for _ in range(20):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)  # before the nursery exists: nothing else to run
        else:
            os.close(fd)
            raise UsageError(f"another node daemon serves {self.config.state_dir} "
                             f"(pid {_read_pid(self.dir)})")
        self._lock_file = fd

    def shutdown(self, *, unmount: bool | None = None) -> None:
        """Stop serving. The node daemon keeps its mounts for the next start unless
        ``unmount``; other servers always unmount."""
        if unmount is not None:
            self._unmount_at_stop = unmount or not self.daemon
        self._shutdown.set()

    async def stopping(self) -> None:
        """Return once a shutdown was asked for."""
        await self._shutdown.wait()

    async def _stop(self) -> None:
        for served in self._served.values():
            served.cancel_all()  # recoveries, background downloads, prefetches
            if served.recorder is not None:  # the trace ends here, mount kept or not
                with trio.CancelScope(shield=True):
                    await served.recorder.close()
        for target, served in list(self._served.items()):
            try:
                with trio.CancelScope(shield=True):
                    if self._unmount_at_stop:
                        await self.umount({"target": target})
                    elif served.image is not None and not served.record.readonly:
                        await self._suspend(served)
            except Exception as exc:  # keep going with the others
                log.error("stopping %s failed: %s", target, exc)
        with trio.CancelScope(shield=True):  # kept mounts' sources stay open: stop their
            await self.cache.stop_background()  # fetches before the cache's files close
        kept = [t for t, s in self._served.items() if s.record.readonly or s.image is None]
        if kept and not self._unmount_at_stop:
            log.info("stopping; %d mount(s) kept for the next start (reads fail with EIO "
                     "until then): %s", len(kept), ", ".join(kept))

    async def _suspend(self, served: _Served) -> None:
        """Unmount a writable mount cleanly at a daemon stop, to mount it again at start."""
        async with self._lock:
            record = served.record
            if served.recorder is not None:
                await served.recorder.close()
            await _teardown(record, lazy=False)
            assert self.fs is not None and served.image is not None
            self.fs.remove(record.id)
            await served.image.aclose()
            record.suspended = True
            _write_record(self.dir, record)
            del self._served[record.target]
        log.info("writable mount %s suspended until the next start", record.target)

    # -- control API --------------------------------------------------------------------------

    async def handle(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        if op == "ping":
            return {"pid": os.getpid(), "version": __version__, "daemon": self.daemon,
                    "server_dir": str(self.dir)}
        if op == "mount":
            return await self.mount(params)
        if op == "mount_layers":
            return await self.mount_layers(params)
        if op == "umount":
            return await self.umount(params)
        if op == "status":
            if params.get("settle"):  # counters that include the fetches in flight
                await self.settle(params.get("target"))
            return self.status(params.get("target"), params.get("owner"))
        if op == "cache":
            return self.cache_op(params)
        if op == "shutdown":
            self.shutdown(unmount=bool(params.get("unmount", True)))
            return {}
        raise UsageError(f"unknown control operation {op!r}")

    async def _retry_auth(self, key: tuple, host: str, operation):
        """Run ``operation(client)``; on 401/403 once more with reloaded credentials."""
        client = await self._clients.get(key)
        try:
            return await operation(client)
        except AuthError:
            fresh = await self._clients.refresh(key, client, host)
            if fresh is None:
                raise
            return await operation(fresh)

    async def _open(self, specs: list[LayerSpec], key: tuple) -> OpenImage:
        """Open the layers as one device. No HEAD is spent: a registry blob that is missing or
        of another size fails the open's first fetch (a range answer names the blob's size;
        the block cache refuses a size other than the one it holds the blob at). A blob
        whose opening blocks are all cached is not asked for at all: one deleted from the
        registry since shows when a read misses."""
        by_digest = {spec.digest: spec for spec in specs}

        async def open_blob(digest: str, size: int) -> BlobSource:
            spec = by_digest[digest]
            if spec.path is not None:
                local = await FileSource.open(spec.path)
                if local.size != spec.size:
                    await local.aclose()
                    raise DigestMismatchError(f"layer file {spec.path} has {local.size} bytes, "
                                              f"expected {spec.size}")
                return local  # local: no block cache
            ref = Reference.parse(spec.ref or "")
            client = await self._clients.get(key)
            blob = RegistryBlob(self._clients, key, client, ref, digest, size)
            assert self.cache is not None
            return self.cache.source(blob, digest)

        return await open_image([LayerBlob(s.digest, s.size) for s in specs], open_blob,
                                cache=None, chunk_cache=self.chunk_cache)

    async def mount(self, params: dict[str, Any]) -> dict[str, Any]:
        """Mount an image reference (overlaybd directly or through a referrer)."""
        ref = Reference.parse(str(params["ref"]))
        platform = Platform.from_spec(params["platform"]) if params.get("platform") else None
        key = ClientPool.key(params)
        resolved = await self._retry_auth(key, ref.api_host,
                                          lambda c: resolve_overlaybd(c, ref, platform))
        image_ref = str(resolved.image)
        specs = [LayerSpec(d.digest, d.size, ref=image_ref) for d in resolved.layers]
        prefetch = await _prefetch_source(params)
        accel = resolved.acceleration_layer
        if prefetch is None and accel is not None:
            prefetch = await self._acceleration_prefetch(
                key, LayerSpec(accel.digest, accel.size, ref=image_ref), str(ref))
        result = await self._mount_layers(
            specs, params, name=str(ref), image=image_ref, via=resolved.via,
            writable=bool(params.get("rw")), upper_dir=params.get("upper"),
            prefetch=prefetch)
        log.info("mounted %s (%s via %s) at %s", ref, image_ref, resolved.via, result["target"])
        return result

    async def mount_layers(self, params: dict[str, Any]) -> dict[str, Any]:
        """Mount a resolved layer list read-only (the snapshotter's request)."""
        raw = params.get("layers")
        if not isinstance(raw, list) or not raw:
            raise UsageError("mount_layers needs a non-empty 'layers' list")
        specs = [LayerSpec.parse(item, f"layers[{i}]") for i, item in enumerate(raw)]
        name = str(params.get("name") or specs[-1].ref or specs[-1].path)
        prefetch = await _prefetch_source(params)
        if prefetch is None and params.get("acceleration_layer") is not None:
            accel = LayerSpec.parse(params["acceleration_layer"], "acceleration_layer")
            prefetch = await self._acceleration_prefetch(ClientPool.key(params), accel, name)
        result = await self._mount_layers(specs, params, name=name, image=specs[-1].digest,
                                          via="layers", writable=False, upper_dir=None,
                                          prefetch=prefetch)
        log.info("mounted %d layer(s) of %s at %s", len(specs), name, result["target"])
        return result

    async def _acceleration_prefetch(self, key: tuple, accel: LayerSpec, name: str
                                     ) -> tracefmt.TraceFile | tracefmt.PriorityList | None:
        """The trace (or priority list) an image's acceleration layer carries (``trace
        push``), to prefetch. A bad layer is not fatal: the image mounts without prefetch."""
        try:
            if accel.path is not None:
                blob = await trio.Path(accel.path).read_bytes()
                if oci.sha256_digest(blob) != accel.digest:
                    raise DigestMismatchError(f"{accel.path} is not blob {accel.digest}")
            else:
                ref = Reference.parse(accel.ref or "")
                layer = oci.Descriptor(oci.OCI_LAYER, accel.digest, accel.size)
                blob = await self._retry_auth(key, ref.api_host,
                                              lambda c: c.get_blob(ref, layer))
            return tracefmt.decode_prefetch_input(tracefmt.trace_from_acceleration_layer(blob))
        except AuthError:
            raise  # the layers would fail the same way
        except (FormatError, RegistryError, OSError) as exc:
            log.warning("%s: ignoring its acceleration layer %s: %s", name, accel.digest, exc)
            return None

    async def _mount_layers(self, specs: list[LayerSpec], params: dict[str, Any], *, name: str,
                            image: str, via: str, writable: bool, upper_dir: str | None,
                            prefetch: tracefmt.TraceFile | tracefmt.PriorityList | None = None,
                            ) -> dict[str, Any]:
        target = os.path.realpath(str(params["target"]))
        if upper_dir and not writable:
            raise UsageError("--upper needs --rw")
        if not os.path.isdir(target):
            raise UsageError(f"mount target {target} is not a directory")
        if target in self._served or is_mountpoint(target):
            raise UsageError(f"{target} is already a mount point")
        key = ClientPool.key(params)
        read_ahead_kb = choose_read_ahead_kb(  # checked before anything is opened
            params.get("read_ahead_kb"),
            planned=prefetch is not None or bool(params.get("record_trace")))
        opened = await self._open(specs, key)
        record = MountRecord(
            id=secrets.token_hex(6), ref=name, image=image, via=via, target=target, block="",
            loop="", readonly=not writable, upper=upper_dir, keep_upper=bool(upper_dir),
            pid=os.getpid(), created=time.time(), layers=[asdict(s) for s in specs],
            plain_http=key[0], owner=str(params.get("owner") or "cli"),
            read_ahead_kb=read_ahead_kb,
        )
        try:
            async with self._lock:
                if target in self._served or is_mountpoint(target):
                    raise UsageError(f"{target} is already a mount point")
                # Loop device and mount are bounded steps; a stop cancelling them halfway
                # would leak what the undo steps could then not remove.
                with trio.CancelScope(shield=True):
                    await self._attach(record, opened, record_trace=params.get("record_trace"),
                                       prefetch=prefetch)
        except BaseException:
            with trio.CancelScope(shield=True):
                await opened.aclose()
            raise
        return {"id": record.id, "target": target, "image": image, "via": via,
                "loop": record.loop, "layers": len(specs), "size": opened.device.size}

    async def _attach(self, record: MountRecord, opened: OpenImage, *,
                      record_trace: str | None = None,
                      prefetch: tracefmt.TraceFile | tracefmt.PriorityList | None = None,
                      ) -> None:
        """Serve ``opened`` under ``record.id`` and mount it at ``record.target``; fills in
        and writes the record. Must hold ``self._lock``. Undoes every step on failure.

        ``record_trace`` records every read from the first one (the ext4 mount's) on; a
        trace ``prefetch`` starts before the mount, a priority list (paths) right after.
        """
        assert self.fs is not None
        served = _Served(record, opened, trio.CancelScope())
        async with contextlib.AsyncExitStack() as undo:
            if not record.readonly:
                if record.upper is None:
                    record.upper = str(self.dir / "uppers" / record.id)
                fresh_upper = not os.path.exists(record.upper)
                opened.device.upper = _open_upper(record.upper, opened.device.size)
                if fresh_upper and not record.keep_upper:
                    undo.callback(shutil.rmtree, record.upper, True)
            fs_image = self.fs.add(record.id, opened.device)
            undo.callback(self.fs.remove, record.id)
            undo.callback(served.cancel_all)
            if record_trace:
                served.recorder = attach_recorder(opened, fs_image, record_trace)
                undo.push_async_callback(served.recorder.close)
                self._start(served, served.recorder.watch_lock)
            if isinstance(prefetch, tracefmt.TraceFile):
                self._start_prefetch(served, prefetch)
            record.block = str(self.dir / "fuse" / record.id / "block")
            record.loop = await attach_loop(record.block, readonly=record.readonly,
                                            read_ahead_kb=record.read_ahead_kb)
            undo.push_async_callback(detach_loop, record.loop)
            await mount_ext4(record.loop, record.target, readonly=record.readonly)
            record.pid, record.suspended = os.getpid(), False
            _write_record(self.dir, record)
            undo.pop_all()
        if isinstance(prefetch, tracefmt.PriorityList):
            self._start_prefetch(served, prefetch)
        self._served[record.target] = served
        if self.config.download_rate > 0 and self._nursery is not None:
            self._nursery.start_soon(self._download, opened, served.cancel)

    def _start(self, served: _Served, work: Any) -> None:
        """Run ``work()`` in the server's nursery until it ends or the mount goes away."""
        scope = trio.CancelScope()
        served.scopes.append(scope)

        async def run() -> None:
            with scope:
                await work()

        assert self._nursery is not None
        self._nursery.start_soon(run)

    def _start_prefetch(self, served: _Served,
                        source: tracefmt.TraceFile | tracefmt.PriorityList) -> None:
        assert served.image is not None
        prefetcher = Prefetcher(served.image, source,
                                concurrency=self.config.prefetch_concurrency,
                                gap=self.config.prefetch_gap,
                                root=served.record.target)
        served.prefetcher = prefetcher

        async def run() -> None:
            try:
                await prefetcher.run()
            except (OverlaybdError, OSError) as exc:  # planning failed: reads stay on demand
                log.warning("prefetch for %s stopped: %s", served.record.target, exc)

        self._start(served, run)

    # -- recovery after a restart ----------------------------------------------------------------

    def _recover(self, record: MountRecord) -> None:
        served = _Served(record, None, trio.CancelScope())
        self._served[record.target] = served
        assert self._nursery is not None
        self._nursery.start_soon(self._recovery, served)

    async def _recovery(self, served: _Served) -> None:
        delay = 1.0
        with served.cancel:
            while True:
                try:
                    await self._reserve(served)
                    return
                except Exception as exc:  # keep serving the others; try again later
                    self._recovery_failures += 1
                    if not isinstance(exc, OverlaybdError | OSError):
                        log.exception("re-serving %s failed", served.record.target)
                    log.warning("re-serving %s failed (%s); next attempt in %.0f s",
                                served.record.target, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, _RECOVERY_BACKOFF_MAX)

    async def _reserve(self, served: _Served) -> None:
        old = served.record
        target = old.target
        mounted = is_mountpoint(target) and source_of(target) == old.loop
        if old.suspended and not is_mountpoint(target):
            mounted = True  # cleanly unmounted by us: mount it again
        if not mounted or (not old.readonly and not old.suspended) or not old.layers:
            reason = ("its target is no longer mounted" if not mounted else
                      "its record names no layers" if not old.layers else
                      "a writable mount cannot survive a killed daemon")
            async with self._lock:
                with trio.CancelScope(shield=True):
                    await _teardown(old, lazy=True)
                    _forget(self.dir, old)
                    self._served.pop(target, None)
            log.warning("not re-serving %s: %s (cleaned up%s)", target, reason,
                        f"; writable layer kept in {old.upper}" if old.keep_upper else "")
            return
        specs = [LayerSpec(**spec) for spec in old.layers]
        opened = await self._open(specs, (old.plain_http, None, None))
        try:
            # Acquiring the lock raises Cancelled if umount or stop cancelled us meanwhile;
            # once it is held, the swap runs to its end (a half-done swap would leak).
            async with self._lock:
                with trio.CancelScope(shield=True):
                    if not old.suspended:
                        if is_mountpoint(target) and source_of(target) == old.loop:
                            await unmount(target, lazy=True)
                        if _loop_serves(old.loop, old):
                            await detach_loop(old.loop)
                    # A new id, so the new block file's path differs from the old one's.
                    record = MountRecord(**{**asdict(old), "id": secrets.token_hex(6)})
                    await self._attach(record, opened)
                    _drop_record(self.dir, old)
        except BaseException:
            with trio.CancelScope(shield=True):
                await opened.aclose()
            raise
        self._recoveries += 1
        log.info("re-served %s at %s", old.ref, target)

    # -- unmount, status, cache ---------------------------------------------------------------

    async def umount(self, params: dict[str, Any]) -> dict[str, Any]:
        target = os.path.realpath(str(params["target"]))
        served = self._served.get(target)
        if served is None:
            raise UsageError(f"{target} is not mounted by this server")
        served.cancel_all()
        async with self._lock:
            served = self._served.get(target)  # a recovery may have replaced it meanwhile
            if served is None:
                raise UsageError(f"{target} is not mounted by this server")
            served.cancel_all()
            record = served.record
            if served.image is not None:
                await served.image.settle()  # the trace and counters include read-ahead
            if served.recorder is not None:
                with trio.CancelScope(shield=True):  # FILE, FILE.jsonl, FILE.ok
                    await served.recorder.close()
            await _teardown(record, lazy=served.image is None)
            if served.image is not None:
                assert self.fs is not None
                self.fs.remove(record.id)
                await served.image.aclose()
            _forget(self.dir, record)
            del self._served[target]
        log.info("unmounted %s", target)
        if self.exit_when_idle and not self._served:
            self.shutdown()
        return {"target": target, "upper": record.upper if record.keep_upper else None}

    def _mount_statistics(self, served: _Served,
                          stats: ImageStatistics | None = None) -> MountStatistics:
        record = served.record
        image = served.image
        fs_image = self.fs.get(record.id) if self.fs and image is not None else None
        if image is not None:
            served.histogram.update([getattr(s, "fetch_latencies", ()) for s in image.sources])
            stats = stats or image.statistics()
        return MountStatistics(
            id=record.id, image=record.ref, target=record.target, owner=record.owner,
            serving=image is not None,
            bytes_read=fs_image.bytes_read if fs_image else 0,
            reads=fs_image.reads if fs_image else 0,
            bytes_written=fs_image.bytes_written if fs_image else 0,
            errors=fs_image.errors if fs_image else 0,
            bytes_fetched=stats.bytes_fetched if stats else 0,
            requests=stats.requests if stats else 0,
            cache_hits=stats.cache_hits if stats else 0,
            cache_misses=stats.cache_misses if stats else 0,
            fetch_buckets=served.histogram.cumulative(),
            fetch_seconds=served.histogram.sum,
        )

    def statistics(self) -> NodeStatistics:
        return NodeStatistics(
            started=self.started,
            mounts=tuple(self._mount_statistics(s) for s in self._served.values()),
            cache=self.cache.statistics() if self.cache else None,
            recoveries=self._recoveries, recovery_failures=self._recovery_failures,
        )

    async def settle(self, target: str | None = None) -> None:
        """Wait for the fetches in flight of the mounts at ``target`` (or of all)."""
        for served in list(self._served.values()):
            if served.image is not None and (
                    not target or served.record.target == os.path.realpath(target)):
                await served.image.settle()

    def status(self, target: str | None = None, owner: str | None = None) -> dict[str, Any]:
        mounts = []
        for served in self._served.values():
            record = served.record
            if target and record.target != os.path.realpath(target):
                continue
            if owner and record.owner != owner:
                continue
            image = served.image
            stats = image.statistics() if image is not None else None
            m = self._mount_statistics(served, stats)
            mounts.append({
                "image": record.ref,
                "target": record.target,
                "id": record.id,
                "state": "serving" if image is not None else "recovering",
                "owner": record.owner,
                "overlaybd_image": record.image,
                "via": record.via,
                "writable": not record.readonly,
                "upper": record.upper,
                "loop": record.loop,
                "read_ahead_kb": record.read_ahead_kb,
                "bytes_read": m.bytes_read,
                "reads": m.reads,
                "bytes_written": m.bytes_written,
                "bytes_fetched": m.bytes_fetched,
                "cache_hits": m.cache_hits,
                "cache_misses": m.cache_misses,
                "requests": m.requests,
                "fetch_p50_ms": stats.fetch_p50_ms if stats else 0.0,
                "fetch_p99_ms": stats.fetch_p99_ms if stats else 0.0,
                "errors": m.errors,
                "unverified_layers": stats.unverified_layers if stats else [],
                "device_size": image.device.size if image is not None else 0,
                "layers": len(record.layers),
                "prefetch": asdict(served.prefetcher.statistics())
                if served.prefetcher is not None else None,
                "trace": {"path": served.recorder.path,
                          **asdict(served.recorder.statistics())}
                if served.recorder is not None else None,
            })
        cache = self.cache.statistics() if self.cache else None
        return {"pid": os.getpid(), "server_dir": str(self.dir), "mounts": mounts,
                "cache": asdict(cache) if cache else None}

    def cache_op(self, params: dict[str, Any]) -> dict[str, Any]:
        assert self.cache is not None
        action = params.get("action")
        if action == "ls":
            return {"blobs": [asdict(b) for b in self.cache.list_blobs()],
                    "size": self.cache.size(), "capacity": self.cache.capacity}
        if action == "gc":
            limit = int(params.get("max_size") or self.cache.capacity or 0)
            evicted = self.cache.evict(limit) if limit else 0
            return {"evicted_bytes": evicted, "size": self.cache.size()}
        if action == "clear":
            return {"freed_bytes": self.cache.clear(), "size": self.cache.size(),
                    "note": "blobs of mounted images are kept"}
        raise UsageError(f"unknown cache action {action!r}")

    async def _download(self, image: OpenImage, cancel: trio.CancelScope) -> None:
        """Background whole-image download at ``download_rate`` bytes/s (overlaybd's
        ``download`` option) with ``prefetch_concurrency`` parallel range reads: afterwards
        no read waits on the network."""
        rate = self.config.download_rate
        step = 1 << 20
        work = iter([(source, offset) for source in image.sources
                     for offset in range(0, source.size, step)])
        next_start = trio.current_time()

        async def worker() -> None:
            nonlocal next_start
            for source, offset in work:  # the workers share one iterator
                length = min(step, source.size - offset)
                # Reserve this step's share of the rate before reading (no await between).
                start, next_start = next_start, max(next_start, trio.current_time()) + length / rate
                await trio.sleep_until(start)
                await source.read_at(offset, length)

        with cancel:
            try:
                async with trio.open_nursery() as nursery:
                    for _ in range(self.config.prefetch_concurrency):
                        nursery.start_soon(worker)
            except Exception as exc:
                log.info("background download stopped: %s", exc)


def _open_upper(path: str, vsize: int) -> WritableLayer:
    os.makedirs(path, mode=0o700, exist_ok=True)
    data, index = os.path.join(path, "data"), os.path.join(path, "index")
    if os.path.exists(data) or os.path.exists(index):
        layer = WritableLayer.open(data, index)
        if layer.virtual_size != vsize:
            layer.close()
            raise UsageError(f"writable layer in {path} is for a {layer.virtual_size}-byte "
                             f"device, this image is {vsize} bytes")
        return layer
    return WritableLayer.create(data, index, vsize)


async def serve_until_stopped(server: NodeServer, then: Any = None) -> None:
    """Run ``server`` until SIGINT/SIGTERM or a ``shutdown`` request, then let it tear down.

    ``then`` (an async callable taking the server) runs once the server is up; if it raises,
    the server shuts down (unmounting everything) and the error propagates.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            watcher = trio.CancelScope()

            async def watch_signals() -> None:
                with watcher:
                    async for signum in signals:
                        log.info("received %s", signal.Signals(signum).name)
                        server.shutdown()
                        return

            nursery.start_soon(watch_signals)
            if then is not None:
                try:
                    await then(server)
                except BaseException:
                    server.shutdown(unmount=True)
                    watcher.cancel()
                    raise
            await server.stopping()
            watcher.cancel()  # server.run finishes its teardown by itself


async def run_foreground(server: NodeServer, params: dict[str, Any],
                         on_ready: Any = None) -> None:
    """Serve one mount in this process until SIGINT/SIGTERM or ``umount``, then clean up."""

    async def mount_one(server: NodeServer) -> None:
        result = await server.mount(params)
        if on_ready is not None:
            on_ready(result)

    await serve_until_stopped(server, mount_one)

"""The serving process: one trio nursery owning the FUSE file system, the control API and
every mounted image's background work.

A *server directory* holds what a serving process leaves on disk: ``pid``, ``control.sock``,
the FUSE mount point ``fuse/``, one JSON record per mount in ``mounts/`` and private
writable layers in ``uppers/``. The node daemon uses ``<state>/daemon``; a ``--foreground``
mount uses ``<state>/fg-<pid>``. When a serving process dies, its records let the next
``mount``/``umount``/``status`` (or daemon start) find and remove what it left: ext4 mounts,
loop devices, the dead FUSE mount (``cleanup_stale``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from . import __version__
from .config import NodeConfig
from .control import serve_control
from .engine.block_cache import BlockCache
from .engine.image import LayerBlob, OpenImage, open_image
from .engine.writable import WritableLayer
from .engine.zfile_source import DecodedChunkCache
from .errors import MountError, UsageError
from .formats.oci import Platform
from .fusefs import BlockFs, serve_blockfs
from .mount import (
    attach_loop,
    detach_loop,
    is_mountpoint,
    loops_backed_by,
    mount_ext4,
    mounts_under,
    unmount,
)
from .registry import (
    ClientConfig,
    Credentials,
    HttpBlobSource,
    Reference,
    RegistryClient,
    RetryPolicy,
)
from .resolve import resolve_overlaybd

__all__ = ["MountRecord", "NodeServer", "cleanup_stale", "server_dirs"]

log = logging.getLogger(__name__)

DAEMON_DIR = "daemon"


@dataclass
class MountRecord:
    id: str
    ref: str
    image: str  # the overlaybd manifest actually served
    via: str
    target: str
    block: str  # the FUSE file behind the loop device
    loop: str
    readonly: bool
    upper: str | None
    keep_upper: bool
    pid: int
    created: float


def server_dirs(state_dir: str) -> list[Path]:
    root = Path(state_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and (p.name == DAEMON_DIR or p.name.startswith("fg-")))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(server_dir: Path) -> int | None:
    try:
        return int((server_dir / "pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_records(server_dir: Path) -> list[MountRecord]:
    records = []
    for path in sorted((server_dir / "mounts").glob("*.json")):
        try:
            records.append(MountRecord(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            log.warning("ignoring unreadable mount record %s", path)
    return records


async def _teardown(record: MountRecord, *, lazy: bool) -> None:
    """Undo one mount: ext4, then the loop device. Tolerates steps already undone."""
    if is_mountpoint(record.target):
        await unmount(record.target, lazy=lazy)
    loops = {record.loop} if record.loop else set()
    loops.update(await loops_backed_by(record.block))
    for loop in sorted(loops):
        await detach_loop(loop)


async def cleanup_stale(state_dir: str) -> list[str]:
    """Remove what dead serving processes left behind. Returns the targets cleaned."""
    cleaned = []
    for server_dir in server_dirs(state_dir):
        pid = _read_pid(server_dir)
        if pid is not None and _pid_alive(pid) and pid != os.getpid():
            continue
        if pid == os.getpid():
            continue
        for record in read_records(server_dir):
            log.info("cleaning up %s left by dead server %s", record.target, pid)
            try:
                await _teardown(record, lazy=True)
            except MountError as exc:
                log.warning("clean-up of %s incomplete: %s", record.target, exc)
                continue
            cleaned.append(record.target)
            if record.upper and not record.keep_upper:
                shutil.rmtree(record.upper, ignore_errors=True)
            (server_dir / "mounts" / f"{record.id}.json").unlink(missing_ok=True)
        fuse_dir = server_dir / "fuse"
        for point in mounts_under(str(fuse_dir)):
            with contextlib.suppress(MountError):
                await unmount(point, lazy=True)
        if not read_records(server_dir):
            shutil.rmtree(server_dir, ignore_errors=True)
    return cleaned


@dataclass
class _Served:
    record: MountRecord
    image: OpenImage
    cancel: trio.CancelScope


class NodeServer:
    """Serves images over FUSE + loop + ext4 and answers the control API."""

    def __init__(self, config: NodeConfig, server_dir: str, *, exit_when_idle: bool = False):
        self.config = config
        self.dir = Path(server_dir)
        self.exit_when_idle = exit_when_idle
        self.fs: BlockFs | None = None
        self.cache: BlockCache | None = None
        self.chunk_cache = DecodedChunkCache(config.memory_cache_size)
        self._served: dict[str, _Served] = {}  # by target
        self._clients: dict[tuple, RegistryClient] = {}
        self._shutdown = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()  # one mount/umount at a time
        self.started = time.time()

    @property
    def socket_path(self) -> str:
        return str(self.dir / "control.sock")

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if os.geteuid() != 0:
            raise UsageError("serving images needs root (FUSE, loop devices and mounts)")
        await cleanup_stale(self.config.state_dir)
        self.dir.mkdir(parents=True, mode=0o700, exist_ok=True)
        for sub in ("mounts", "uppers"):
            (self.dir / sub).mkdir(mode=0o700, exist_ok=True)
        (self.dir / "pid").write_text(f"{os.getpid()} overlaybd-py {__version__}\n")
        self.cache = BlockCache.open(self.config.cache_dir, self.config.cache_size)
        try:
            async with serve_blockfs(str(self.dir / "fuse")) as fs:
                self.fs = fs
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(serve_control, self.socket_path, self.handle)
                    task_status.started(self)
                    await self._shutdown.wait()
                    await self._unmount_all()
                    nursery.cancel_scope.cancel()
        finally:
            for client in self._clients.values():
                with trio.CancelScope(shield=True):
                    await client.aclose()
            self.cache.close()
            if not read_records(self.dir):
                shutil.rmtree(self.dir, ignore_errors=True)

    def shutdown(self) -> None:
        self._shutdown.set()

    async def stopping(self) -> None:
        """Return once a shutdown was asked for."""
        await self._shutdown.wait()

    async def _unmount_all(self) -> None:
        for target in list(self._served):
            try:
                with trio.CancelScope(shield=True):
                    await self.umount({"target": target})
            except Exception as exc:  # keep tearing down the others
                log.error("unmounting %s at shutdown failed: %s", target, exc)

    # -- control API --------------------------------------------------------------------------

    async def handle(self, op: str, params: dict[str, Any]) -> dict[str, Any]:
        if op == "ping":
            return {"pid": os.getpid(), "version": __version__}
        if op == "mount":
            return await self.mount(params)
        if op == "umount":
            return await self.umount(params)
        if op == "status":
            return self.status(params.get("target"))
        if op == "cache":
            return self.cache_op(params)
        if op == "shutdown":
            self.shutdown()
            return {}
        raise UsageError(f"unknown control operation {op!r}")

    def _client_config(self, params: dict[str, Any]) -> ClientConfig:
        plain: bool | frozenset[str] = frozenset(self.config.plain_http)
        if params.get("plain_http"):
            plain = True
        creds = None
        if params.get("username"):
            creds = Credentials(params["username"], params.get("password") or "")
        return ClientConfig(
            plain_http=plain, default_credentials=creds,
            mirrors={h: list(u) for h, u in self.config.mirrors.items()},
            proxy=self.config.proxy, docker_config_dir=self.config.docker_config_dir,
            retry=RetryPolicy(deadline=self.config.retry_deadline),
        )

    async def _client(self, params: dict[str, Any]) -> RegistryClient:
        key = (bool(params.get("plain_http")), params.get("username"), params.get("password"))
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = await RegistryClient.open(self._client_config(params))
        return client

    async def mount(self, params: dict[str, Any]) -> dict[str, Any]:
        ref = Reference.parse(str(params["ref"]))
        target = os.path.realpath(str(params["target"]))
        writable = bool(params.get("rw"))
        upper_dir = params.get("upper")
        if upper_dir and not writable:
            raise UsageError("--upper needs --rw")
        platform = Platform.from_spec(params["platform"]) if params.get("platform") else None
        if not os.path.isdir(target):
            raise UsageError(f"mount target {target} is not a directory")
        async with self._lock:
            if target in self._served or is_mountpoint(target):
                raise UsageError(f"{target} is already a mount point")
            client = await self._client(params)
            resolved = await resolve_overlaybd(client, ref, platform)
            image_id = secrets.token_hex(6)
            async with contextlib.AsyncExitStack() as undo:
                upper, upper_path, keep = None, None, bool(upper_dir)
                blobs = [LayerBlob(d.digest, d.size) for d in resolved.layers]

                async def open_blob(digest: str, size: int) -> HttpBlobSource:
                    return await HttpBlobSource.open(client, resolved.image, digest)

                image = await open_image(blobs, open_blob, cache=self.cache,
                                         chunk_cache=self.chunk_cache)
                undo.push_async_callback(image.aclose)
                if writable:
                    upper_path = upper_dir or str(self.dir / "uppers" / image_id)
                    upper = _open_upper(upper_path, image.device.size)
                    image.device.upper = upper
                    if not keep:
                        undo.callback(shutil.rmtree, upper_path, True)
                assert self.fs is not None
                self.fs.add(image_id, image.device)
                undo.callback(self.fs.remove, image_id)
                block = str(self.dir / "fuse" / image_id / "block")
                loop = await attach_loop(block, readonly=not writable)
                undo.push_async_callback(detach_loop, loop)
                await mount_ext4(loop, target, readonly=not writable)
                record = MountRecord(
                    id=image_id, ref=str(ref), image=str(resolved.image), via=resolved.via,
                    target=target, block=block, loop=loop, readonly=not writable,
                    upper=upper_path, keep_upper=keep, pid=os.getpid(), created=time.time(),
                )
                _write_record(self.dir, record)
                undo.pop_all()
            cancel = trio.CancelScope()
            self._served[target] = _Served(record, image, cancel)
            if self.config.download_rate > 0 and self._nursery is not None:
                self._nursery.start_soon(partial(self._download, image, cancel))
        log.info("mounted %s (%s via %s) at %s on %s", ref, resolved.image, resolved.via,
                 target, loop)
        return {"id": image_id, "target": target, "image": str(resolved.image),
                "via": resolved.via, "loop": loop, "layers": len(blobs),
                "size": image.device.size}

    async def umount(self, params: dict[str, Any]) -> dict[str, Any]:
        target = os.path.realpath(str(params["target"]))
        async with self._lock:
            served = self._served.get(target)
            if served is None:
                raise UsageError(f"{target} is not mounted by this server")
            served.cancel.cancel()
            await _teardown(served.record, lazy=False)
            assert self.fs is not None
            self.fs.remove(served.record.id)
            await served.image.aclose()
            if served.record.upper and not served.record.keep_upper:
                shutil.rmtree(served.record.upper, ignore_errors=True)
            (self.dir / "mounts" / f"{served.record.id}.json").unlink(missing_ok=True)
            del self._served[target]
        log.info("unmounted %s", target)
        if self.exit_when_idle and not self._served:
            self.shutdown()
        return {"target": target, "upper": served.record.upper if served.record.keep_upper
                else None}

    def status(self, target: str | None = None) -> dict[str, Any]:
        mounts = []
        for served in self._served.values():
            if target and served.record.target != os.path.realpath(target):
                continue
            image_stats = served.image.statistics()
            fs_image = self.fs.get(served.record.id) if self.fs else None
            mounts.append({
                "image": served.record.ref,
                "target": served.record.target,
                "overlaybd_image": served.record.image,
                "via": served.record.via,
                "writable": not served.record.readonly,
                "upper": served.record.upper,
                "bytes_read": fs_image.bytes_read if fs_image else 0,
                "reads": fs_image.reads if fs_image else 0,
                "bytes_written": fs_image.bytes_written if fs_image else 0,
                "bytes_fetched": image_stats.bytes_fetched,
                "cache_hits": image_stats.cache_hits,
                "cache_misses": image_stats.cache_misses,
                "requests": image_stats.requests,
                "fetch_p50_ms": image_stats.fetch_p50_ms,
                "fetch_p99_ms": image_stats.fetch_p99_ms,
                "errors": fs_image.errors if fs_image else 0,
                "unverified_layers": image_stats.unverified_layers,
                "device_size": served.image.device.size,
                "layers": len(served.image.layers),
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
        ``download`` option): afterwards no read waits on the network."""
        rate = self.config.download_rate
        step = 1 << 20
        with cancel:
            for source in image.sources:
                for offset in range(0, source.size, step):
                    length = min(step, source.size - offset)
                    started = trio.current_time()
                    try:
                        await source.read_at(offset, length)
                    except Exception as exc:
                        log.info("background download paused: %s", exc)
                        return
                    await trio.sleep_until(started + length / rate)


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


def _write_record(server_dir: Path, record: MountRecord) -> None:
    path = server_dir / "mounts" / f"{record.id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, path)


async def serve_until_stopped(server: NodeServer, then: Any = None) -> None:
    """Run ``server`` until SIGINT/SIGTERM or a ``shutdown`` request, then let it tear down.

    ``then`` (an async callable taking the server) runs once the server is up; if it raises,
    the server shuts down and the error propagates.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            watcher = trio.CancelScope()

            async def watch_signals() -> None:
                with watcher:
                    async for _ in signals:
                        server.shutdown()
                        return

            nursery.start_soon(watch_signals)
            if then is not None:
                try:
                    await then(server)
                except BaseException:
                    server.shutdown()
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

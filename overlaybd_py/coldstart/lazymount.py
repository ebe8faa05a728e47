"""A one-image serving process for experiments and tests, driven by JSON lines on stdin.

It does what the node daemon's mount path does (resolve, open the layers through the block
cache, FUSE block file, loop device, read-only ext4 mount) plus the two cold-start features
through their public API: ``attach_recorder`` for ``record_trace`` and ``Prefetcher`` for
``prefetch`` (a trace file or a priority list) or an image's acceleration layer. The
benchmark uses it when the CLI has no ``--record-trace``/``--prefetch`` yet, and the system
tests use it to exercise that API around the real FUSE path without the daemon.

Protocol: one JSON object per line each way. On start it answers ``{"ready": true}``, then::

    {"op": "mount", "ref": R, "target": T, "record_trace": F?, "prefetch": F?,
     "read_ahead_kb": N?}
    {"op": "status"}       -> bytes fetched, recorder and prefetcher statistics
    {"op": "wait_prefetch"} -> returns when the prefetch is done
    {"op": "umount"}       -> closes the recorder (writes the trace), unmounts
    {"op": "exit"}

Errors are answered as ``{"error": "..."}``. EOF on stdin, SIGINT or SIGTERM unmount
everything and exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import asdict
from typing import Any

import trio

from ..engine.block_cache import BlockCache
from ..engine.image import LayerBlob, OpenImage, open_image
from ..engine.prefetch import DEFAULT_CONCURRENCY, Prefetcher
from ..engine.trace_recorder import TraceRecorder, attach_recorder
from ..engine.zfile_source import DecodedChunkCache
from ..errors import OverlaybdError, UsageError
from ..formats import trace as tracefmt
from ..fusefs import BlockFs, serve_blockfs
from ..mount import (
    attach_loop,
    choose_read_ahead_kb,
    detach_loop,
    is_mountpoint,
    mount_ext4,
    unmount,
)
from ..registry import ClientConfig, HttpBlobSource, Reference, RegistryClient
from ..resolve import resolve_overlaybd

__all__ = ["LazyMountProcess", "main"]

log = logging.getLogger(__name__)


class _Mount:
    def __init__(self) -> None:
        self.image: OpenImage | None = None
        self.name = ""
        self.loop = ""
        self.target = ""
        self.recorder: TraceRecorder | None = None
        self.prefetcher: Prefetcher | None = None
        self.prefetch_done = trio.Event()
        self.cancel = trio.CancelScope()
        self.via = ""
        self.read_ahead_kb: int | None = None


class Server:
    def __init__(self, fs: BlockFs, fuse_dir: str, cache: BlockCache, client: RegistryClient,
                 nursery: trio.Nursery, concurrency: int) -> None:
        self.fs = fs
        self.fuse_dir = fuse_dir
        self.cache = cache
        self.client = client
        self.nursery = nursery
        self.concurrency = concurrency
        self.chunk_cache = DecodedChunkCache()
        self.mounted: _Mount | None = None

    async def mount(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.mounted is not None:
            raise UsageError("this server serves one image at a time")
        ref = Reference.parse(str(params["ref"]))
        target = os.path.realpath(str(params["target"]))
        if is_mountpoint(target):
            raise UsageError(f"{target} is already a mount point")
        self.mounted = m = _Mount()
        try:
            return await self._mount(m, ref, target, params)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.umount()
            raise

    async def _mount(self, m: _Mount, ref: Reference, target: str,
                     params: dict[str, Any]) -> dict[str, Any]:
        resolved = await resolve_overlaybd(self.client, ref)
        m.via = resolved.via

        async def open_blob(digest: str, size: int) -> HttpBlobSource:
            return await HttpBlobSource.open(self.client, resolved.image, digest)

        blobs = [LayerBlob(d.digest, d.size) for d in resolved.layers]
        m.image = await open_image(blobs, open_blob, cache=self.cache,
                                   chunk_cache=self.chunk_cache)
        m.name = f"img{os.getpid()}"
        served = self.fs.add(m.name, m.image.device)
        if params.get("record_trace"):
            m.recorder = attach_recorder(m.image, served, params["record_trace"])
        source: tracefmt.TraceFile | tracefmt.PriorityList | None = None
        if params.get("prefetch"):
            with open(params["prefetch"], "rb") as f:
                source = tracefmt.decode_prefetch_input(f.read())
        elif resolved.acceleration_layer is not None:
            blob = await self.client.get_blob(resolved.image, resolved.acceleration_layer)
            source = tracefmt.decode_prefetch_input(tracefmt.trace_from_acceleration_layer(blob))
        concurrency = int(params.get("concurrency") or self.concurrency)
        if isinstance(source, tracefmt.TraceFile):
            # A trace names layer ranges: start at once, overlapping the ext4 mount itself.
            m.prefetcher = Prefetcher(m.image, source, concurrency)
            self.nursery.start_soon(self._prefetch, m)
        m.read_ahead_kb = choose_read_ahead_kb(
            params.get("read_ahead_kb"),
            planned=source is not None or bool(params.get("record_trace")))
        m.loop = await attach_loop(os.path.join(self.fuse_dir, m.name, "block"), readonly=True,
                                   read_ahead_kb=m.read_ahead_kb)
        await mount_ext4(m.loop, target, readonly=True)
        m.target = target
        if isinstance(source, tracefmt.PriorityList):  # paths need the mounted filesystem
            m.prefetcher = Prefetcher(m.image, source, concurrency, root=target)
            self.nursery.start_soon(self._prefetch, m)
        elif source is None:
            m.prefetch_done.set()
        return {"target": target, "via": resolved.via, "layers": len(blobs),
                "size": m.image.device.size,
                "acceleration_layer": resolved.acceleration_layer is not None}

    async def _prefetch(self, m: _Mount) -> None:
        assert m.prefetcher is not None
        try:
            with m.cancel:
                await m.prefetcher.run()
        finally:
            m.prefetch_done.set()

    def status(self) -> dict[str, Any]:
        m = self.mounted
        if m is None or m.image is None:
            return {"mounted": False}
        stats = m.image.statistics()
        served = self.fs.get(m.name)
        return {
            "mounted": True, "target": m.target, "via": m.via, "read_ahead_kb": m.read_ahead_kb,
            "bytes_read": served.bytes_read if served else 0,
            "reads": served.reads if served else 0,
            **{k: v for k, v in asdict(stats).items() if k != "unverified_layers"},
            "prefetch": asdict(m.prefetcher.statistics()) if m.prefetcher else None,
            "recorder": asdict(m.recorder.statistics()) if m.recorder else None,
        }

    async def settle(self) -> None:
        """Let the mounted image's fetches in flight land (see ``OpenImage.settle``)."""
        if self.mounted is not None and self.mounted.image is not None:
            await self.mounted.image.settle()

    async def umount(self) -> dict[str, Any]:
        m = self.mounted
        if m is None:
            raise UsageError("nothing is mounted")
        await self.settle()
        status = self.status() if m.image is not None else {}
        m.cancel.cancel()
        with trio.CancelScope(shield=True):
            if m.recorder is not None:
                await m.recorder.close()
            if m.target and is_mountpoint(m.target):
                await unmount(m.target)
            if m.loop:
                await detach_loop(m.loop)
            if self.fs.get(m.name) is not None:
                self.fs.remove(m.name)
            if m.image is not None:
                await m.image.aclose()
        self.mounted = None
        return status


async def _commands(server: Server) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with stdin:
        while True:
            while b"\n" not in buffer:
                chunk = await stdin.receive_some(65536)
                if not chunk:
                    return
                buffer += chunk
            line, buffer = buffer.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                op = request.get("op")
                if op == "mount":
                    answer = await server.mount(request)
                elif op == "status":
                    if request.get("settle"):
                        await server.settle()
                    answer = server.status()
                elif op == "wait_prefetch":
                    if server.mounted is not None:
                        await server.mounted.prefetch_done.wait()
                        await server.settle()  # the kernel's own read-ahead
                    answer = server.status()
                elif op == "umount":
                    answer = await server.umount()
                elif op == "exit":
                    return
                else:
                    raise UsageError(f"unknown op {op!r}")
            except (OverlaybdError, OSError, ValueError, KeyError) as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            _reply(answer)


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _serve(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise UsageError("serving images needs root (FUSE, loop devices and mounts)")
    os.makedirs(args.state_dir, exist_ok=True)
    cache = BlockCache.open(args.cache_dir, 0)
    client = await RegistryClient.open(ClientConfig(plain_http=args.plain_http))
    fuse_dir = os.path.join(args.state_dir, "fuse")
    try:
        async with serve_blockfs(fuse_dir) as fs, trio.open_nursery() as nursery:
            server = Server(fs, fuse_dir, cache, client, nursery, args.concurrency)

            async def watch_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch_signals)
            _reply({"ready": True, "pid": os.getpid()})
            try:
                await _commands(server)
            finally:
                if server.mounted is not None:
                    with trio.CancelScope(shield=True):
                        await server.umount()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await cache.stop_background()
            await client.aclose()
        cache.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m overlaybd_py.coldstart.lazymount")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--plain-http", action="store_true")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        trio.run(_serve, args)
    except OverlaybdError as exc:
        print(f"lazymount: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0



class LazyMountProcess:
    """The caller's side (synchronous): start the server, send requests, stop it by pid.

    ``start`` returns once the server answered ``ready`` (imports and FUSE set up), so that
    a timed ``mount`` measures the mount, not Python's start-up.
    """

    def __init__(self, state_dir: str, cache_dir: str, *, plain_http: bool = True,
                 concurrency: int = DEFAULT_CONCURRENCY, log_path: str | None = None,
                 verbose: bool = False) -> None:
        self.state_dir = state_dir
        self.cache_dir = cache_dir
        self.plain_http = plain_http
        self.concurrency = concurrency
        self.log_path = log_path or os.path.join(state_dir, "lazymount.log")
        self.verbose = verbose
        self.process: Any = None

    def start(self, timeout: float = 60.0) -> LazyMountProcess:
        import subprocess

        os.makedirs(self.state_dir, exist_ok=True)
        argv = [sys.executable, "-m", "overlaybd_py.coldstart.lazymount",
                "--state-dir", self.state_dir, "--cache-dir", self.cache_dir,
                "--concurrency", str(self.concurrency)]
        if self.plain_http:
            argv.append("--plain-http")
        if self.verbose:
            argv.append("-vv")
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=log_file, start_new_session=True)
        ready = self._read(timeout)
        if not ready.get("ready"):
            raise RuntimeError(f"lazymount did not start: {ready}")
        return self

    def _read(self, timeout: float) -> dict[str, Any]:
        import select

        assert self.process is not None and self.process.stdout is not None
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else b""
        if not line:
            self.stop()
            with open(self.log_path, errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"lazymount stopped answering; its log:\n{tail}")
        return json.loads(line)

    def request(self, op: str, timeout: float = 600.0, **params: Any) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write((json.dumps({"op": op, **params}) + "\n").encode())
        self.process.stdin.flush()
        answer = self._read(timeout)
        if "error" in answer:
            raise RuntimeError(f"lazymount {op}: {answer['error']}")
        return answer

    def stop(self, timeout: float = 60.0) -> None:
        """Ask it to exit (it unmounts first); SIGTERM, then SIGKILL, by pid."""
        import subprocess

        process, self.process = self.process, None
        if process is None:
            return
        try:
            if process.poll() is None and process.stdin is not None:
                process.stdin.close()  # EOF: unmount and exit
            process.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        finally:
            if process.stdout is not None:
                process.stdout.close()


if __name__ == "__main__":
    sys.exit(main())

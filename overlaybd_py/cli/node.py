"""``overlaybd-py mount|umount|status|cache|daemon``: the node side.

``mount`` hands the image to the node daemon (starting one if none runs) and returns once
TARGET is mounted; ``--foreground`` serves it from this process until Ctrl-C. ``umount`` and
``status`` find the serving process from its records under the state directory and clean up
what dead foreground servers left behind. A stopped node daemon's mounts are left for its
next start, which re-serves them; ``status`` lists them as ``unserved`` and ``umount``
removes one directly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import DAEMON_DIR, load_config, parse_size
from ..control import ensure_daemon, request, responds
from ..errors import NotOverlaybdError, UsageError
from ._output import emit_json, emit_table, human_bytes
from .image import client_from_args, registry_flags, registry_options

if TYPE_CHECKING:  # the engine, daemon and trio are imported where used (cli/__init__)
    from ..config import NodeConfig
    from ..convert.unpack import UnpackResult

__all__ = ["node_config", "node_options", "register"]


def node_options(parser: argparse.ArgumentParser) -> None:
    """The flags that locate a node: config file, state and cache directories."""
    group = parser.add_argument_group("node")
    group.add_argument("--config", metavar="FILE",
                       help="node config (default /etc/overlaybd-py/config.toml if present)")
    group.add_argument("--state-dir", metavar="DIR",
                       help="run-time state and control sockets (default /run/overlaybd-py)")
    group.add_argument("--cache-dir", metavar="DIR",
                       help="block cache directory (default /var/lib/overlaybd-py/cache)")
    group.add_argument("--cache-size", metavar="SIZE",
                       help="block cache cap, e.g. 10GiB (default: the config's, else none)")


def node_config(args: argparse.Namespace) -> NodeConfig:
    """The config file named by ``--config`` (or the default) with the flags applied."""
    config = load_config(args.config)
    return config.with_overrides(
        state_dir=args.state_dir or os.environ.get("OVERLAYBD_PY_STATE_DIR"),
        cache_dir=args.cache_dir,
        cache_size=parse_size(args.cache_size, "--cache-size") if args.cache_size else None,
    )


def _need_root() -> None:
    if os.geteuid() != 0:
        raise UsageError("this needs root (FUSE, loop devices and mounts)")


def _mount_params(args: argparse.Namespace) -> dict[str, Any]:
    username, password, _mirrors = registry_flags(args)
    if (args.proxy or args.mirror or args.ca_file) and not args.fallback:
        raise UsageError("--proxy, --mirror and --ca-file do not apply to a lazy mount: the "
                         "node daemon uses its config's [registry] proxy, mirrors and ca_file "
                         "(on mount they only apply to the --fallback pull)")
    return {
        "ref": args.ref, "target": os.path.abspath(args.target), "rw": args.rw,
        "upper": os.path.abspath(args.upper) if args.upper else None,
        "platform": args.platform, "plain_http": args.plain_http,
        "username": username, "password": password if username else None,
        "record_trace": os.path.abspath(args.record_trace) if args.record_trace else None,
        "prefetch": os.path.abspath(args.prefetch) if args.prefetch else None,
        "read_ahead_kb": _read_ahead_kb(args.read_ahead),
    }


def _read_ahead_kb(value: str | None) -> int | None:
    """``--read-ahead SIZE`` in KiB (None: the node chooses; see mount.py)."""
    if value is None:
        return None
    from ..mount import choose_read_ahead_kb

    size = parse_size(value, "--read-ahead")
    try:
        if size % 1024:
            raise UsageError(f"read-ahead must be a multiple of 4 KiB, not {size} bytes")
        return choose_read_ahead_kb(size // 1024, planned=False)
    except UsageError as exc:
        raise UsageError(f"--read-ahead {value}: {exc} (e.g. 128K, 8M; 0 turns it off)") \
            from None


def _report_mount(result: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        emit_json(result)
    else:
        print(f"mounted {args.ref} at {result['target']} ({result['layers']} layers, "
              f"{human_bytes(result['size'])} device, via {result['via']})")


def _mount(args: argparse.Namespace) -> int:
    _need_root()
    if args.upper and not args.rw:
        raise UsageError("--upper needs --rw")
    if args.prefetch and not os.path.isfile(args.prefetch):
        raise UsageError(f"--prefetch {args.prefetch}: no such file")
    if args.record_trace and not os.path.isdir(os.path.dirname(os.path.abspath(
            args.record_trace))):
        raise UsageError(f"--record-trace {args.record_trace}: its directory does not exist")
    try:
        try:
            return _mount_lazily(args)
        except BaseExceptionGroup as group:
            from ..engine._tasks import unwrap_group

            raise unwrap_group(group) from None
    except NotOverlaybdError as exc:
        if not args.fallback:
            raise
        print(f"{exc}\n--fallback: pulling and unpacking it instead", file=sys.stderr)
        return _unpack_fallback(args)


def _unpack_fallback(args: argparse.Namespace) -> int:
    """An ordinary full pull into TARGET (a plain directory, not a mount)."""
    import trio

    from ..convert.unpack import unpack_image
    from ..formats.oci import Platform
    from ..registry import Reference

    target = os.path.abspath(args.target)
    if not os.path.isdir(target):
        raise UsageError(f"mount target {target} is not a directory")
    if os.listdir(target):
        raise UsageError(f"--fallback unpacks into TARGET, which must be empty: {target}")
    platform = Platform.from_spec(args.platform) if args.platform else None

    async def main() -> UnpackResult:
        async with await client_from_args(args) as client:
            return await unpack_image(client, Reference.parse(args.ref), target, platform)

    result = trio.run(main)
    if args.json:
        emit_json({"target": target, "fallback": True, "digest": result.digest,
                   "layers": result.layers, "bytes_downloaded": result.bytes_downloaded})
    else:
        print(f"unpacked {args.ref} ({result.layers} layers, "
              f"{human_bytes(result.bytes_downloaded)} downloaded) into {target}: a plain "
              "directory, not a lazy mount (remove it with rm -rf; umount does not apply)")
    return 0


def _mount_lazily(args: argparse.Namespace) -> int:
    config = node_config(args)
    params = _mount_params(args)
    if args.foreground:
        import trio

        from ..daemon import NodeServer, run_foreground

        server_dir = str(Path(config.state_dir) / f"fg-{os.getpid()}")
        server = NodeServer(config, server_dir, exit_when_idle=True)

        def ready(result: dict[str, Any]) -> None:
            _report_mount(result, args)
            print("serving in the foreground; Ctrl-C unmounts", file=sys.stderr, flush=True)

        trio.run(run_foreground, server, params, ready)
        return 0
    sock = ensure_daemon(config, args.config)
    _report_mount(request(sock, "mount", **params), args)
    return 0


def _owner_of(config: NodeConfig, target: str) -> tuple[Path, str] | None:
    from ..daemon import read_records, server_dirs

    real = os.path.realpath(target)
    for server_dir in server_dirs(config.state_dir):
        for record in read_records(server_dir):
            if record.target == real:
                return server_dir, real
    return None


def _clean_up_dead_servers(config: NodeConfig) -> list[str]:
    """Tear down what dead foreground servers left; trio is loaded only if there is some."""
    from ..daemon import dead_server_dirs

    if not dead_server_dirs(config.state_dir, daemon=False):
        return []
    import trio

    from ..daemon import cleanup_stale

    return trio.run(lambda: cleanup_stale(config.state_dir, daemon=False))


def _umount(args: argparse.Namespace) -> int:
    from ..daemon import socket_of

    _need_root()
    config = node_config(args)
    _clean_up_dead_servers(config)
    owner = _owner_of(config, args.target)
    if owner is None:
        raise UsageError(f"{args.target} is not mounted by overlaybd-py "
                         f"(no record under {config.state_dir})")
    server_dir, target = owner
    sock = socket_of(server_dir)
    removed = None
    if server_dir.name == DAEMON_DIR and not responds(sock):
        # The node daemon is stopped: remove the mount it would re-serve at its next start.
        import trio

        from ..daemon import remove_unserved

        removed = trio.run(remove_unserved, config, target)
        if removed is None:  # a daemon was starting after all: it serves the mount now
            sock = ensure_daemon(config, args.config)
    if removed is not None:
        result = {"target": target, "upper": removed.upper if removed.keep_upper else None}
    else:
        result = request(sock, "umount", target=target)
    if args.json:
        emit_json(result)
    else:
        kept = f" (writable layer kept in {result['upper']})" if result.get("upper") else ""
        print(f"unmounted {target}{kept}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from ..daemon import read_records, server_dirs, socket_of

    config = node_config(args)
    cleaned = _clean_up_dead_servers(config) if os.geteuid() == 0 else []
    mounts: list[dict[str, Any]] = []
    unserved: list[dict[str, Any]] = []
    target = os.path.realpath(args.target) if args.target else None
    cache = None
    for server_dir in server_dirs(config.state_dir):
        sock = socket_of(server_dir)
        if not responds(sock):
            # A stopped node daemon: its mounts wait for its next start.
            unserved.extend({"image": r.ref, "target": r.target, "writable": not r.readonly,
                             "owner": r.owner}
                            for r in read_records(server_dir)
                            if target is None or r.target == target)
            continue
        answer = request(sock, "status", target=args.target, settle=args.settle)
        mounts.extend(answer["mounts"])
        if server_dir.name == DAEMON_DIR or cache is None:
            cache = answer.get("cache")
    if args.target and not mounts and not unserved:
        raise UsageError(f"{args.target} is not mounted by overlaybd-py")
    if args.json:
        emit_json({"mounts": mounts, "unserved": unserved, "cache": cache,
                   "cleaned_up": cleaned})
        return 0
    if cleaned:
        print(f"cleaned up mounts left by dead servers: {', '.join(cleaned)}")
    for m in unserved:
        print(f"{m['target']}: {m['image']} (node daemon stopped: reads fail until it "
              "starts again and re-serves it)")
    if not mounts and not unserved:
        print("no overlaybd-py mounts")
    for m in mounts:
        state = "" if m.get("state", "serving") == "serving" else f" ({m['state']})"
        print(f"{m['target']}: {m['image']}{state}")
        rows = [("bytes read", human_bytes(m["bytes_read"])),
                ("bytes fetched", human_bytes(m["bytes_fetched"])),
                ("cache hits / misses", f"{m['cache_hits']} / {m['cache_misses']}"),
                ("requests", m["requests"]),
                ("read-ahead", human_bytes(m["read_ahead_kb"] * 1024)
                 if "read_ahead_kb" in m else "-"),
                ("fetch p50 / p99", f"{m['fetch_p50_ms']} / {m['fetch_p99_ms']} ms"),
                ("writable", m["writable"])]
        if m["unverified_layers"]:
            rows.append(("unverified layers", ", ".join(m["unverified_layers"])
                         + " (plain LSMT: no checksums)"))
        emit_table([(f"  {k}", v) for k, v in rows])
    return 0


def _cache(args: argparse.Namespace) -> int:
    config = node_config(args)
    max_size = parse_size(args.max_size, "--max-size") if args.max_size else None
    sock = config.daemon_socket
    if responds(sock):
        result = request(sock, "cache", action=args.action, max_size=max_size)
    else:
        from ..engine.block_cache import BlockCache

        cache = BlockCache.open(config.cache_dir, config.cache_size)
        try:
            if args.action == "ls":
                from dataclasses import asdict

                result = {"blobs": [asdict(b) for b in cache.list_blobs()],
                          "size": cache.size(), "capacity": cache.capacity}
            elif args.action == "gc":
                limit = max_size if max_size is not None else cache.capacity
                if not limit:
                    raise UsageError("cache gc needs a size cap: --max-size or cache_size")
                result = {"evicted_bytes": cache.evict(limit), "size": cache.size()}
            else:
                result = {"freed_bytes": cache.clear(), "size": cache.size()}
        finally:
            cache.close()
    if args.json:
        emit_json(result)
    elif args.action == "ls":
        for blob in result["blobs"]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(blob["last_access"])) \
                if blob["last_access"] else "-"
            print(f"{blob['digest']}  {human_bytes(blob['cached_bytes']):>10} of "
                  f"{human_bytes(blob['blob_size']):>10}  last used {when}")
        cap = human_bytes(result["capacity"]) if result["capacity"] else "no cap"
        print(f"total {human_bytes(result['size'])} ({cap})")
    elif args.action == "gc":
        print(f"evicted {human_bytes(result['evicted_bytes'])}; "
              f"cache now {human_bytes(result['size'])}")
    else:
        print(f"freed {human_bytes(result['freed_bytes'])}")
    return 0


def _daemon(args: argparse.Namespace) -> int:
    _need_root()
    config = node_config(args)
    if not args.foreground:
        sock = ensure_daemon(config, args.config)
        print(f"node daemon running (control socket {sock})")
        return 0
    import trio

    from ..daemon import NodeServer, serve_until_stopped

    server = NodeServer(config, config.daemon_dir, daemon=True)
    trio.run(serve_until_stopped, server)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("mount", help="mount an image lazily at TARGET")
    p.add_argument("ref", metavar="REF")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--rw", action="store_true", help="writable: writes go to a local layer")
    p.add_argument("--upper", metavar="DIR",
                   help="keep the writable layer's data/index files in DIR (with --rw)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]")
    p.add_argument("--record-trace", metavar="FILE",
                   help="record every read until umount (or until FILE.lock is deleted): "
                   "FILE in the original overlaybd trace format, FILE.jsonl as timed events")
    p.add_argument("--prefetch", metavar="FILE",
                   help="replay a trace (or a priority list of paths) into the cache while "
                   "the image is in use")
    p.add_argument("--read-ahead", metavar="SIZE",
                   help="the kernel's read-ahead on the image's block device, e.g. 128K or "
                   "8M (default: 2M for a lazy mount; 128K with --prefetch, --record-trace "
                   "or an image's acceleration layer, so the start reads, fetches and "
                   "records only what it uses)")
    p.add_argument("--fallback", action="store_true",
                   help="if the image has no overlaybd form, pull and unpack it into TARGET")
    p.add_argument("--foreground", action="store_true",
                   help="serve from this process until Ctrl-C (which unmounts)")
    p.add_argument("--json", action="store_true")
    registry_options(p)
    node_options(p)
    p.set_defaults(func=_mount)

    p = subparsers.add_parser("umount", help="unmount TARGET and stop serving it")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--json", action="store_true")
    node_options(p)
    p.set_defaults(func=_umount)

    p = subparsers.add_parser("status", help="what is mounted, what it read and fetched")
    p.add_argument("target", metavar="TARGET", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--settle", action="store_true",
                   help="wait for the fetches in flight (read-ahead) so the counters include them")
    node_options(p)
    p.set_defaults(func=_status)

    p = subparsers.add_parser("cache", help="list, trim or clear the block cache")
    p.add_argument("action", choices=("ls", "gc", "clear"))
    p.add_argument("--max-size", metavar="SIZE", help="gc: evict down to this size")
    p.add_argument("--json", action="store_true")
    node_options(p)
    p.set_defaults(func=_cache)

    p = subparsers.add_parser(
        "daemon", help="run the node daemon",
        description="Run the node daemon: it serves every image of the node over one FUSE "
        "mount and one block cache, answers the control API and, if configured, metrics. "
        "SIGTERM stops it keeping its mounts, which the next start re-serves.")
    p.add_argument("--foreground", action="store_true",
                   help="run in this process (what a service manager wants); without it, "
                   "start it in the background unless one runs, and return")
    node_options(p)
    p.set_defaults(func=_daemon)

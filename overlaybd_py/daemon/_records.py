"""What a serving process leaves on disk, and removing it: mount records, their layer
lists, and the clean-up of mounts whose server is gone.

A *server directory* holds ``pid``, ``control.sock``, the FUSE mount point ``fuse/``, one JSON
record per mount in ``mounts/`` and private writable layers in ``uppers/``. The node daemon
uses ``<state>/daemon``; a ``--foreground`` mount uses ``<state>/fg-<pid>``. No trio nursery,
no FUSE here: only files, ``mount`` and ``losetup``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import DAEMON_DIR, NodeConfig
from ..errors import MountError, OverlaybdError, UsageError
from ..formats.oci import validate_digest
from ..mount import (
    READAHEAD_KB,
    detach_loop,
    is_mountpoint,
    loops_backed_by,
    mounts_under,
    source_of,
    unmount,
)

__all__ = [
    "LayerSpec",
    "MountRecord",
    "cleanup_stale",
    "dead_server_dirs",
    "read_records",
    "remove_unserved",
    "server_dirs",
    "socket_of",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSpec:
    """One layer blob of a mount: in a registry repository (``ref``) or a local file."""

    digest: str
    size: int
    ref: str | None = None  # any reference naming the repository that holds the blob
    path: str | None = None  # a local layer file (a blob unpacked by plain `ctr image pull`)

    @classmethod
    def parse(cls, value: Any, where: str) -> LayerSpec:
        """From the control API's JSON; raises UsageError naming what is wrong."""
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected an object")
        try:
            spec = cls(str(validate_digest(value.get("digest"))), int(value["size"]),
                       value.get("ref"), value.get("path"))
        except (KeyError, TypeError, ValueError, OverlaybdError) as exc:
            raise UsageError(f"{where}: {exc}") from None
        if spec.size < 0 or (spec.ref is None) == (spec.path is None):
            raise UsageError(f"{where}: needs a size and exactly one of 'ref' and 'path'")
        if spec.path is not None and not os.path.isabs(spec.path):
            raise UsageError(f"{where}: path {spec.path!r} is not absolute")
        if spec.ref is not None:
            from ..registry import Reference  # here: the CLI's status stays light

            Reference.parse(spec.ref)
        return spec


@dataclass
class MountRecord:
    id: str
    ref: str  # what was asked for: a reference, or the snapshotter's image-ref label
    image: str  # the overlaybd manifest (or top layer) actually served
    via: str
    target: str
    block: str  # the FUSE file behind the loop device
    loop: str
    readonly: bool
    upper: str | None
    keep_upper: bool
    pid: int
    created: float
    layers: list[dict[str, Any]] = field(default_factory=list)  # LayerSpec fields, bottom first
    plain_http: bool = False
    owner: str = "cli"  # "cli" or "snapshotter:<root>"
    suspended: bool = False  # writable, unmounted cleanly at a daemon stop: mount again
    read_ahead_kb: int = READAHEAD_KB  # the loop device's (mount.choose_read_ahead_kb)


def server_dirs(state_dir: str) -> list[Path]:
    root = Path(state_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and (p.name == DAEMON_DIR or p.name.startswith("fg-")))


def socket_of(server_dir: str | os.PathLike[str]) -> str:
    """The control socket of the server that owns ``server_dir``."""
    return os.path.join(server_dir, "control.sock")


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


_RECORD_FIELDS = {f.name for f in fields(MountRecord)}


def read_records(server_dir: Path) -> list[MountRecord]:
    records = []
    for path in sorted((server_dir / "mounts").glob("*.json")):
        try:
            data = json.loads(path.read_text())
            records.append(MountRecord(**{k: v for k, v in data.items() if k in _RECORD_FIELDS}))
        except (OSError, ValueError, TypeError):
            log.warning("ignoring unreadable mount record %s", path)
    return records


def _write_record(server_dir: Path, record: MountRecord) -> None:
    path = server_dir / "mounts" / f"{record.id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, path)


def _drop_record(server_dir: Path, record: MountRecord) -> None:
    (server_dir / "mounts" / f"{record.id}.json").unlink(missing_ok=True)


def _loop_serves(loop: str, record: MountRecord) -> bool:
    """True if ``loop`` is still attached to this record's block file. The kernel shows a
    backing file on a detached (dead) FUSE mount by its path inside that mount, so only the
    ``<id>/block`` tail is compared; ids are random, so a reused loop device never matches."""
    name = os.path.basename(loop)
    try:
        backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return False
    return backing.removesuffix(" (deleted)").endswith(f"/{record.id}/block")


async def _teardown(record: MountRecord, *, lazy: bool) -> None:
    """Undo one mount: ext4, then the loop device. Tolerates steps already undone."""
    if is_mountpoint(record.target) and source_of(record.target) == record.loop:
        await unmount(record.target, lazy=lazy)
    loops = {record.loop} if record.loop and _loop_serves(record.loop, record) else set()
    loops.update(await loops_backed_by(record.block))
    for loop in sorted(loops):
        await detach_loop(loop)  # a loop still in use is freed when its last user closes it


def _forget(server_dir: Path, record: MountRecord) -> None:
    if record.upper and not record.keep_upper:
        shutil.rmtree(record.upper, ignore_errors=True)
    _drop_record(server_dir, record)


async def _release_fuse(server_dir: Path) -> None:
    """Lazily unmount the FUSE file system a dead server left (it answers ENOTCONN)."""
    for point in mounts_under(str(server_dir / "fuse")):
        with contextlib.suppress(MountError):
            await unmount(point, lazy=True)


def dead_server_dirs(state_dir: str, *, daemon: bool = True) -> list[Path]:
    """The directories of serving processes that are gone (what ``cleanup_stale`` cleans);
    ``daemon=False`` leaves out the node daemon's."""
    dead = []
    for server_dir in server_dirs(state_dir):
        if server_dir.name == DAEMON_DIR and not daemon:
            continue
        pid = _read_pid(server_dir)
        if pid is not None and (pid == os.getpid() or _pid_alive(pid)):
            continue
        dead.append(server_dir)
    return dead


async def cleanup_stale(state_dir: str, *, daemon: bool = True) -> list[str]:
    """Remove what dead serving processes left behind. Returns the targets cleaned.

    ``daemon=False`` leaves a dead node daemon's directory alone: its next start re-serves
    those mounts. Foreground servers' leftovers are always removed.
    """
    cleaned = []
    for server_dir in dead_server_dirs(state_dir, daemon=daemon):
        pid = _read_pid(server_dir)
        for record in read_records(server_dir):
            log.info("cleaning up %s left by dead server %s", record.target, pid)
            try:
                await _teardown(record, lazy=True)
            except MountError as exc:
                log.warning("clean-up of %s incomplete: %s", record.target, exc)
                continue
            cleaned.append(record.target)
            _forget(server_dir, record)
        await _release_fuse(server_dir)
        if not read_records(server_dir):
            shutil.rmtree(server_dir, ignore_errors=True)
    return cleaned


async def remove_unserved(config: NodeConfig, target: str) -> MountRecord | None:
    """Tear down one mount of the node daemon while it is stopped (``umount`` then). Holds
    the daemon's lock meanwhile, so no daemon starts re-serving it halfway. Returns the record
    removed; None if a daemon runs after all (ask it instead) or no record names ``target``."""
    fd = os.open(config.daemon_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        server_dir = Path(config.daemon_dir)
        for record in read_records(server_dir):
            if record.target == target:
                await _teardown(record, lazy=True)
                _forget(server_dir, record)
                return record
        return None
    finally:
        os.close(fd)

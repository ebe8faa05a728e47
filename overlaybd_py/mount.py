"""Loop device and ext4 mount orchestration (root only), and clean-up of leftovers.

A served image's ``block`` file is attached to a loop device (read-only unless writable)
and the ext4 inside is mounted at the target. Every step is undone in reverse order, and a
mount whose server died (a killed process leaves a FUSE mount answering ENOTCONN, a loop
device and an ext4 mount) can be found from its state record and cleaned.
"""

from __future__ import annotations

import logging
import os
import subprocess

from .errors import MountError, UsageError

__all__ = [
    "attach_loop",
    "choose_read_ahead_kb",
    "detach_loop",
    "is_mountpoint",
    "loops_backed_by",
    "mount_ext4",
    "mounts_under",
    "unmount",
]

log = logging.getLogger(__name__)


async def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a system tool without blocking the event loop (the FUSE server lives on it:
    ``mount`` makes the kernel read the image through us while the tool runs)."""
    import trio  # here, not at import: the CLI's start-up stays light (cli/__init__)

    proc = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True,
                                  check=False)
    if check and proc.returncode:
        err = proc.stderr.decode(errors="replace").strip()
        raise MountError(f"{' '.join(argv)} failed (exit {proc.returncode}): {err}")
    return proc


# Kernel read-ahead on the loop device, for a lazy mount: larger windows mean fewer, larger
# FUSE requests, and a read that misses fetches its whole window in one request; mmap faults
# read around the faulting page by this much too, and the start waits for what a wider
# window brings. `import numpy, pandas`, lazy, medians of 3 (2026-11-28): 200 Mbit/10 ms
# (zstd 64 KiB) 8 MiB 4.72/4.92 s, 4 MiB 4.59/4.75 s, 2 MiB 4.42/4.50/4.52 s, 1 MiB
# 4.73/4.41 s, 512 KiB 4.64 s, 128 KiB 5.6 s; loopback (lz4) 8 MiB 2.06/2.25 s, 2 MiB
# 1.89/1.96 s; 200 Mbit/10 ms (lz4) 8 MiB 5.61 s, 2 MiB 5.62 s.
READAHEAD_KB = 2048
# ... and for a mount that prefetches a trace or records one: the kernel's default. The
# prefetch brings what the start reads, so a wide window would only make the kernel read
# (and us decompress) what the start never uses, and a trace recorded under it would
# replay all of that over the link: numpy + pandas read 85 MiB of the device at 8 MiB and
# 56 MiB at 128 KiB (32 and 64 KiB: the same 56 MiB); its prefetch at 200 Mbit/10 ms
# fetched 25.7 instead of 33.8 MiB and started in 2.0 instead of 2.5 s.
LEAN_READAHEAD_KB = 128
MAX_READAHEAD_KB = 65536
# The loop device's largest request. Its default (1280 KiB) reaches the FUSE file as a
# 1 MiB read (FUSE's largest) plus a 256 KiB one; 1 MiB requests map one to one.
MAX_REQUEST_KB = 1024


async def attach_loop(path: str, *, readonly: bool, read_ahead_kb: int = READAHEAD_KB) -> str:
    """Attach ``path`` to a free loop device; returns ``/dev/loopN``."""
    argv = ["losetup", "--find", "--show", "--direct-io=on"]
    if readonly:
        argv.append("--read-only")
    proc = await _run(*argv, path, check=False)
    if proc.returncode:
        # Some kernels/filesystems refuse direct I/O on the backing file: fall back.
        argv.remove("--direct-io=on")
        proc = await _run(*argv, path)
    device = proc.stdout.decode().strip()
    if not device.startswith("/dev/loop"):
        raise MountError(f"losetup printed {device!r}, expected a loop device")
    _set_queue(device, "read_ahead_kb", read_ahead_kb)
    _set_queue(device, "max_sectors_kb", MAX_REQUEST_KB)
    return device


def choose_read_ahead_kb(requested: object, *, planned: bool) -> int:
    """The loop device's read-ahead for a mount: ``requested`` (KiB, from a mount request;
    None for the default), else lean for a ``planned`` mount (prefetching or recording a
    trace) and wide for a plain lazy one."""
    if requested is None:
        return LEAN_READAHEAD_KB if planned else READAHEAD_KB
    if isinstance(requested, bool) or not isinstance(requested, int) \
            or not 0 <= requested <= MAX_READAHEAD_KB or requested % 4:
        # (the kernel keeps it in 4 KiB pages: 1-3 KiB would silently mean none)
        raise UsageError(f"read-ahead must be a multiple of 4 KiB from 0 to "
                         f"{MAX_READAHEAD_KB} KiB, not {requested!r}")
    return requested


def _set_queue(device: str, name: str, kb: int) -> None:
    path = f"/sys/block/{os.path.basename(device)}/queue/{name}"
    try:
        with open(path, "w") as f:
            f.write(str(kb))
    except OSError as exc:  # not fatal: the kernel default still works
        log.info("cannot set %s of %s: %s", name, device, exc)


async def detach_loop(device: str) -> None:
    proc = await _run("losetup", "--detach", device, check=False)
    if proc.returncode and b"No such device" not in proc.stderr:
        err = proc.stderr.decode(errors="replace").strip()
        raise MountError(f"losetup --detach {device} failed: {err}")


async def mount_ext4(device: str, target: str, *, readonly: bool,
                     extra_options: str = "") -> None:
    options = "ro,noload" if readonly else "rw"
    if extra_options:
        options += "," + extra_options
    await _run("mount", "-t", "ext4", "-o", options, device, target)


async def unmount(target: str, *, lazy: bool = False) -> None:
    argv = ["umount"] + (["--lazy"] if lazy else []) + [target]
    await _run(*argv)


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, source) of every mount, from /proc/self/mountinfo (unescaped)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            point = fields[4].encode().decode("unicode_escape")
            out.append((point, fields[sep + 2]))
    return out


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    return any(point == real for point, _ in _mountinfo())


def mounts_under(path: str) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    real = os.path.realpath(path)
    points = [p for p, _ in _mountinfo() if p == real or p.startswith(real.rstrip("/") + "/")]
    return sorted(points, key=len, reverse=True)


def source_of(target: str) -> str | None:
    real = os.path.realpath(target)
    for point, source in reversed(_mountinfo()):
        if point == real:
            return source
    return None


async def loops_backed_by(path: str) -> list[str]:
    """Loop devices whose backing file is ``path``."""
    proc = await _run("losetup", "--noheadings", "--output", "NAME,BACK-FILE", "--list",
                      check=False)
    devices = []
    for line in proc.stdout.decode().splitlines():
        name, _, back = line.strip().partition(" ")
        back = back.strip()
        if back.endswith(" (deleted)"):
            back = back[: -len(" (deleted)")]
        if back == path:
            devices.append(name)
    return devices

"""The variants of the cold-start experiment, and the runners and mounters they use.

A variant is measured by the harness as: ``setup`` (untimed: make the state cold or warm),
page caches dropped, then ``timed`` (from the first step of the start to CMD's exit), then
``after`` (untimed measurements and counters), then ``teardown``. To add a peer (another
lazy loader), write one more class with these four methods and add it to ``VARIANTS``;
``bench/README.md`` walks through it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import UsageError
from ..mount import READAHEAD_KB, is_mountpoint
from .lazymount import LazyMountProcess
from .servers import PrivateContainerd, shutil_which

if TYPE_CHECKING:
    from .harness import Bench

__all__ = ["VARIANTS", "Variant"]

log = logging.getLogger(__name__)

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def drop_caches() -> None:
    """Write back and drop the page, dentry and inode caches (the whole machine's)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _run(argv: list[str], what: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise UsageError(f"{what} failed ({proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return proc


def _umount_quietly(path: Path) -> None:
    if is_mountpoint(str(path)):
        subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if is_mountpoint(str(path)):
            subprocess.run(["umount", "--lazy", str(path)], capture_output=True, check=False)


# -- runners: run CMD in a root filesystem ----------------------------------------------------


class Runner(Protocol):
    name: str

    def start(self, bench: Bench) -> None: ...
    def full_pull_setup(self, bench: Bench, run: int) -> None: ...
    def full_pull(self, bench: Bench, run: int) -> str: ...
    def full_pull_workload(self, bench: Bench, run: int) -> str: ...
    def full_pull_teardown(self, bench: Bench, run: int) -> None: ...
    def run_rootfs(self, bench: Bench, rootfs: Path, tag: str) -> str: ...
    def stop(self) -> None: ...


class ContainerdRunner:
    """``ctr image pull`` (overlayfs snapshotter, unpacked) + ``ctr run --rm``, each full
    pull on a fresh private containerd; lazy rootfs run with ``ctr run --rootfs``."""

    name = "containerd"

    def __init__(self) -> None:
        self.lazy_ctd: PrivateContainerd | None = None
        self.full_ctd: PrivateContainerd | None = None

    def start(self, bench: Bench) -> None:
        self.lazy_ctd = PrivateContainerd(bench.work / "ctd-rootfs", bench.processes).start()

    def _run_argv(self, ctd: PrivateContainerd, image: list[str], tag: str,
                  cmd: str) -> list[str]:
        return ctd.ctr_argv("run", "--rm", "--env", PATH_ENV, *image, tag,
                            "/bin/sh", "-c", cmd)

    def full_pull_setup(self, bench: Bench, run: int) -> None:
        self.full_ctd = PrivateContainerd(bench.work / f"ctd-full-{run}",
                                          bench.processes).start()

    def full_pull(self, bench: Bench, run: int) -> str:
        assert self.full_ctd is not None
        ctd = self.full_ctd
        _run(ctd.ctr_argv("image", "pull", "--plain-http", "--snapshotter", "overlayfs",
                          bench.source_ref), "ctr image pull")
        return _run(self._run_argv(ctd, ["--snapshotter", "overlayfs", bench.source_ref],
                                   f"full-{run}", bench.cmd), "ctr run").stdout

    def full_pull_workload(self, bench: Bench, run: int) -> str:
        assert self.full_ctd is not None
        return _run(self._run_argv(self.full_ctd, ["--snapshotter", "overlayfs",
                                                   bench.source_ref],
                                   f"full-{run}-again", bench.cmd), "ctr run").stdout

    def full_pull_teardown(self, bench: Bench, run: int) -> None:
        if self.full_ctd is not None:
            self.full_ctd.stop()
            shutil.rmtree(self.full_ctd.root, ignore_errors=True)
            self.full_ctd = None

    def run_rootfs(self, bench: Bench, rootfs: Path, tag: str) -> str:
        assert self.lazy_ctd is not None
        return _run(self._run_argv(self.lazy_ctd, ["--rootfs", str(rootfs)], tag, bench.cmd),
                    "ctr run --rootfs").stdout

    def stop(self) -> None:
        for ctd in (self.full_ctd, self.lazy_ctd):
            if ctd is not None:
                ctd.stop()


class ChrootRunner:
    """Full pull = ``skopeo copy`` to an OCI layout + ``umoci raw unpack``; CMD runs with
    ``chroot`` (no containerd)."""

    name = "chroot"

    def __init__(self) -> None:
        self.rootfs: Path | None = None
        self.overlay: Path | None = None

    def start(self, bench: Bench) -> None:
        shutil_which("skopeo")
        shutil_which("umoci")

    def full_pull_setup(self, bench: Bench, run: int) -> None:
        self.rootfs = bench.work / f"full-{run}"
        shutil.rmtree(self.rootfs, ignore_errors=True)

    def full_pull(self, bench: Bench, run: int) -> str:
        assert self.rootfs is not None
        layout = self.rootfs / "layout"
        _run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{bench.source_ref}",
              f"oci:{layout}:latest"], "skopeo copy")
        _run(["umoci", "raw", "unpack", "--image", f"{layout}:latest",
              str(self.rootfs / "rootfs")], "umoci raw unpack")
        return self.run_rootfs(bench, self.rootfs / "rootfs", f"full-{run}")

    def full_pull_workload(self, bench: Bench, run: int) -> str:
        # The same files on an overlayfs, as a container runtime would see them.
        assert self.rootfs is not None
        self.overlay = self.rootfs / "merged"
        mount_overlay(self.rootfs / "rootfs", self.rootfs / "ovl", self.overlay)
        return self.run_rootfs(bench, self.overlay, f"full-{run}-again")

    def full_pull_teardown(self, bench: Bench, run: int) -> None:
        if self.overlay is not None:
            _umount_quietly(self.overlay)
            self.overlay = None
        if self.rootfs is not None:
            shutil.rmtree(self.rootfs, ignore_errors=True)
            self.rootfs = None

    def run_rootfs(self, bench: Bench, rootfs: Path, tag: str) -> str:
        return _run(["chroot", str(rootfs), "/usr/bin/env", "-i", PATH_ENV, "/bin/sh", "-c",
                     bench.cmd] if (rootfs / "usr/bin/env").exists() else
                    ["chroot", str(rootfs), "/bin/sh", "-c", bench.cmd], "chroot CMD").stdout

    def stop(self) -> None:
        if self.overlay is not None:
            _umount_quietly(self.overlay)


RUNNERS = {"containerd": ContainerdRunner, "chroot": ChrootRunner}


def mount_overlay(lower: Path, scratch: Path, merged: Path) -> None:
    """A writable container rootfs over a read-only lower, as a snapshotter makes it."""
    upper, work = scratch / "upper", scratch / "work"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    _run(["mount", "-t", "overlay", "overlay", "-o",
          f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], "mount overlay")


# -- mounters: an overlaybd image at a target -------------------------------------------------


class Mounter(Protocol):
    name: str

    def setup(self, bench: Bench, cache_dir: Path, tag: str) -> None: ...
    def mount(self, bench: Bench, target: Path, record_trace: Path | None,
              prefetch: Path | None, read_ahead_kb: int | None = None) -> None: ...
    def status(self, bench: Bench, target: Path) -> dict[str, Any]: ...
    def teardown(self, bench: Bench, target: Path) -> None: ...


class InProcessMounter:
    """``lazymount``: the recorder/prefetcher API around FUSE in a private serving process
    started before the clock (as a node daemon would be running)."""

    name = "inprocess"

    def __init__(self) -> None:
        self.server: LazyMountProcess | None = None

    def setup(self, bench: Bench, cache_dir: Path, tag: str) -> None:
        self.server = LazyMountProcess(str(bench.work / f"state-{tag}"), str(cache_dir),
                                       concurrency=bench.opts.concurrency,
                                       log_path=str(bench.work / f"lazymount-{tag}.log"))
        bench.processes_extra.append(self.server)  # before start: stopped even if interrupted
        self.server.start()

    def mount(self, bench: Bench, target: Path, record_trace: Path | None,
              prefetch: Path | None, read_ahead_kb: int | None = None) -> None:
        assert self.server is not None
        params: dict[str, Any] = {"read_ahead_kb": read_ahead_kb}
        if record_trace:
            params["record_trace"] = str(record_trace)
        if prefetch:
            params["prefetch"] = str(prefetch)
        self.server.request("mount", ref=bench.overlaybd_ref, target=str(target), **params)

    def status(self, bench: Bench, target: Path) -> dict[str, Any]:
        assert self.server is not None
        return self.server.request("status", settle=True)

    def teardown(self, bench: Bench, target: Path) -> None:
        if self.server is not None:
            with contextlib.suppress(RuntimeError):
                self.server.request("umount", timeout=300)
            self.server.stop()
            if self.server in bench.processes_extra:
                bench.processes_extra.remove(self.server)
            self.server = None


class CliMounter:
    """The real CLI: ``overlaybd-py daemon --foreground`` started before the clock, then
    ``overlaybd-py mount ... [--record-trace F] [--prefetch F]`` timed."""

    name = "cli"

    def __init__(self) -> None:
        self.daemon: subprocess.Popen | None = None
        self.flags: list[str] = []
        self.socket = ""

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "overlaybd_py", *args]

    def setup(self, bench: Bench, cache_dir: Path, tag: str) -> None:
        from ..control import responds

        # The daemon's control socket lives in its state dir: keep the path short (a unix
        # socket path has at most 108 bytes; the output directory may be deep).
        state = bench.scratch_dir(tag)
        config = bench.work / "node-config.toml"
        gap = f"gap = {bench.opts.gap}\n" if bench.opts.gap is not None else ""
        config.write_text(f"[prefetch]\nconcurrency = {bench.opts.concurrency}\n{gap}")
        self.flags = ["--config", str(config), "--state-dir", str(state),
                      "--cache-dir", str(cache_dir)]
        self.daemon = bench.processes.start(
            "overlaybd-py daemon", self._cli("daemon", "--foreground", *self.flags),
            bench.work / f"daemon-{tag}.log")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                tail = (bench.work / f"daemon-{tag}.log").read_text(errors="replace")[-1500:]
                raise UsageError(f"the node daemon exited ({self.daemon.returncode}):\n{tail}")
            sockets = [str(p) for p in state.glob("*/control.sock")]
            if sockets and responds(sockets[0]):
                self.socket = sockets[0]
                return
            time.sleep(0.05)
        raise UsageError("the node daemon did not answer on a control socket in 30 s")

    def mount(self, bench: Bench, target: Path, record_trace: Path | None,
              prefetch: Path | None, read_ahead_kb: int | None = None) -> None:
        extra = []
        if record_trace:
            extra += ["--record-trace", str(record_trace)]
        if prefetch:
            extra += ["--prefetch", str(prefetch)]
        if read_ahead_kb is not None:
            extra += ["--read-ahead", f"{read_ahead_kb}K"]
        _run(self._cli("mount", bench.overlaybd_ref, str(target), "--plain-http", *extra,
                       *self.flags), "overlaybd-py mount")

    def status(self, bench: Bench, target: Path) -> dict[str, Any]:
        out = _run(self._cli("status", str(target), "--json", "--settle", *self.flags),
                   "status").stdout
        (entry,) = json.loads(out)["mounts"]
        return entry

    def teardown(self, bench: Bench, target: Path) -> None:
        if is_mountpoint(str(target)):
            subprocess.run(self._cli("umount", str(target), *self.flags), capture_output=True,
                           check=False)
        if self.daemon is not None:
            bench.processes.stop(self.daemon, timeout=60)
            self.daemon = None


class DaemonMounter(CliMounter):
    """The node daemon, asked over its control socket as the snapshotter asks it (no CLI
    process per mount: a node's containerd does not start one either)."""

    name = "daemon"

    def mount(self, bench: Bench, target: Path, record_trace: Path | None,
              prefetch: Path | None, read_ahead_kb: int | None = None) -> None:
        from ..control import request

        request(self.socket, "mount", ref=bench.overlaybd_ref, target=str(target),
                plain_http=True, record_trace=str(record_trace) if record_trace else None,
                prefetch=str(prefetch) if prefetch else None, read_ahead_kb=read_ahead_kb)

    def status(self, bench: Bench, target: Path) -> dict[str, Any]:
        from ..control import request

        (entry,) = request(self.socket, "status", target=str(target), settle=True)["mounts"]
        return entry

    def teardown(self, bench: Bench, target: Path) -> None:
        from ..control import request

        if is_mountpoint(str(target)) and self.socket:
            with contextlib.suppress(Exception):
                request(self.socket, "umount", target=str(target))
        super().teardown(bench, target)


def cli_supports_traces() -> bool:
    """True once ``mount`` has working ``--record-trace``/``--prefetch`` (they show in help)."""
    proc = subprocess.run([sys.executable, "-m", "overlaybd_py", "mount", "--help"],
                          capture_output=True, text=True)
    return "--record-trace" in proc.stdout and "--prefetch" in proc.stdout


# -- variants ---------------------------------------------------------------------------------


class Variant(Protocol):
    name: str

    def setup(self, bench: Bench, run: int) -> None: ...
    def timed(self, bench: Bench, run: int) -> str: ...
    def after(self, bench: Bench, run: int) -> dict[str, Any]: ...
    def teardown(self, bench: Bench, run: int) -> None: ...


class FullPull:
    """a. The ordinary full pull: pull + unpack + run CMD."""

    name = "full_pull"

    def setup(self, bench: Bench, run: int) -> None:
        bench.runner.full_pull_setup(bench, run)

    def timed(self, bench: Bench, run: int) -> str:
        return bench.runner.full_pull(bench, run)

    def after(self, bench: Bench, run: int) -> dict[str, Any]:
        drop_caches()
        started = time.monotonic()
        bench.runner.full_pull_workload(bench, run)
        return {"workload_s": round(time.monotonic() - started, 4)}

    def teardown(self, bench: Bench, run: int) -> None:
        bench.runner.full_pull_teardown(bench, run)


class Lazy:
    """b. overlaybd-py lazy: mount + run CMD in an overlay over the mounted image. Each run
    records a trace for the report, with the read-ahead of a plain lazy mount (a recording
    mount's own default is the lean one)."""

    name = "lazy"
    read_ahead_kb: int | None = READAHEAD_KB  # None: what the node chooses for the mount

    def __init__(self) -> None:
        self.target: Path | None = None
        self.merged: Path | None = None
        self.trace: Path | None = None
        self.mount_s = 0.0  # of the last timed part: mount + overlay, before CMD starts

    def _paths(self, bench: Bench, run: int) -> None:
        base = bench.work / f"{self.name}-{run}"
        shutil.rmtree(base, ignore_errors=True)
        self.target, self.merged = base / "image", base / "rootfs"
        self.target.mkdir(parents=True)
        self.trace = bench.traces / f"{self.name}-{run}.trace"

    def cache_dir(self, bench: Bench, run: int) -> Path:
        cache = bench.work / f"cache-{self.name}"
        shutil.rmtree(cache, ignore_errors=True)  # cold: nothing cached
        return cache

    def setup(self, bench: Bench, run: int) -> None:
        self._paths(bench, run)
        bench.mounter.setup(bench, self.cache_dir(bench, run), f"{self.name}-{run}")

    def prefetch_input(self, bench: Bench) -> Path | None:
        return None

    def timed(self, bench: Bench, run: int) -> str:
        assert self.target is not None and self.merged is not None
        started = time.monotonic()
        bench.mounter.mount(bench, self.target, self.trace, self.prefetch_input(bench),
                            self.read_ahead_kb)
        mount_overlay(self.target, self.target.parent / "ovl", self.merged)
        self.mount_s = time.monotonic() - started
        return bench.runner.run_rootfs(bench, self.merged, f"{self.name}-{run}")

    def after(self, bench: Bench, run: int) -> dict[str, Any]:
        assert self.target is not None
        status = bench.mounter.status(bench, self.target)
        out = {"bytes_fetched_by_client": status.get("bytes_fetched"),
               "requests": status.get("requests"), "mount_s": round(self.mount_s, 4),
               "read_ahead_kb": status.get("read_ahead_kb")}
        if status.get("prefetch"):
            out["prefetch"] = status["prefetch"]
        return out

    def teardown(self, bench: Bench, run: int) -> None:
        if self.merged is not None:
            _umount_quietly(self.merged)
        if self.target is not None:
            bench.mounter.teardown(bench, self.target)
            _umount_quietly(self.target)


class LazyPrefetch(Lazy):
    """c. lazy with prefetch of a trace recorded before (``Bench.ensure_prefetch_trace``)."""

    name = "lazy_prefetch"
    read_ahead_kb = None

    def setup(self, bench: Bench, run: int) -> None:
        bench.ensure_prefetch_trace()  # untimed: recorded before the first prefetch run
        super().setup(bench, run)

    def prefetch_input(self, bench: Bench) -> Path | None:
        return bench.prefetch_trace


class Warm(Lazy):
    """d. warm: mount + run with every block the start needs in the block cache (the
    page cache dropped); then CMD again in the same rootfs for the workload-only time."""

    name = "warm"
    read_ahead_kb = None

    def cache_dir(self, bench: Bench, run: int) -> Path:
        return bench.work / "cache-warm"  # kept across warm runs; primed before the first

    def setup(self, bench: Bench, run: int) -> None:
        if run == 0:
            shutil.rmtree(bench.work / "cache-warm", ignore_errors=True)
            self._paths(bench, run)
            bench.mounter.setup(bench, self.cache_dir(bench, run), "warm-prime")
            bench.mounter.mount(bench, self.target, None, None)
            mount_overlay(self.target, self.target.parent / "ovl", self.merged)
            bench.runner.run_rootfs(bench, self.merged, "warm-prime")
            super().teardown(bench, run)
        super().setup(bench, run)
        self.trace = None  # nothing to learn from a warm start's trace

    def after(self, bench: Bench, run: int) -> dict[str, Any]:
        out = super().after(bench, run)
        assert self.merged is not None
        drop_caches()
        started = time.monotonic()
        bench.runner.run_rootfs(bench, self.merged, f"warm-{run}-again")
        out["workload_s"] = round(time.monotonic() - started, 4)
        return out


VARIANTS: dict[str, type] = {
    "full_pull": FullPull,
    "lazy": Lazy,
    "lazy_prefetch": LazyPrefetch,
    "warm": Warm,
}
MOUNTERS = {"inprocess": InProcessMounter, "daemon": DaemonMounter, "cli": CliMounter}

"""The processes the benchmark runs: docker-registry (on 127.0.0.1 or inside the namespace),
the delay proxy, a private containerd. Each is started in its own session (a Ctrl-C reaches
only the benchmark, which then stops them in order) and stopped by its pid.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UsageError
from ..mount import mounts_under

__all__ = ["BenchRegistry", "PrivateContainerd", "Processes", "free_port"]

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Processes:
    """Processes this benchmark started, stopped in reverse order by pid."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=kwargs.pop("stdout", out), stderr=out,
                                    stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        self._procs.append((name, proc))
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 20.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self._procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)

    def pids(self) -> list[int]:
        return [p.pid for _n, p in self._procs if p.poll() is None]

    def named(self) -> dict[str, int]:
        """Name -> pid of the running ones (the latest started of a name)."""
        return {name: p.pid for name, p in self._procs if p.poll() is None}


class BenchRegistry:
    """docker-registry with filesystem storage in ``storage``; JSON log in ``log_path``."""

    def __init__(self, storage: Path, log_path: Path, processes: Processes) -> None:
        self.storage = storage
        self.log_path = log_path
        self.processes = processes
        self.proc: subprocess.Popen | None = None
        self.host = ""

    def start(self, address: str, port: int, exec_argv=None) -> BenchRegistry:
        program = shutil_which("docker-registry")
        config = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)},
                        "cache": {"blobdescriptor": "inmemory"},
                        "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": f"{address}:{port}", "secret": "overlaybd-py-bench"},
        }
        config_path = self.log_path.with_suffix(f".{port}.yml")
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(config))
        argv = [program, "serve", str(config_path)]
        if exec_argv is not None:
            argv = exec_argv(argv)
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self.proc = self.processes.start("docker-registry", argv, self.log_path, env=env)
        self.host = f"{address}:{port}"
        wait_http(f"http://{self.host}/v2/", self.proc, "docker-registry", self.log_path)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.processes.stop(self.proc)
            self.proc = None

    def log_mark(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def settle(self, quiet: float = 0.1, timeout: float = 1.0) -> None:
        """Wait until the log has not grown for ``quiet`` seconds (at most ``timeout``): the
        registry logs a request after the client has its response."""
        settled_size(self.log_path, quiet, timeout)

    def blob_bytes_served(self, since: int = 0, until: float | None = None) -> int:
        """Blob bytes the registry sent (GET, 200/206) after log position ``since``, and
        answered by wall-clock time ``until`` if given: its own account."""
        total = 0
        with self.log_path.open("rb") as f:
            f.seek(since)
            for line in f:
                if not line.startswith(b"{"):
                    continue
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                uri = r.get("http.request.uri", "")
                if r.get("msg") != "response completed" or "/blobs/" not in uri \
                        or "/uploads/" in uri or r.get("http.request.method") != "GET":
                    continue
                if until is not None and log_time(str(r.get("time", ""))) > until:
                    continue
                if r.get("http.response.status") in (200, 206):
                    total += int(r.get("http.response.written", 0))
        return total


def settled_size(path: Path, quiet: float, timeout: float) -> int:
    """The size of ``path`` (0 while absent) once it has not grown for ``quiet`` seconds, or
    when ``timeout`` seconds have passed."""
    def size() -> int:
        return path.stat().st_size if path.exists() else 0

    deadline = time.monotonic() + timeout
    last, since = size(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(quiet / 4)
        now = size()
        if now != last:
            last, since = now, time.monotonic()
    return last


def log_time(text: str) -> float:
    """Seconds since the epoch of a docker-registry log ``time`` (RFC 3339, nanoseconds);
    +inf when it cannot be read (such a record is never taken as before a time)."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.strip()).replace("Z", "+00:00")
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return math.inf


def shutil_which(program: str) -> str:
    import shutil

    path = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        raise UsageError(f"the benchmark needs {program!r} (run scripts/bootstrap)")
    return path


def wait_http(url: str, proc: subprocess.Popen, what: str, log_path: Path,
              timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
    raise UsageError(f"{what} did not answer at {url}:\n{tail}")


def start_delay_proxy(processes: Processes, listen: str, upstream: str, rtt_ms: float,
                      log_path: Path, exec_argv) -> subprocess.Popen:
    argv = exec_argv([sys.executable, "-m", "overlaybd_py.coldstart.delayproxy",
                      "--listen", listen, "--upstream", upstream, "--delay-ms", str(rtt_ms)])
    proc = processes.start("delay proxy", argv, log_path, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        raise UsageError(f"the delay proxy did not start: {log_path.read_text()[-1000:]}")
    return proc


class PrivateContainerd:
    """containerd with private root, state and sockets (CRI disabled), for ``ctr``."""

    NAMESPACE = "obdbench"

    def __init__(self, root: Path, processes: Processes) -> None:
        self.root = root
        self.processes = processes
        self.run_dir = ""  # sockets: a unix socket path has at most 104 bytes
        self.socket = ""
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateContainerd:
        import tempfile

        program = shutil_which("containerd")
        (self.root / "run").mkdir(parents=True, exist_ok=True)
        self.run_dir = tempfile.mkdtemp(prefix=f"obdpy{os.getpid()}-", dir="/run")
        self.socket = os.path.join(self.run_dir, "c.sock")
        config = self.root / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.root / "lib"}"\n'
            f'state = "{self.root / "run" / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.socket}"\n'
            "[ttrpc]\n"
            f'  address = "{self.socket}.ttrpc"\n'
            "[debug]\n"
            '  address = ""\n'
            "[metrics]\n"
            '  address = ""\n'
        )
        self.proc = self.processes.start("containerd", [program, "--config", str(config)],
                                         self.root / "containerd.log")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if os.path.exists(self.socket) and self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise UsageError("private containerd did not start: "
                         + (self.root / "containerd.log").read_text(errors="replace")[-1500:])

    def ctr_argv(self, *args: str) -> list[str]:
        return [shutil_which("ctr"), "--address", self.socket, "--namespace", self.NAMESPACE,
                *args]

    def ctr(self, *args: str, check: bool = True, timeout: float | None = None
            ) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.ctr_argv(*args), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode:
            raise UsageError(f"ctr {' '.join(args[:3])} failed: {proc.stderr.strip()[-800:]}")
        return proc

    def _shim_pids(self) -> list[int]:
        """Shims this containerd started (their command line names our socket)."""
        pids = []
        needle = self.socket.encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and needle in cmdline:
                pids.append(int(entry))
        return pids

    def stop(self) -> None:
        """Kill leftover tasks, stop containerd and its shims, unmount what they left."""
        if self.proc is not None and self.proc.poll() is None:
            tasks = self.ctr("task", "ls", "-q", check=False).stdout.split()
            for task in tasks:
                self.ctr("task", "kill", "-s", "SIGKILL", task, check=False)
                self.ctr("task", "delete", "-f", task, check=False)
            for container in self.ctr("container", "ls", "-q", check=False).stdout.split():
                self.ctr("container", "delete", container, check=False)
            self.processes.stop(self.proc)
        self.proc = None
        for pid in self._shim_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for point in mounts_under(str(self.root)):
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
        if self.run_dir:
            import shutil

            shutil.rmtree(self.run_dir, ignore_errors=True)

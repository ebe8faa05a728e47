"""The control API of a serving process: one JSON object per line over a unix socket.

Request ``{"op": NAME, ...params}``; answer ``{"ok": true, ...result}`` or
``{"ok": false, "error": message, "type": ExceptionClass}``. The socket is created mode
0600 in a 0700 directory: only root (the owner) may ask for mounts. The client side is
synchronous (the CLI, the snapshotter's gRPC threads) and imports neither trio nor the engine,
so a command that only talks to a daemon starts quickly; the server side
(``daemon/_control.py``) runs in the serving process's trio nursery. ``ensure_daemon``
reaches the node daemon, starting it if none runs.

Operations of the node daemon (``daemon.NodeServer.handle``): ``ping``, ``mount`` (an image
reference), ``mount_layers`` (a resolved layer list: registry blobs or local layer files,
read-only), ``umount``, ``status``, ``cache`` and ``shutdown``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

from . import errors
from .config import NodeConfig
from .errors import MountError, OverlaybdError

__all__ = ["MAX_MESSAGE", "ControlError", "ensure_daemon", "request", "responds"]

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
DAEMON_START_TIMEOUT = 30.0


class ControlError(MountError):
    """The serving process could not be reached or answered nonsense."""


def _rebuild(answer: dict[str, Any]) -> OverlaybdError:
    cls = getattr(errors, str(answer.get("type")), None)
    message = str(answer.get("error", "unknown error"))
    if isinstance(cls, type) and issubclass(cls, OverlaybdError):
        try:
            return cls(message)
        except TypeError:
            pass
    return OverlaybdError(message)


def request(path: str, op: str, timeout: float = 300.0, **params: Any) -> dict[str, Any]:
    """Send one request and return the result; raises the server's error class."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps({"op": op, **params}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_MESSAGE:
                    raise ControlError(f"control answer from {path} is too large")
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        raise ControlError(f"no overlaybd-py server listens on {path} ({exc.strerror})") from None
    except TimeoutError:
        raise ControlError(f"{path}: no answer to {op!r} within {timeout:.0f} s") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"{path}: malformed answer to {op!r}") from None
    if not answer.get("ok"):
        raise _rebuild(answer)
    answer.pop("ok")
    return answer


def responds(path: str) -> bool:
    """True when a server answers ``ping`` on ``path``."""
    try:
        request(path, "ping", timeout=5.0)
    except (ControlError, OverlaybdError):
        return False
    return True


def _lock_held(config: NodeConfig) -> bool:
    """True while a node daemon holds ``<state_dir>/daemon.lock`` (see NodeServer)."""
    try:
        fd = os.open(config.daemon_lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock if we got it
    return False


def _wait_for_socket(config: NodeConfig, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not responds(config.daemon_socket):
        if not _lock_held(config):  # it exited meanwhile: the caller may start one
            return ensure_daemon(config, timeout=max(deadline - time.monotonic(), 1.0))
        if time.monotonic() > deadline:
            raise MountError(f"a node daemon holds {config.daemon_lock} but does not answer "
                             f"on {config.daemon_socket} within {timeout:.0f} s")
        time.sleep(0.1)
    return config.daemon_socket


def ensure_daemon(config: NodeConfig, config_file: str | None = None,
                  timeout: float = DAEMON_START_TIMEOUT) -> str:
    """Return the node daemon's control socket, starting the daemon if none answers.

    The daemon runs detached (its own session, log in ``<state_dir>/daemon.log``), so it
    outlives the caller. Two callers starting it at once are safe: the daemon holds a lock
    on its state directory, the loser exits and both callers find the winner's socket. No
    daemon is spawned while one holds the lock (it is starting, or busy): a spare one would
    wait for nothing and, if slow, take over after the real one stopped.
    """
    sock = config.daemon_socket
    if responds(sock):
        return sock
    if _lock_held(config):
        return _wait_for_socket(config, timeout)
    os.makedirs(config.state_dir, mode=0o755, exist_ok=True)
    log_path = os.path.join(config.state_dir, "daemon.log")
    argv = [sys.executable, "-m", "overlaybd_py", "daemon", "--foreground",
            "--state-dir", config.state_dir, "--cache-dir", config.cache_dir,
            "--cache-size", str(config.cache_size)]
    if config_file:
        argv += ["--config", config_file]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=log_file, start_new_session=True)
    log.info("started the node daemon (pid %d, log %s)", proc.pid, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if responds(sock):
            return sock
        # Exited: it failed, or lost a start race to a daemon that holds the lock and is
        # about to open its socket (then keep waiting for that one).
        if proc.poll() is not None and not _lock_held(config):
            with open(log_path, errors="replace") as f:
                tail = f.read().strip().splitlines()[-5:]
            raise MountError("the node daemon exited at start-up:\n  " + "\n  ".join(tail))
        time.sleep(0.1)
    if proc.poll() is None:
        proc.terminate()
    raise MountError(f"the node daemon did not answer within {timeout:.0f} s (see {log_path})")

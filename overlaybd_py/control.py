"""The control API of a serving process: one JSON object per line over a unix socket.

Request ``{"op": NAME, ...params}``; answer ``{"ok": true, ...result}`` or
``{"ok": false, "error": message, "type": ExceptionClass}``. The socket is created mode
0600 in a 0700 directory: only root (the owner) may ask for mounts. The client side is
synchronous (the CLI); the server side runs in the serving process's trio nursery.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import errors
from .engine._tasks import unwrap_group
from .errors import MountError, OverlaybdError

__all__ = ["ControlError", "request", "responds", "serve_control"]

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


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


async def _serve_one(stream: trio.SocketStream, handler: Handler) -> None:
    buf = b""
    async with stream:
        while b"\n" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
            if len(buf) > MAX_MESSAGE:
                return
        try:
            message = json.loads(buf.split(b"\n", 1)[0])
            op = str(message.pop("op"))
            result = {"ok": True, **await handler(op, message)}
        except (ValueError, KeyError, TypeError) as exc:
            result = {"ok": False, "error": f"bad request: {exc}", "type": "UsageError"}
        except BaseException as exc:  # report every failure to the caller, then go on
            exc = unwrap_group(exc)
            if isinstance(exc, trio.Cancelled | KeyboardInterrupt | SystemExit):
                raise
            if not isinstance(exc, OverlaybdError):
                log.exception("control request failed")
            result = {"ok": False, "error": str(exc) or type(exc).__name__,
                      "type": type(exc).__name__}
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(json.dumps(result).encode() + b"\n")


async def serve_control(path: str, handler: Handler, *, task_status=trio.TASK_STATUS_IGNORED):
    """Listen on ``path`` until cancelled, answering each connection with ``handler``."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(
                lambda stream: _serve_one(stream, handler), [listener], handler_nursery=nursery
            )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

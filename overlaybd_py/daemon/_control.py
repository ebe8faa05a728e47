"""The server side of the control API (``control.py`` has the protocol and the client): a
unix socket in the serving process's trio nursery, one JSON request and answer per line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..control import MAX_MESSAGE
from ..engine._tasks import unwrap_group
from ..errors import OverlaybdError

__all__ = ["Handler", "serve_control"]

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


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

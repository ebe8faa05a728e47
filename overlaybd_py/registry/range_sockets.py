"""Blob range GETs on plain blocking sockets, for worker threads.

httpx and h11 move a response body through Python on the event loop, a few hundred
kilobytes at a time: about 2 ms of CPU per MiB, most of a cold sequential read through the
block device. A 206 answer's body is a known number of bytes, so this path writes the
request, parses the (small) response head, then ``recv_into``s the body straight into one
buffer with the GIL released. A caller that wants the body as it arrives sets
:data:`RANGE_PROGRESS` (the block cache publishes a long fetch's first blocks before its
last ones have come).

It takes only the plain case and error answers with a small fixed-length body (returned
as :class:`ErrorAnswer` for the caller to judge, so a 404 is asked once). Anything else (a
redirect, a 401, a whole blob answered with 200, chunked encoding) makes
:meth:`RangeSockets.get_range` return None, and the caller repeats the request through
httpx, which handles every case.
"""

from __future__ import annotations

import contextvars
import re
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from ._http import parse_content_range
from .byteranges import BodyParts, Part, boundary_of, covering_parts, range_header

__all__ = ["RANGE_PROGRESS", "ErrorAnswer", "RangeSockets", "ResponseHead",
           "parse_response_head"]

# Called in the worker thread with the body buffer and each part of a multi-range answer
# once all its bytes have arrived (they are final: the callback may keep views of them).
PartCallback = Callable[[memoryview, Part], None]

# Set around a range read to see its body arrive: called in the worker thread with the
# body buffer and how many of its bytes have arrived, every PROGRESS_STEP bytes or more
# (not for the last piece, nor on the httpx path). It must not block. The bytes below the
# count are final (never written again; a retried read starts again from 0 in a new
# buffer), so the callback may keep views of them instead of copies; and the read (on this
# path) returns that same buffer (a bytearray) rather than a copy of it: the cold reads
# copied each fetched byte twice more before (~30 % slower sequential reads).
RANGE_PROGRESS: contextvars.ContextVar[Callable[[memoryview, int], None] | None] = \
    contextvars.ContextVar("overlaybd_py_range_progress", default=None)
PROGRESS_STEP = 128 * 1024

MAX_HEAD = 64 * 1024
# Statuses a server may answer a multi-range request with where it would serve each range
# alone; the host is then asked range by range.
_REFUSED_MULTI = (400, 416, 501)
_MULTI_OVERHEAD = 2048  # bytes a part may add: its header, a merged gap
MAX_ERROR_BODY = 64 * 1024
_IDLE_PER_HOST = 32
_STATUS_RE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?")


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value

    def body_range(self) -> tuple[int, int] | None:
        """(first, last) byte of a 206's Content-Range, or None."""
        parsed = parse_content_range(self.headers.get("content-range", ""))
        return parsed[:2] if parsed is not None else None

    def blob_size(self) -> int | None:
        """The whole size a 206's Content-Range names, or None (``*`` or none)."""
        parsed = parse_content_range(self.headers.get("content-range", ""))
        return parsed[2] if parsed is not None else None


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """A 4xx/5xx answer (not 401) with its whole body."""

    status: int
    headers: dict[str, str]
    body: bytes


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse an HTTP/1.1 status line and header fields (``head`` ends before the blank line).

    ValueError on anything malformed."""
    lines = head.split(b"\r\n")
    match = _STATUS_RE.fullmatch(lines[0])
    if match is None:
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise ValueError(f"bad header line {line[:80]!r}")
        headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    return ResponseHead(int(match[1]), headers)


class _Unusable(Exception):
    """The answer is not a plain 206 of the asked range: let httpx do it."""


class _Stale(Exception):
    """The connection closed before the response began (a reused idle connection)."""


class RangeSockets:
    """Keep-alive connections per (scheme, host, port), used from any thread.

    ``get_range`` blocks: call it in a worker thread. It raises OSError (ssl.SSLError and
    socket.timeout included) on network failures, which the caller reports as transient.
    """

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        user_agent: str,
        ssl_context: ssl.SSLContext | None = None,
        tcp_nodelay: bool = True,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._user_agent = user_agent
        self._ssl_context = ssl_context
        self._tcp_nodelay = tcp_nodelay
        self._idle: dict[tuple[str, str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.redirecting: set[str] = set()  # netlocs that answered a range GET with a redirect
        self.single_range: set[str] = set()  # netlocs that answered a multi-range GET otherwise
        self.served = 0  # ranges answered here (not handed back to httpx)
        self.connections = 0  # connections opened

    def get_range(
        self, url: str, offset: int, length: int, authorization: str | None,
        blob_size: int | None = None,
    ) -> bytes | bytearray | ErrorAnswer | None:
        """Exactly ``length`` bytes of ``url`` from ``offset`` (the receive buffer itself, a
        bytearray, when :data:`RANGE_PROGRESS` is set), an error answer, or None (use httpx:
        also when the answer names a blob size other than ``blob_size``, for httpx's path to
        refuse with its message)."""
        exchange = partial(self._exchange, offset=offset, length=length, blob_size=blob_size)
        return self._get(url, authorization, f"bytes={offset}-{offset + length - 1}", exchange)

    def get_ranges(
        self, url: str, ranges: list[tuple[int, int]], authorization: str | None,
        blob_size: int | None = None, on_part: PartCallback | None = None,
    ) -> list[memoryview] | ErrorAnswer | None:
        """The bytes of several (offset, length) ranges of ``url`` in one request (views of
        one buffer, in the order asked), an error answer, or None: the server does not
        answer multi-range requests with the parts (it is then not asked again), or another
        case httpx must handle; ask range by range."""
        if urlsplit(url).netloc in self.single_range:
            return None
        exchange = partial(self._exchange_ranges, ranges=ranges, blob_size=blob_size,
                           on_part=on_part)
        return self._get(url, authorization, range_header(ranges), exchange)

    def _get(self, url: str, authorization: str | None, range_value: str,
             exchange: Callable[..., Any]) -> Any:
        """Send a range GET on a pooled connection (once more on a new one if the server had
        closed it) and let ``exchange(sock, netloc=, request=)`` take the answer: it returns
        (result, whether the connection may be reused) or raises; None for what this path
        does not handle."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or parts.hostname is None:
            return None
        if parts.netloc in self.redirecting:
            return None
        if any(c in (authorization or "") for c in "\r\n"):
            return None
        key = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"User-Agent: {self._user_agent}\r\nAccept-Encoding: identity\r\n"
            f"Range: {range_value}\r\n"
            + (f"Authorization: {authorization}\r\n" if authorization else "")
            + "\r\n"
        ).encode("latin-1")
        call = partial(self._run, partial(exchange, netloc=parts.netloc, request=request),
                       key)
        sock = self._take(key)
        if sock is not None:
            try:
                return call(sock)
            except (OSError, _Stale):
                pass  # the server closed an idle connection: once more on a new one
        sock = self._connect(key)
        try:
            return call(sock)
        except _Stale as exc:
            raise ConnectionResetError(f"{parts.netloc} closed the connection: {exc}") from None

    def _run(self, exchange: Callable[[socket.socket], tuple[Any, bool]],
             key: tuple[str, str, int], sock: socket.socket) -> Any:
        """One exchange on ``sock``; the connection goes back to the pool only when the
        exchange read its answer whole and the server keeps it open."""
        keep = False
        try:
            result, keep = exchange(sock)
            return result
        except _Unusable:
            return None
        finally:
            if keep:
                self._put(key, sock)
            else:
                sock.close()

    def _head(self, sock: socket.socket, netloc: str, request: bytes
              ) -> tuple[ResponseHead, bytes, ErrorAnswer | None]:
        """Send ``request``; the answer's head, the body bytes that came with it, and the
        whole answer when it is an error (4xx/5xx but 401)."""
        sock.sendall(request)
        head, rest = _read_head(sock)
        try:
            answer = parse_response_head(head)
        except ValueError as exc:
            raise _Unusable(str(exc)) from None
        if 300 <= answer.status < 400:
            self.redirecting.add(netloc)
        if answer.status >= 400 and answer.status != 401:
            return answer, b"", _error_answer(sock, answer, rest)
        return answer, rest, None

    def _exchange_ranges(
        self, sock: socket.socket, *, netloc: str, request: bytes,
        ranges: list[tuple[int, int]], blob_size: int | None, on_part: PartCallback | None,
    ) -> tuple[list[memoryview] | ErrorAnswer | None, bool]:
        answer, rest, error = self._head(sock, netloc, request)
        if error is not None:
            if answer.status in _REFUSED_MULTI:  # may refuse several ranges (RFC 9110)
                self.single_range.add(netloc)
                return None, _reusable(answer)
            return error, _reusable(answer)
        if answer.status != 206 or "transfer-encoding" in answer.headers:
            if answer.status != 401:  # 200: the whole blob would come; it is not read
                self.single_range.add(netloc)
            raise _Unusable(f"HTTP {answer.status}")
        declared = answer.headers.get("content-length", "")
        # the parts, their headers, and gaps a server may merge into a part
        limit = sum(length for _, length in ranges) + _MULTI_OVERHEAD * len(ranges) + 4096
        if not declared.isdigit() or int(declared) > limit or len(rest) > int(declared) \
                or (blob_size is not None and answer.blob_size() not in (None, blob_size)):
            self.single_range.add(netloc)
            raise _Unusable("the answer is not the asked ranges")
        total = int(declared)
        body = bytearray(total)
        view = memoryview(body)
        view[: len(rest)] = rest
        got = len(rest)
        boundary = boundary_of(answer.headers.get("content-type", ""))
        parser = BodyParts(boundary, blob_size) if boundary is not None else None
        try:
            while True:
                if parser is not None:
                    for part in parser.feed(body, got):
                        if on_part is not None:
                            on_part(view, part)
                if got >= total:
                    break
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionResetError(
                        f"{netloc} ended the body after {got} of {total}")
                got += n
            if parser is not None:
                parser.finish(got)
                parts = parser.parts
            else:  # one range holding them all
                span = answer.body_range()
                if span is None or span[1] - span[0] + 1 != total:
                    raise ValueError("a single-part answer without its Content-Range")
                parts = [Part(span[0], total, 0)]
                if on_part is not None:
                    on_part(view, parts[0])
        except ValueError as exc:
            self.single_range.add(netloc)
            raise _Unusable(str(exc)) from None
        covering = covering_parts(parts, ranges)
        if covering is None:
            self.single_range.add(netloc)
            raise _Unusable("the parts do not cover the asked ranges")
        self.served += 1
        return [view[part.body_offset + at : part.body_offset + at + length]
                for (part, at), (_, length) in zip(covering, ranges, strict=True)], \
            _reusable(answer)

    def _exchange(
        self, sock: socket.socket, *, netloc: str, request: bytes,
        offset: int, length: int, blob_size: int | None = None,
    ) -> tuple[bytes | bytearray | ErrorAnswer | None, bool]:
        answer, rest, error = self._head(sock, netloc, request)
        if error is not None:
            return error, _reusable(answer)
        if answer.status != 206 or "transfer-encoding" in answer.headers:
            raise _Unusable(f"HTTP {answer.status}")
        declared = answer.headers.get("content-length", "")
        if answer.body_range() != (offset, offset + length - 1) or declared != str(length) \
                or len(rest) > length:
            raise _Unusable("the answer is not the asked range")
        if blob_size is not None and answer.blob_size() not in (None, blob_size):
            raise _Unusable(f"the answer is of a blob of {answer.blob_size()} bytes")
        body = bytearray(length)
        view = memoryview(body)
        view[: len(rest)] = rest
        got = len(rest)
        progress = RANGE_PROGRESS.get()
        mark = PROGRESS_STEP
        while got < length:
            n = sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionResetError(f"{netloc} ended the body after {got} of {length}")
            got += n
            if progress is not None and mark <= got < length:
                progress(view, got)
                mark = got + PROGRESS_STEP
        self.served += 1
        return body if progress is not None else bytes(body), _reusable(answer)

    def _take(self, key: tuple[str, str, int]) -> socket.socket | None:
        with self._lock:
            idle = self._idle.get(key)
            return idle.pop() if idle else None

    def _put(self, key: tuple[str, str, int], sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if not self._closed and len(idle) < _IDLE_PER_HOST:
                idle.append(sock)
                return
        sock.close()

    def _connect(self, key: tuple[str, str, int]) -> socket.socket:
        scheme, host, port = key
        sock = socket.create_connection((host, port), timeout=self._connect_timeout)
        self.connections += 1
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self._tcp_nodelay))
            if scheme == "https":
                context = self._ssl_context or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=host)
            sock.settimeout(self._read_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for sockets in idle.values():
            for sock in sockets:
                sock.close()


def _reusable(answer: ResponseHead) -> bool:
    """Whether the server keeps the connection open after this (wholly read) answer."""
    return answer.headers.get("connection", "").lower() != "close"


def _error_answer(sock: socket.socket, answer: ResponseHead, rest: bytes) -> ErrorAnswer:
    declared = answer.headers.get("content-length", "")
    if "transfer-encoding" in answer.headers or not declared.isdigit() \
            or int(declared) > MAX_ERROR_BODY or len(rest) > int(declared):
        raise _Unusable(f"HTTP {answer.status} with a body we do not read here")
    body = bytearray(rest)
    while len(body) < int(declared):
        piece = sock.recv(int(declared) - len(body))
        if not piece:
            raise ConnectionResetError("the connection closed inside an error body")
        body += piece
    return ErrorAnswer(answer.status, answer.headers, bytes(body))


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The response head (without the blank line) and the body bytes already received."""
    buf = bytearray()
    while True:
        piece = sock.recv(MAX_HEAD)
        if not piece:
            if not buf:
                raise _Stale("no response")
            raise ConnectionResetError("the connection closed inside the response head")
        start = max(0, len(buf) - 3)
        buf += piece
        end = buf.find(b"\r\n\r\n", start)
        if end >= 0:
            return bytes(buf[:end]), bytes(buf[end + 4 :])
        if len(buf) > MAX_HEAD:
            raise _Unusable(f"a response head over {MAX_HEAD} bytes")

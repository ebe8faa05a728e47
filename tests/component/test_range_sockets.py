"""RangeSockets against a scripted HTTP server: the plain 206 is served here, everything else
is handed back (None) or reported (ErrorAnswer, OSError), and connections are reused."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Callable

import pytest

from overlaybd_py.registry.range_sockets import (
    PROGRESS_STEP,
    RANGE_PROGRESS,
    ErrorAnswer,
    RangeSockets,
    parse_response_head,
)

BLOB = bytes(range(256)) * 4096  # 1 MiB

Answer = Callable[[int, int], bytes]  # (offset, length) -> raw response bytes


def partial_content(offset: int, length: int, extra: str = "") -> bytes:
    head = (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {length}\r\n"
            f"Content-Range: bytes {offset}-{offset + length - 1}/{len(BLOB)}\r\n{extra}\r\n")
    return head.encode() + BLOB[offset : offset + length]


class ScriptedServer:
    """Answers each request with the next answer of ``script``; ``close_after`` closes the
    connection after that many answers on it; ``trickle`` sends answers in pieces."""

    def __init__(self, script: list[Answer], close_after: int | None = None,
                 trickle: int = 0) -> None:
        self.script = list(script)
        self.close_after = close_after
        self.trickle = trickle  # send answers this many bytes at a time, 2 ms apart
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v2/r/blobs/sha256:x"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the client may hang up on any answer
            served = 0
            buf = b""
            while self.script:
                while b"\r\n\r\n" not in buf:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    buf += piece
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.requests.append(head)
                rng = next(h for h in head.split(b"\r\n") if h.lower().startswith(b"range:"))
                first, last = (int(x) for x in rng.split(b"=")[1].split(b"-"))
                answer = self.script.pop(0)(first, last - first + 1)
                step = self.trickle or len(answer)
                for start in range(0, len(answer), step):
                    conn.sendall(answer[start : start + step])
                    if self.trickle:
                        time.sleep(0.002)
                served += 1
                if self.close_after is not None and served >= self.close_after:
                    return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def sockets():
    s = RangeSockets(connect_timeout=5, read_timeout=5, user_agent="test")
    yield s
    s.close()


def test_plain_206_on_one_kept_alive_connection(sockets):
    server = ScriptedServer([partial_content] * 3)
    for offset in (0, 5000, 700_000):
        assert sockets.get_range(server.url, offset, 300_000 - offset // 3, "Bearer t") == \
            BLOB[offset : offset + 300_000 - offset // 3]
    assert sockets.connections == 1 and sockets.served == 3
    first = server.requests[0].decode()
    assert "Authorization: Bearer t" in first and "Range: bytes=0-299999" in first
    server.close()


def test_progress_sees_the_body_as_it_arrives(sockets):
    server = ScriptedServer([partial_content], trickle=64 * 1024)
    seen: list[tuple[int, bytes]] = []
    token = RANGE_PROGRESS.set(lambda body, got: seen.append((got, bytes(body[:got]))))
    try:
        assert sockets.get_range(server.url, 4096, len(BLOB) - 4096, None) == BLOB[4096:]
    finally:
        RANGE_PROGRESS.reset(token)
    assert seen, "no progress for a 1 MiB body"
    counts = [got for got, _ in seen]
    assert all(b - a >= PROGRESS_STEP for a, b in itertools.pairwise(counts))
    assert counts[0] >= PROGRESS_STEP and counts[-1] < len(BLOB) - 4096
    assert all(prefix == BLOB[4096 : 4096 + got] for got, prefix in seen)


def test_answers_left_to_httpx(sockets):
    def whole(offset, length):
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BLOB) + BLOB

    def chunked(offset, length):
        return b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"

    def wrong_range(offset, length):
        return partial_content(offset + 1, length)

    def unauthorized(offset, length):
        return b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"

    server = ScriptedServer([whole, chunked, wrong_range, unauthorized])
    for _ in range(4):
        assert sockets.get_range(server.url, 10, 1000, None) is None
    assert sockets.served == 0 and not sockets.redirecting
    server.close()


def test_an_answer_for_a_blob_of_another_size_is_left_to_httpx(sockets):
    """httpx's path refuses it with a message naming both sizes; an unknown total passes."""
    def unknown_total(offset, length):
        return partial_content(offset, length).replace(b"/%d\r\n" % len(BLOB), b"/*\r\n")

    server = ScriptedServer([partial_content, unknown_total, partial_content])
    assert sockets.get_range(server.url, 0, 300_000, None, blob_size=len(BLOB) + 1) is None
    assert sockets.get_range(server.url, 0, 300_000, None, blob_size=len(BLOB)) == \
        BLOB[:300_000]
    assert sockets.get_range(server.url, 0, 300_000, None) == BLOB[:300_000]
    assert sockets.served == 2
    server.close()


def test_a_redirecting_host_is_left_to_httpx_from_then_on(sockets):
    def redirect(offset, length):
        return (b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://x/\r\n"
                b"Content-Length: 0\r\n\r\n")

    server = ScriptedServer([redirect, partial_content])
    assert sockets.get_range(server.url, 0, 100, None) is None
    assert sockets.get_range(server.url, 0, 100, None) is None  # not even asked
    assert len(server.requests) == 1
    server.close()


def test_error_answers_come_back_with_their_body(sockets):
    body = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}'

    def not_found(offset, length):
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    server = ScriptedServer([not_found, partial_content])
    answer = sockets.get_range(server.url, 0, 100, None)
    assert isinstance(answer, ErrorAnswer) and answer.status == 404 and answer.body == body
    assert sockets.get_range(server.url, 0, 100, None) == BLOB[:100]
    assert sockets.connections == 1  # the error's connection was reused
    server.close()


def test_an_idle_connection_the_server_closed_is_replaced(sockets):
    server = ScriptedServer([partial_content] * 2, close_after=1)
    assert sockets.get_range(server.url, 0, 100, None) == BLOB[:100]
    assert sockets.get_range(server.url, 100, 100, None) == BLOB[100:200]
    assert sockets.connections == 2
    server.close()


def test_a_body_cut_short_is_an_error_not_short_data(sockets):
    def short(offset, length):
        return partial_content(offset, length)[:-10]

    server = ScriptedServer([short, short], close_after=1)
    with pytest.raises(ConnectionResetError, match="ended the body"):
        sockets.get_range(server.url, 0, 4096, None)
    server.close()


def test_connection_close_is_honoured(sockets):
    def closing(offset, length):
        return partial_content(offset, length, "Connection: close\r\n")

    server = ScriptedServer([closing, closing], close_after=1)
    assert sockets.get_range(server.url, 0, 10, None) == BLOB[:10]
    assert sockets.get_range(server.url, 10, 10, None) == BLOB[10:20]
    assert sockets.connections == 2
    server.close()


def test_nothing_listening_raises_oserror(sockets):
    server = ScriptedServer([])
    url = server.url
    server.close()
    with pytest.raises(OSError):
        sockets.get_range(url, 0, 10, None)


def test_header_values_with_line_breaks_are_not_sent(sockets):
    server = ScriptedServer([partial_content])
    assert sockets.get_range(server.url, 0, 10, "Bearer a\r\nX-Evil: 1") is None
    assert server.requests == []
    server.close()


def test_parse_response_head():
    head = parse_response_head(
        b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 5-9/100\r\nX-A:  b \r\nx-a: c")
    assert head.status == 206 and head.headers == {"content-range": "bytes 5-9/100", "x-a": "c"}
    assert head.body_range() == (5, 9)
    assert parse_response_head(b"HTTP/1.0 404").status == 404
    assert parse_response_head(b"HTTP/1.1 200 OK").body_range() is None
    for bad in (b"HTTP/2 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 200 OK\r\nno colon",
                b"HTTP/1.1 200 OK\r\nBad Name: x", b"HTTP/1.1 200 OK\r\n: empty"):
        with pytest.raises(ValueError):
            parse_response_head(bad)

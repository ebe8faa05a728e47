"""The control API (JSON lines over a 0600 unix socket), the metrics endpoint, and
``ensure_daemon``'s report when the daemon cannot start. Real sockets, no mounts."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import urllib.error
import urllib.request

import pytest
import trio

from overlaybd_py.config import NodeConfig
from overlaybd_py.control import ControlError, ensure_daemon, request, responds
from overlaybd_py.daemon import serve_control
from overlaybd_py.errors import NotFoundError, OverlaybdError, UsageError
from overlaybd_py.metrics import NodeStatistics, serve_metrics
from tests.fixtures.registry import free_port


async def _handler(op: str, params: dict) -> dict:
    if op == "ping":
        return {"pid": os.getpid()}
    if op == "echo":
        return {"echo": params}
    if op == "usage":
        raise UsageError("bad flag")
    if op == "missing":
        raise NotFoundError("no such image")
    if op == "bug":
        raise RuntimeError("a bug")
    raise UsageError(f"unknown control operation {op!r}")


def _with_server(path: str, client) -> object:
    """Serve ``_handler`` on ``path`` while ``client()`` runs in a thread; return its result."""

    async def main() -> object:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, _handler)
            try:
                return await trio.to_thread.run_sync(client)
            finally:
                nursery.cancel_scope.cancel()

    return trio.run(main)


@pytest.mark.allow_log_warnings  # the "bug" request logs its traceback, on purpose
def test_requests_answers_and_errors(tmp_path):
    path = str(tmp_path / "ctl" / "control.sock")

    def client() -> dict:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        dir_mode = stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)
        answer = request(path, "echo", target="/t", layers=[{"digest": "d"}])
        errors = {}
        for op in ("usage", "missing", "bug", "nope"):
            try:
                request(path, op)
            except OverlaybdError as exc:
                errors[op] = exc
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(path)
            raw.sendall(b"not json\n")
            garbage = json.loads(raw.makefile().readline())
        return {"mode": mode, "dir_mode": dir_mode, "answer": answer, "errors": errors,
                "garbage": garbage, "responds": responds(path)}

    result = _with_server(path, client)
    assert result["mode"] == 0o600 and result["dir_mode"] == 0o700
    assert result["answer"] == {"echo": {"target": "/t", "layers": [{"digest": "d"}]}}
    errors = result["errors"]
    assert type(errors["usage"]) is UsageError and str(errors["usage"]) == "bad flag"
    assert errors["usage"].exit_code == 2
    assert type(errors["missing"]) is NotFoundError
    assert type(errors["bug"]) is OverlaybdError and "a bug" in str(errors["bug"])
    assert "unknown control operation" in str(errors["nope"])
    assert result["garbage"]["ok"] is False and result["garbage"]["type"] == "UsageError"
    assert result["responds"]
    assert not os.path.exists(path)  # removed when the server stops
    assert not responds(path)
    with pytest.raises(ControlError, match="no overlaybd-py server listens"):
        request(path, "echo")


def test_metrics_endpoint_speaks_http(tmp_path):
    port = free_port()
    stats = NodeStatistics(started=1.0, mounts=(), cache=None, recoveries=0,
                           recovery_failures=0)

    def client() -> dict:
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            ok = (response.status, response.headers["Content-Type"], response.read())
        head = urllib.request.urlopen(urllib.request.Request(f"{base}/metrics", method="HEAD"),
                                      timeout=10)
        codes = {}
        for path, method in (("/nope", "GET"), ("/metrics", "POST")):
            try:
                urllib.request.urlopen(urllib.request.Request(base + path, method=method),
                                       timeout=10)
            except urllib.error.HTTPError as exc:
                codes[(path, method)] = exc.code
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"garbage\r\n\r\n")
            bad = raw.recv(100)
        return {"ok": ok, "head": (head.status, head.read()), "codes": codes, "bad": bad}

    async def main() -> dict:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_metrics, f"127.0.0.1:{port}", lambda: stats)
            try:
                return await trio.to_thread.run_sync(client)
            finally:
                nursery.cancel_scope.cancel()

    result = trio.run(main)
    status, content_type, body = result["ok"]
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert b"overlaybd_py_mounts 0.0" in body
    assert result["head"] == (200, b"")
    assert result["codes"] == {("/nope", "GET"): 404, ("/metrics", "POST"): 405}
    assert result["bad"].startswith(b"HTTP/1.1 400")


def test_ensure_daemon_reports_why_the_daemon_did_not_start(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the daemon checks for root first; this test wants the next failure")
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("")
    config = NodeConfig(state_dir=str(tmp_path / "state"), cache_dir=str(not_a_dir / "sub"))
    with pytest.raises(OverlaybdError) as failed:
        ensure_daemon(config, timeout=60)
    message = str(failed.value)
    assert "exited at start-up" in message and "cannot use" in message
    assert "Traceback" not in message
    assert sys.executable  # the daemon ran from this interpreter

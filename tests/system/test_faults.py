"""Registry outages and bad bytes: reads succeed after a short outage, fail with EIO (not a
hang) after the retry deadline, never return wrong bytes, and the mount always unmounts."""

from __future__ import annotations

import errno
import random
import threading
import time
from pathlib import Path

import pytest

from overlaybd_py.formats import tar_wrapper
from tests.fixtures.images import build_layers, push_layers
from tests.fixtures.node import Node
from tests.fixtures.registry import RegistryServer
from tests.fixtures.system import need_fuse

pytestmark = pytest.mark.system

SIZE = 24 << 20


def _step(root: Path) -> None:
    rnd = random.Random(4)
    (root / "data.bin").write_bytes(rnd.randbytes(SIZE))


def _expected() -> bytes:
    return random.Random(4).randbytes(SIZE)


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    need_fuse()
    work = tmp_path_factory.mktemp("faults")
    built, _raw = build_layers(work, [_step])
    return built


@pytest.fixture
def private_registry(tmp_path):
    server = RegistryServer(tmp_path / "registry").start()
    yield server
    server.stop()


def _node(tmp_path: Path, deadline: float) -> Node:
    config = tmp_path / "config.toml"
    config.write_text(f"[registry]\nretry_deadline = {deadline}\n")
    return Node(tmp_path / "node", config=str(config))


def _read_in_thread(path: Path, offset: int, length: int, timeout: float):
    result: dict = {}

    def run() -> None:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                result["data"] = f.read(length)
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.allow_log_warnings
def test_registry_restart_within_deadline(layers, private_registry, tmp_path):
    ref = push_layers(private_registry.host, "faults/img:v1", layers)
    node = _node(tmp_path, 60)
    try:
        target = tmp_path / "t"
        node.mount(ref, target)
        truth = _expected()
        with open(target / "data.bin", "rb") as f:
            assert f.read(1 << 20) == truth[: 1 << 20]
        port = private_registry.port
        private_registry.stop()
        thread, result = _read_in_thread(target / "data.bin", 10 << 20, 1 << 20, 120)
        time.sleep(3)
        assert thread.is_alive()  # waiting and retrying, not failed
        private_registry.start(port=port)
        thread.join(120)
        assert not thread.is_alive()
        assert "error" not in result, result
        assert result["data"] == truth[10 << 20 : 11 << 20]
        node.umount(target)
    finally:
        node.stop()


@pytest.mark.allow_log_warnings
def test_registry_gone_gives_eio_then_unmounts(layers, private_registry, tmp_path):
    ref = push_layers(private_registry.host, "faults/img:v1", layers)
    node = _node(tmp_path, 5)
    try:
        target = tmp_path / "t"
        node.mount(ref, target)
        private_registry.stop()
        started = time.monotonic()
        thread, result = _read_in_thread(target / "data.bin", 12 << 20, 1 << 20, 120)
        thread.join(120)
        assert not thread.is_alive(), "the read hangs"
        assert isinstance(result.get("error"), OSError) and result["error"].errno == errno.EIO
        print(f"\nEIO after {time.monotonic() - started:.1f} s (deadline 5 s)")
        node.umount(target)
        assert node.status()["mounts"] == []
    finally:
        node.stop()


def test_corrupted_chunks_on_the_server_are_never_served(layers, private_registry, tmp_path):
    blob = bytearray(layers[0].read_bytes())
    payload = tar_wrapper.find_payload(bytes(blob[:4096]), len(blob))
    start = payload.offset + payload.size // 4
    end = payload.offset + payload.size * 3 // 4
    for pos in range(start, end, 50_000):  # the middle half: file data chunks
        blob[pos] ^= 0xFF
    bad = tmp_path / "bad.commit"
    bad.write_bytes(bytes(blob))
    ref = push_layers(private_registry.host, "faults/bad:v1", [bad])
    node = _node(tmp_path, 10)
    try:
        target = tmp_path / "t"
        node.mount(ref, target)
        truth = _expected()
        got = bytearray()
        error = None
        with open(target / "data.bin", "rb", buffering=0) as f:
            while len(got) < SIZE:
                try:
                    chunk = f.read(64 << 10)
                except OSError as exc:
                    error = exc
                    break
                if not chunk:
                    break
                got += chunk
        assert error is not None and error.errno == errno.EIO
        assert bytes(got) == truth[: len(got)]  # everything served before the error is right
        assert node.mount_status(target)["errors"] > 0
        node.umount(target)
    finally:
        node.stop()

"""``mount --record-trace`` and ``mount --prefetch`` through the CLI and the node daemon,
and the acceleration layer mounted by the daemon. The registry's own log is the truth about
what crossed the network."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from overlaybd_py.formats import trace as tracefmt
from tests.fixtures.images import build_layers, push_layers
from tests.fixtures.node import Node
from tests.fixtures.registry import registry  # noqa: F401  (fixture)
from tests.fixtures.system import need_fuse

pytestmark = pytest.mark.system

FILES = {"app/a.bin": (2 << 20, 1), "app/b.bin": (600 << 10, 2), "lib/c.so": (300 << 10, 3),
         "other/big.bin": (16 << 20, 4)}
WORKLOAD = ["app/a.bin", "lib/c.so", "app/b.bin"]


def _content(size: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    return b"".join(rnd.randbytes(2048) + bytes(2048) for _ in range(size // 4096))


def _tree(root: Path) -> None:
    for path, (size, seed) in FILES.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(_content(size, seed))


@pytest.fixture(scope="module")
def image(tmp_path_factory, registry):  # noqa: F811
    need_fuse()
    layers, _raw = build_layers(tmp_path_factory.mktemp("trace-daemon"), [_tree])
    return push_layers(registry.host, "system/trace-daemon:v1", layers)


def _read(target: Path) -> None:
    for path in WORKLOAD:
        size, seed = FILES[path]
        assert (target / path).read_bytes() == _content(size, seed)


def test_record_and_prefetch_through_the_daemon(image, registry, tmp_path):  # noqa: F811
    trace = tmp_path / "start.trace"
    node = Node(tmp_path / "rec")
    try:
        target = tmp_path / "t1"
        node.mount(image, target, "--record-trace", str(trace))
        assert Path(str(trace) + ".lock").exists()
        _read(target)
        status = node.mount_status(target)
        assert status["trace"]["recording"] and status["trace"]["reads"] > 0
        node.umount(target)
    finally:
        node.stop()
    assert Path(str(trace) + ".ok").exists() and not Path(str(trace) + ".lock").exists()
    records = tracefmt.decode_trace(trace.read_bytes()).records
    assert sum(r.count for r in records) >= sum(FILES[p][0] for p in WORKLOAD)
    log = tracefmt.decode_events(Path(str(trace) + ".jsonl").read_text())
    assert log.reads and sum(f.length for f in log.fetches) > 0

    node = Node(tmp_path / "pre")  # an empty cache
    try:
        target = tmp_path / "t2"
        node.mount(image, target, "--prefetch", str(trace))
        _wait_prefetch(node, target)
        mark = registry.log_mark()
        _read(target)
        assert registry.blob_bytes_served(since=mark) == 0
        node.umount(target)
    finally:
        node.stop()


def test_acceleration_layer_is_prefetched_by_the_daemon(image, registry, tmp_path):  # noqa: F811
    listed = tmp_path / "list.txt"
    listed.write_text("/app/\n/lib/c.so\n")
    ref = f"{registry.host}/system/trace-daemon:accel"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                    "--preserve-digests", f"docker://{image}", f"docker://{ref}"],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "overlaybd_py", "trace", "push", ref, str(listed),
                    "--plain-http"], check=True, capture_output=True)
    node = Node(tmp_path / "accel")
    try:
        target = tmp_path / "t"
        node.mount(ref, target)
        status = _wait_prefetch(node, target)
        assert status["layers"] == 1  # the acceleration layer is not in the filesystem
        assert sorted(os.listdir(target)) == ["app", "lib", "lost+found", "other"]
        mark = registry.log_mark()
        _read(target)
        assert registry.blob_bytes_served(since=mark) == 0
        node.umount(target)
    finally:
        node.stop()


def test_bad_prefetch_file_is_a_usage_error(image, tmp_path):
    empty = tmp_path / "empty.trace"
    empty.write_bytes(b"")
    node = Node(tmp_path / "bad")
    try:
        out = node.mount(image, tmp_path / "t", "--prefetch", str(empty), check=False)
        assert out.returncode == 2 and "prefetch" in out.stderr
        out = node.mount(image, tmp_path / "t", "--prefetch", str(tmp_path / "nope"),
                         check=False)
        assert out.returncode == 2
    finally:
        node.stop()


def _wait_prefetch(node: Node, target: Path, timeout: float = 60) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = node.mount_status(target)
        prefetch = status["prefetch"]
        assert prefetch is not None, json.dumps(status)
        if not prefetch["running"] and prefetch["planned_requests"]:
            assert prefetch["failed"] == 0 and prefetch["requests"] > 0
            return status
        time.sleep(0.1)
    raise AssertionError(f"prefetch did not finish: {status}")

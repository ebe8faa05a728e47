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

from overlaybd_py.control import request
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


def _loop_read_ahead_kb(loop: str) -> int:
    return int(Path(f"/sys/block/{os.path.basename(loop)}/queue/read_ahead_kb").read_text())


def _touch_middle_page(path: Path) -> None:
    """One byte from the middle of a mapped file: the kernel reads around the page fault
    by the device's read-ahead."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert mapped[len(mapped) // 2] in range(256)


def _recorded_bytes(trace: Path) -> int:
    return sum(r.count for r in tracefmt.decode_trace(trace.read_bytes()).records)


def test_read_ahead_is_lean_while_prefetching_or_recording(image, tmp_path):
    """A plain lazy mount reads around what is asked in 2 MiB windows (fewer round trips);
    a mount that prefetches or records a trace uses the kernel's 128 KiB, so a recorded
    trace holds what the start read and not a wide window around each page fault."""
    lean, wide = tmp_path / "lean.trace", tmp_path / "wide.trace"
    node = Node(tmp_path / "ra")
    try:
        kinds = {"plain": [], "prefetch": ["--prefetch", str(_plain_list(tmp_path))],
                 "lean": ["--record-trace", str(lean)],
                 "wide": ["--record-trace", str(wide), "--read-ahead", "8M"],
                 "asked": ["--read-ahead", "1MiB"]}
        expected = {"plain": 2048, "prefetch": 128, "lean": 128, "wide": 8192, "asked": 1024}
        for kind, flags in kinds.items():
            target = tmp_path / kind
            node.mount(image, target, *flags)
            status = node.mount_status(target)
            assert status["read_ahead_kb"] == expected[kind], kind
            assert _loop_read_ahead_kb(status["loop"]) == expected[kind], kind
            if kind in ("lean", "wide"):
                _touch_middle_page(target / "other/big.bin")
            node.umount(target)
        for bad in ("1.5K", "6K", "100M", "lots"):
            out = node.mount(image, tmp_path / "bad", "--read-ahead", bad, check=False)
            assert out.returncode == 2 and "--read-ahead" in out.stderr + out.stdout, bad
        with pytest.raises(Exception, match="read-ahead must be a multiple of 4 KiB"):
            request(node.daemon_socket(), "mount", ref=image, target=str(tmp_path / "bad"),
                    plain_http=True, read_ahead_kb=-1)
    finally:
        node.stop()
    assert _recorded_bytes(wide) > 6 << 20  # ~8 MiB around the fault
    assert _recorded_bytes(lean) < 1 << 20  # the fault's 128 KiB, the mount's metadata


def _plain_list(tmp_path: Path) -> Path:
    listed = tmp_path / "prefetch.list"
    listed.write_text("/lib/c.so\n")
    return listed


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

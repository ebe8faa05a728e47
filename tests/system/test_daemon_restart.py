"""Node daemon restarts: SIGTERM and SIGKILL, then a new start re-serves what is still
mounted, cleans up what is not, and nothing leaks (mounts, loop devices, cache entries).

Also pins what a reader sees (the README's "Node daemon restarts" section): EIO, not a hang,
for reads the page cache cannot answer while no daemon runs; files opened before the
restart keep failing; paths resolved after it work again.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from overlaybd_py.mount import is_mountpoint, mounts_under
from tests.fixtures.images import build_layers, loop_mounted, push_layers, tree_digest
from tests.fixtures.node import Node
from tests.fixtures.registry import registry  # noqa: F401  (fixture)
from tests.fixtures.system import need_fuse

pytestmark = pytest.mark.system


def _step0(root: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc" / "hello.txt").write_text("hello\n")
    (root / "data").mkdir()
    rnd = random.Random(0)
    for name in ("a.bin", "b.bin"):
        (root / "data" / name).write_bytes(rnd.randbytes(3 << 20))


def _step1(root: Path) -> None:
    (root / "etc" / "two.txt").write_text("layer two\n")
    (root / "data" / "c.bin").write_bytes(random.Random(1).randbytes(1 << 20))


@pytest.fixture(scope="module")
def image(tmp_path_factory, registry):  # noqa: F811
    need_fuse()
    work = tmp_path_factory.mktemp("restart-image")
    layers, raw = build_layers(work, [_step0, _step1])
    ref = push_layers(registry.host, "restart/img:v1", layers)
    with loop_mounted(raw, work / "oracle", readonly=True) as root:
        oracle = tree_digest(root)
    return ref, oracle


@pytest.fixture
def node(tmp_path):
    node = Node(tmp_path / "node")
    yield node
    node.stop()


def _exited(pid: int) -> bool:
    """Gone, or a zombie (the daemon's parent is init, which may reap it a second later)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def _wait_exit(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not _exited(pid):
        assert time.monotonic() < deadline, f"process {pid} did not exit"
        time.sleep(0.01)


def _wait_serving(node: Node, targets: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = node.status()
        serving = {m["target"] for m in status["mounts"] if m["state"] == "serving"}
        if serving >= targets:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def _bound(loop: str) -> str | None:
    """The backing file of ``loop``, or None when it is free."""
    try:
        return Path(f"/sys/block/{os.path.basename(loop)}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def _assert_released(loops: dict[str, str], timeout: float = 10) -> None:
    """Each loop device is free, or bound to something that is not our mount's block file
    (the kernel may have handed the number to someone else meanwhile). A loop device that
    was in use when detached is freed by the kernel shortly after its last user closes it."""
    deadline = time.monotonic() + timeout
    for loop, mount_id in loops.items():
        while True:
            backing = _bound(loop)
            if backing is None or f"/{mount_id}/block" not in backing:
                break
            assert time.monotonic() < deadline, (loop, backing)
            time.sleep(0.05)


def _loops(status: dict) -> dict[str, str]:
    return {m["loop"]: m["id"] for m in status["mounts"]}


def test_sigterm_keeps_mounts_and_the_next_start_re_serves_them(node, image, tmp_path):
    ref, oracle = image
    ro, rw, upper = tmp_path / "ro", tmp_path / "rw", tmp_path / "upper"
    node.mount(ref, ro)
    node.mount(ref, rw, "--rw", "--upper", str(upper))
    (rw / "etc" / "written.txt").write_text("written before the restart\n")
    os.sync()
    before = _loops(node.status())
    with open(ro / "data" / "a.bin", "rb") as held:  # opened before the restart
        assert len(held.read(4096)) == 4096
        pid = node.daemon_pid()
        assert pid
        started = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        _wait_exit(pid)
        stop_s = time.monotonic() - started

        # While no daemon runs: the read-only mount stays (EIO for what is not cached), the
        # writable one was unmounted cleanly, and status names both as waiting.
        assert is_mountpoint(str(ro)) and not is_mountpoint(str(rw))
        with pytest.raises(OSError) as failed:
            (ro / "data" / "b.bin").read_bytes()
        assert failed.value.errno == errno.EIO
        status = node.status()
        assert status["mounts"] == []
        assert {m["target"] for m in status["unserved"]} == {str(ro), str(rw)}

        started = time.monotonic()
        node.run("daemon", *node.node_flags())
        status = _wait_serving(node, {str(ro), str(rw)})
        restart_s = time.monotonic() - started
        print(f"SIGTERM to exit: {stop_s:.2f} s; start to both re-served: {restart_s:.2f} s")

        assert tree_digest(ro) == oracle
        assert (rw / "etc" / "written.txt").read_text() == "written before the restart\n"
        (rw / "etc" / "after.txt").write_text("written after\n")
        # The file opened before the restart belongs to the old mount: it keeps failing.
        held.seek(2 << 20)
        with pytest.raises(OSError) as failed:
            held.read(4096)
        assert failed.value.errno == errno.EIO
    _assert_released(before)  # the old loop devices were freed by the re-serve
    after = _loops(status)
    assert set(after.values()).isdisjoint(before.values())
    node.umount(ro)
    node.umount(rw)
    assert (upper / "data").exists()  # --upper is kept
    _assert_released(after)
    assert [p for p in mounts_under(str(tmp_path)) if not p.startswith(str(node.state))] == []
    assert node.status()["mounts"] == []
    # No cache entry is pinned by a mount that is gone: clearing frees every blob.
    cleared = node.run("cache", "clear", "--json", *node.node_flags())
    assert '"size": 0' in cleared.stdout
    assert [p for p in (node.cache / "blobs").iterdir()] == []


def test_sigkill_re_serves_what_is_mounted_and_cleans_what_is_not(node, image, tmp_path):
    ref, oracle = image
    kept, dropped, torn = tmp_path / "kept", tmp_path / "dropped", tmp_path / "torn"
    unmounted = tmp_path / "unmounted"
    node.mount(ref, kept)
    node.mount(ref, dropped)
    node.mount(ref, unmounted)
    node.mount(ref, torn, "--rw")  # a private upper: removed with the mount
    status = node.status()
    before = _loops(status)
    private_upper = next(m["upper"] for m in status["mounts"] if m["target"] == str(torn))
    assert Path(private_upper).is_dir()
    pid = node.daemon_pid()
    os.kill(pid, signal.SIGKILL)
    _wait_exit(pid)
    with pytest.raises(OSError) as failed:
        (kept / "data" / "c.bin").read_bytes()
    assert failed.value.errno == errno.EIO
    # Its consumer goes away while the daemon is down.
    subprocess.run(["umount", "--lazy", str(dropped)], check=True)
    # `overlaybd-py umount` works on a mount of the stopped daemon, without starting it.
    node.umount(unmounted)
    assert not is_mountpoint(str(unmounted)) and node.daemon_pid() == pid
    assert str(unmounted) not in {m["target"] for m in node.status()["unserved"]}

    node.run("daemon", *node.node_flags())
    status = _wait_serving(node, {str(kept)})
    deadline = time.monotonic() + 30
    while len(status["mounts"]) > 1:  # the others are being cleaned up
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
        status = node.status()
    assert [m["target"] for m in status["mounts"]] == [str(kept)]
    assert tree_digest(kept) == oracle
    assert not is_mountpoint(str(dropped)) and not is_mountpoint(str(torn))
    assert not Path(private_upper).exists()
    _assert_released(before)
    node.umount(kept)
    _assert_released(_loops(status))
    assert list((node.state / "daemon" / "mounts").glob("*")) == []

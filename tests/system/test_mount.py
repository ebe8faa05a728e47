"""Lazy mounts for real: docker-registry on 127.0.0.1, FUSE, loop devices, ext4.

The truth every test compares against is independent of our reader: the same filesystem
built by the kernel's ext4 on a plain loop device (tests/fixtures/images.py), mounted again
the plain way; and the registry's own access log for what crossed the network.
"""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from overlaybd_py.mount import is_mountpoint
from tests.fixtures.images import build_layers, loop_mounted, push_layers, tree_digest
from tests.fixtures.node import Node
from tests.fixtures.registry import registry  # noqa: F401  (fixture)
from tests.fixtures.system import need_fuse
from tests.fixtures.testdata import sample_bytes

pytestmark = pytest.mark.system


def _step0(root: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc" / "hello.txt").write_text("hello overlaybd\n")
    (root / "data").mkdir()
    (root / "data" / "pattern.bin").write_bytes(sample_bytes("pattern.bin"))
    rnd = random.Random(0)
    (root / "data" / "random-1m.bin").write_bytes(rnd.randbytes(1 << 20))
    (root / "data" / "empty").write_bytes(b"")
    os.symlink("pattern.bin", root / "data" / "link")
    os.symlink("/etc/hello.txt", root / "abs-link")
    (root / "bin").mkdir()
    tool = root / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(tool, 0o4755)  # setuid
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)  # sticky
    (root / "home" / "user").mkdir(parents=True)
    (root / "home" / "user" / "notes").write_text("mine\n")
    os.chown(root / "home" / "user", 1000, 1000)
    os.chown(root / "home" / "user" / "notes", 1000, 1000)
    os.link(root / "data" / "pattern.bin", root / "data" / "pattern-hardlink")
    os.setxattr(root / "etc" / "hello.txt", "user.origin", b"step0")
    os.mkfifo(root / "tmp" / "fifo")
    os.mknod(root / "dev-null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "old").mkdir()
    for i in range(50):
        (root / "old" / f"f{i}").write_text(f"old {i}\n" * 100)


def _step1(root: Path) -> None:
    # deletions of lower files and directories, a hard link to a lower file, a modified file,
    # a file replaced by a directory and a directory by a file
    (root / "data" / "empty").unlink()
    for child in (root / "old").iterdir():
        child.unlink()
    (root / "old").rmdir()
    os.link(root / "data" / "random-1m.bin", root / "etc" / "random-link")
    with open(root / "data" / "random-1m.bin", "r+b") as f:
        f.seek(300_000)
        f.write(b"MODIFIED" * 1000)
    (root / "home" / "user" / "notes").unlink()
    (root / "home" / "user" / "notes").mkdir()
    (root / "home" / "user" / "notes" / "a").write_text("a\n")
    (root / "tmp" / "fifo").unlink()
    (root / "tmp" / "fifo").write_text("now a file\n")


def _step2(root: Path) -> None:
    rnd = random.Random(2)
    (root / "data" / "big.bin").write_bytes(rnd.randbytes(3 << 20))
    (root / "data" / "text.txt").write_text("overlaybd " * 200_000)
    os.setxattr(root / "data" / "text.txt", "user.step", b"2")
    os.chmod(root / "etc" / "hello.txt", 0o640)


@pytest.fixture(scope="module")
def rich_image(tmp_path_factory, registry):  # noqa: F811
    need_fuse()
    work = tmp_path_factory.mktemp("rich")
    layers, raw = build_layers(work, [_step0, _step1, _step2])
    ref = push_layers(registry.host, "system/rich:v1", layers)
    return ref, raw, layers


@pytest.fixture
def node(tmp_path):
    node = Node(tmp_path / "node")
    yield node
    node.stop()


def _oracle(raw: Path, tmp_path: Path) -> dict:
    with loop_mounted(raw, tmp_path / "oracle", readonly=True) as root:
        return tree_digest(root)


def _loops_backed_by(prefix: Path) -> list[str]:
    out = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(prefix) in line]


def test_mounted_tree_matches_the_oracle(node, rich_image, tmp_path):
    ref, raw, _layers = rich_image
    target = tmp_path / "target"
    node.mount(ref, target)
    assert is_mountpoint(str(target))
    assert tree_digest(target) == _oracle(raw, tmp_path)
    assert (target / "data" / "pattern.bin").read_bytes() == sample_bytes("pattern.bin")
    status = node.mount_status(target)
    assert status["image"] == ref and status["bytes_read"] > 0 and status["requests"] > 0
    assert status["unverified_layers"] == []  # ZFile layers: every chunk checksummed
    node.umount(target)
    assert not is_mountpoint(str(target))
    assert _loops_backed_by(node.state) == []
    assert node.status()["mounts"] == []


def test_concurrent_readers_agree_with_the_oracle(node, rich_image, tmp_path):
    ref, raw, _layers = rich_image
    target = tmp_path / "target"
    node.mount(ref, target)
    files = ["data/big.bin", "data/random-1m.bin", "data/text.txt", "data/pattern.bin"]
    with loop_mounted(raw, tmp_path / "oracle", readonly=True) as oracle:
        truth = {f: (oracle / f).read_bytes() for f in files}
    failures: list[str] = []

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(60):
            name = rnd.choice(files)
            data = truth[name]
            offset = rnd.randrange(len(data))
            length = rnd.choice((1, 4096, 65536, 500_000))
            with open(target / name, "rb") as f:
                f.seek(offset)
                got = f.read(length)
            if got != data[offset : offset + length]:
                failures.append(f"{name} at {offset}+{length}")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_writable_upper_commit_push_remount(node, rich_image, registry, tmp_path):  # noqa: F811
    ref, _raw, layers = rich_image
    target, upper = tmp_path / "rw", tmp_path / "upper"
    node.mount(ref, target, "--rw", "--upper", str(upper))
    payload = random.Random(5).randbytes(2 << 20)
    (target / "data" / "written.bin").write_bytes(payload)
    (target / "etc" / "hello.txt").write_text("changed\n")
    (target / "data" / "pattern.bin").unlink()
    os.sync()
    assert (target / "data" / "written.bin").read_bytes() == payload
    result = node.umount(target)
    assert "kept" in result.stdout
    # The lower blobs were never modified; the upper is an overlaybd writable pair.
    new_layer = tmp_path / "l3.commit"
    node.run("layer", "commit", upper / "data", upper / "index", new_layer, "--algorithm",
             "lz4", "--tar")
    new_ref = push_layers(registry.host, "system/rich:v2", [*layers, new_layer])
    target2 = tmp_path / "ro"
    node.mount(new_ref, target2)
    assert (target2 / "data" / "written.bin").read_bytes() == payload
    assert (target2 / "etc" / "hello.txt").read_text() == "changed\n"
    assert not (target2 / "data" / "pattern.bin").exists()
    node.umount(target2)


def test_killed_daemon_mounts_are_re_served_by_its_next_start(node, rich_image, tmp_path):
    # (The restart contract itself is tested in test_daemon_restart.py.)
    ref, _raw, _layers = rich_image
    target = tmp_path / "target"
    node.mount(ref, target)
    pid = node.daemon_pid()
    assert pid
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    status = node.status()
    assert status["mounts"] == [] and [m["target"] for m in status["unserved"]] == [str(target)]
    node.mount(ref, tmp_path / "other")  # starts the daemon, which re-serves the first mount
    deadline = time.monotonic() + 60
    while node.mount_status(target)["state"] != "serving":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert (target / "etc" / "hello.txt").exists()
    node.umount(target)
    node.umount(tmp_path / "other")
    assert not is_mountpoint(str(target)) and _loops_backed_by(node.state) == []


def test_foreground_mount_cleans_up_on_sigint(node, rich_image, tmp_path):
    ref, _raw, _layers = rich_image
    target = tmp_path / "fg"
    target.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "overlaybd_py", "mount", ref, str(target), "--plain-http",
         "--foreground", *node.node_flags()],
        env=node.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not is_mountpoint(str(target)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert (target / "etc" / "hello.txt").exists()
        assert node.status()["mounts"][0]["target"] == str(target)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert not is_mountpoint(str(target)) and _loops_backed_by(node.state) == []


def test_mount_errors_are_clear(node, rich_image, registry, tmp_path):  # noqa: F811
    ref, _raw, _layers = rich_image
    proc = node.mount(f"{registry.host}/system/missing:v1", tmp_path / "t1", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not found" in proc.stderr.lower() or "unknown" in proc.stderr.lower()
    proc = node.run("mount", ref, tmp_path / "no-such-dir", "--plain-http",
                    *node.node_flags(), check=False)
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    (tmp_path / "t2").mkdir()
    proc = node.run("mount", ref, tmp_path / "t2", "--plain-http", "--mirror",
                    "docker.io=http://m:5000", *node.node_flags(), check=False)
    assert proc.returncode == 2 and "[registry] proxy, mirrors and ca_file" in proc.stderr
    proc = node.run("mount", ref, tmp_path / "t2", "--plain-http", "--ca-file", "/etc/hosts",
                    *node.node_flags(), check=False)
    assert proc.returncode == 2 and "--ca-file" in proc.stderr
    proc = node.run("umount", tmp_path / "never-mounted", check=False)
    assert proc.returncode == 2 and "not mounted by overlaybd-py" in proc.stderr

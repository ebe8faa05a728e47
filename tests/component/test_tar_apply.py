"""Applying OCI layer tars onto a tree: semantics and safety (root: chown, mknod)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from overlaybd_py.convert.layout import cold_file, deferral
from overlaybd_py.convert.tar_apply import LayerApplyError, apply_tar
from overlaybd_py.engine.prefetch import device_ranges_of_paths
from tests.fixtures.system import need_program, need_root
from tests.fixtures.tars import make_tar


def apply(root: Path, entries: list[dict], layer: str = "sha256:test") -> None:
    apply_tar(io.BytesIO(make_tar(entries)), str(root), layer=layer)


@pytest.fixture
def root(tmp_path):
    need_root()
    r = tmp_path / "root"
    r.mkdir()
    return r


def test_basic_entries_and_metadata(root):
    apply(root, [
        {"name": "etc", "type": "dir"},
        {"name": "etc/hello", "data": b"hi\n", "mode": 0o640, "uid": 1000, "gid": 1001,
         "xattrs": {"user.k": "v"}},
        {"name": "bin/tool", "data": b"x", "mode": 0o4755},  # parent missing: created 0755
        {"name": "tmp", "type": "dir", "mode": 0o1777},
        {"name": "link", "type": "sym", "link": "etc/hello"},
        {"name": "dev/null", "type": "chr", "major": 1, "minor": 3, "mode": 0o666},
        {"name": "fifo", "type": "fifo"},
        {"name": "./etc/hard", "type": "link", "link": "etc/hello", "mode": 0o600, "uid": 7},
        {"name": "sparse", "data": b"a" + bytes(1 << 20) + b"b"},
        {"name": "d" * 200 + "/" + "e" * 150, "data": b"long"},
    ])
    hello = (root / "etc/hello").lstat()
    # the hard link's header (later) wins: mode 0600, uid 7, shared inode
    assert stat.S_IMODE(hello.st_mode) == 0o600 and hello.st_uid == 7 and hello.st_nlink == 2
    assert os.getxattr(root / "etc/hello", "user.k") == b"v"
    assert stat.S_IMODE((root / "bin/tool").stat().st_mode) == 0o4755
    assert stat.S_IMODE((root / "bin").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    assert os.readlink(root / "link") == "etc/hello"
    dev = (root / "dev/null").lstat()
    assert stat.S_ISCHR(dev.st_mode) and os.major(dev.st_rdev) == 1 and os.minor(dev.st_rdev) == 3
    assert stat.S_ISFIFO((root / "fifo").lstat().st_mode)
    assert (root / "etc").stat().st_mtime == 1_700_000_000
    sparse = root / "sparse"
    assert sparse.read_bytes() == b"a" + bytes(1 << 20) + b"b"
    assert sparse.stat().st_blocks * 512 < 64 << 10  # the zeros became a hole
    assert (root / ("d" * 200) / ("e" * 150)).read_bytes() == b"long"


def test_whiteouts_opaque_and_replacement(root):
    apply(root, [
        {"name": "a", "type": "dir"}, {"name": "a/keep", "data": b"1"},
        {"name": "a/gone", "data": b"2"},
        {"name": "b", "type": "dir"}, {"name": "b/x", "data": b"3"},
        {"name": "b/sub", "type": "dir"}, {"name": "b/sub/y", "data": b"4"},
        {"name": "c", "data": b"file"}, {"name": "d", "type": "dir"},
        {"name": "d/inner", "data": b"5"},
        {"name": "lower-target", "data": b"shared"},
    ], layer="sha256:lower")
    apply(root, [
        {"name": "a/.wh.gone"},
        {"name": "b", "type": "dir"}, {"name": "b/new", "data": b"6"},
        {"name": "b/.wh..wh..opq"},
        {"name": "c", "type": "dir"}, {"name": "c/now-a-dir", "data": b"7"},
        {"name": "d", "data": b"now a file"},
        {"name": "other/link-to-lower", "type": "link", "link": "lower-target"},
    ], layer="sha256:upper")
    assert sorted(os.listdir(root / "a")) == ["keep"]
    assert sorted(os.listdir(root / "b")) == ["new"]  # opaque kept this layer's entry only
    assert (root / "c/now-a-dir").read_bytes() == b"7"
    assert (root / "d").read_bytes() == b"now a file"
    assert (root / "other/link-to-lower").stat().st_ino == (root / "lower-target").stat().st_ino
    assert not any(name.startswith(".wh.") for _, _, files in os.walk(root) for name in files)


def test_symlinked_parents_are_scoped_to_the_root(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    apply(root, [
        {"name": "usr/lib", "type": "dir"},
        {"name": "lib", "type": "sym", "link": "usr/lib"},  # merged-usr style: allowed
        {"name": "evil", "type": "sym", "link": str(outside)},  # absolute: scoped to the root
        {"name": "evil2", "type": "sym", "link": "../../../../outside"},
    ])
    apply(root, [
        {"name": "lib/libc.so", "data": b"libc"},
        {"name": "evil/pwned", "data": b"x"},
    ])
    assert (root / "usr/lib/libc.so").read_bytes() == b"libc"
    assert (root / str(outside).lstrip("/") / "pwned").read_bytes() == b"x"
    # a relative link that climbs above the root is only ever hostile: an error
    with pytest.raises(LayerApplyError, match=r"evil2 -> \.\./\.\./\.\./\.\./outside points"):
        apply(root, [{"name": "evil2/pwned", "data": b"y"}])
    assert list(outside.iterdir()) == []  # nothing written outside the root


def test_directory_times_are_deterministic(root):
    apply(root, [{"name": "d", "type": "dir", "mtime": 1000},
                 {"name": "d/a", "data": b"a", "mtime": 1001}])
    apply(root, [{"name": "d/b", "data": b"b", "mtime": 2000},  # d changed, not listed
                 {"name": "implicit/c", "data": b"c", "mtime": 3000},  # parent created
                 {"name": "d/.wh.a"}])
    assert (root / "d").stat().st_mtime == 1000
    assert (root / "implicit").stat().st_mtime == 3000


@pytest.mark.parametrize("entries,message", [
    ([{"name": "../escape", "data": b"x"}], "escapes the image root"),
    ([{"name": "a/../../escape", "data": b"x"}], "escapes the image root"),
    ([{"name": "x", "type": "link", "link": "../../etc/passwd"}], "escapes the image root"),
    ([{"name": "x", "type": "link", "link": "missing"}], "does not exist"),
    ([{"name": "d", "type": "dir"}, {"name": "x", "type": "link", "link": "d"}],
     "hard link to a directory"),
    ([{"name": "f", "data": b"1"}, {"name": "f/child", "data": b"2"}], "not a directory"),
    ([{"name": "loop1", "type": "sym", "link": "loop2"},
      {"name": "loop2", "type": "sym", "link": "loop1"}, {"name": "loop1/x", "data": b"1"}],
     "too many levels"),
])
def test_hostile_entries_are_named(root, tmp_path, entries, message):
    with pytest.raises(LayerApplyError, match=message) as info:
        apply(root, entries, layer="sha256:bad")
    assert "sha256:bad" in str(info.value)
    assert not (tmp_path / "escape").exists()


def test_truncated_and_malformed_streams(root):
    blob = make_tar([{"name": "big", "data": os.urandom(100_000)}, {"name": "after"}])
    with pytest.raises(LayerApplyError, match="sha256:cut"):
        apply_tar(io.BytesIO(blob[:50_000]), str(root), layer="sha256:cut")
    with pytest.raises(LayerApplyError, match="malformed"):
        apply_tar(io.BytesIO(b"not a tar" * 100), str(root), layer="sha256:junk")
    huge = make_tar([{"name": "small", "data": b"x" * 10}])
    with pytest.raises(LayerApplyError, match="exceeds"):
        apply_tar(io.BytesIO(huge), str(root), layer="sha256:huge", vsize_limit=5)


def test_gnu_long_names_and_ustar(root):
    entries = [{"name": "x" * 120 + "/file", "data": b"gnu"},
               {"name": "ln", "type": "sym", "link": "t" * 150}]
    apply_tar(io.BytesIO(make_tar(entries, fmt=tarfile.GNU_FORMAT)), str(root), layer="gnu")
    assert (root / ("x" * 120) / "file").read_bytes() == b"gnu"
    assert os.readlink(root / "ln") == "t" * 150


def test_security_capability_xattr(root):
    # revision 2, permitted = cap_ipc_lock|cap_ipc_owner: byte 0xc0 is not valid UTF-8
    cap = bytes.fromhex("0100000200c00000000000000000000000000000")
    raw = cap.decode("utf-8", "surrogateescape")
    apply(root, [{"name": "ping", "data": b"\x7fELF", "mode": 0o755,
                  "xattrs": {"security.capability": raw}}])
    assert os.getxattr(root / "ping", "security.capability") == cap


# -- cold-last layout: deferred files ---------------------------------------------------------

def _tree(root: Path) -> dict[str, tuple]:
    """Everything a layer can set on each path (times in ns), for comparing two trees."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                body = Path(path).read_bytes()
            else:
                body = None
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                k: os.getxattr(path, k) for k in os.listxattr(path)}
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink,
                                                st.st_size, st.st_mtime_ns, body, xattrs)
    return out


COLD_LAYER = [
    {"name": "pkg", "type": "dir"},
    {"name": "pkg/mod.py", "data": b"print(1)\n" * 1000, "uid": 5, "gid": 6,
     "xattrs": {"user.k": "v"}, "mtime": 1_600_000_000},
    {"name": "pkg/tool.py", "data": b"x" + bytes(1 << 20) + b"y", "mode": 0o4755},
    {"name": "pkg/same.py", "type": "link", "link": "pkg/mod.py", "mode": 0o600, "uid": 7},
    {"name": "pkg/mod.so", "data": b"\x7fELF" + bytes(5000)},
    {"name": "pkg/replaced.py", "data": b"old"},
    {"name": "pkg/replaced.py", "data": b"new"},  # a later entry wins, deferred or not
    {"name": "pkg/gone.py", "data": b"gone"},
    {"name": "pkg/gone.py", "type": "sym", "link": "mod.py"},
    {"name": "pkg/sub/x.py", "data": b"x"},
    {"name": "pkg/sub", "data": b"now a file"},  # the deferred file's directory goes
    {"name": "pkg/sub.h", "data": b"later", "mode": 0o444},
    {"name": "pkg/empty.py", "data": b""},
    {"name": "pkg/__pycache__/mod.cpython-311.pyc", "data": b"pyc"},
    # a deferred file replaced or whited out while a hard link keeps it: the link keeps
    # the data
    {"name": "pkg/orig.py", "data": b"hello"},
    {"name": "pkg/alias.so", "type": "link", "link": "pkg/orig.py"},
    {"name": "pkg/orig.py", "data": b"new"},
    {"name": "pkg/w.py", "data": b"kept by its link"},
    {"name": "pkg/w2.py", "type": "link", "link": "pkg/w.py"},
    {"name": "pkg/.wh.w.py"},
    {"name": "pkg/d/in.py", "data": b"kept too"},
    {"name": "pkg/d-link.py", "type": "link", "link": "pkg/d/in.py"},
    {"name": "pkg/d", "type": "sym", "link": "sub"},
    {"name": "pkg/dir2", "type": "dir"},
    {"name": "pkg/dir2", "type": "link", "link": "pkg/mod.so"},  # a link replaces a directory
    # a write clears file capabilities, whoever writes: the deferred write must not
    {"name": "pkg/capable.py", "data": b"#!/usr/bin/python3\n", "mode": 0o755,
     "xattrs": {"security.capability": bytes.fromhex("0100000200c00000000000000000000000000000"
                                                      ).decode("utf-8", "surrogateescape")}},
]


def test_deferred_files_end_up_as_without_deferral(root, tmp_path):
    """Writing cold files' data at the end of the layer changes where their blocks go,
    nothing else: contents, holes, modes (setuid), owners, xattrs, hard links, times, and
    later entries that replace a deferred file or its directory all come out the same."""
    plain = tmp_path / "plain"
    plain.mkdir()
    apply(plain, COLD_LAYER)
    stats = apply_tar(io.BytesIO(make_tar(COLD_LAYER)), str(root), layer="sha256:test",
                      defer=cold_file)
    assert _tree(root) == _tree(plain)
    assert (root / "pkg/mod.py").read_bytes() == b"print(1)\n" * 1000
    assert (root / "pkg/same.py").stat().st_nlink == 2
    assert stat.S_IMODE((root / "pkg/tool.py").stat().st_mode) == 0o4755
    assert (root / "pkg/tool.py").stat().st_blocks * 512 < 64 << 10  # the hole survived
    assert (root / "pkg/replaced.py").read_bytes() == b"new"
    assert os.readlink(root / "pkg/gone.py") == "mod.py"
    assert (root / "pkg/sub").read_bytes() == b"now a file"
    assert os.getxattr(root / "pkg/capable.py", "security.capability")[:4] == b"\x01\x00\x00\x02"
    assert (root / "pkg/alias.so").read_bytes() == b"hello"
    assert (root / "pkg/w2.py").read_bytes() == b"kept by its link"
    assert (root / "pkg/d-link.py").read_bytes() == b"kept too"
    assert stats.files == sum(1 for e in COLD_LAYER if e.get("type", "file") == "file"
                              and ".wh." not in e["name"])


def _first_blocks(mnt: Path, names: list[str]) -> dict[str, int]:
    out = {}
    for name in names:
        ranges = device_ranges_of_paths(str(mnt), [name])
        assert ranges, name
        out[name] = ranges[0][0] // 4096
    return out


@pytest.mark.parametrize("layout", ["cold-last", "tar"])
def test_cold_last_writes_cold_files_after_the_rest_of_the_layer(tmp_path, layout):
    """On a real ext4 mounted as the converter mounts it (nodelalloc, one CPU), cold-last
    puts every source file's blocks after every other file's; tar order interleaves them."""
    need_root()
    need_program("mkfs.ext4")
    need_program("debugfs")
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(image)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "nodelalloc", loop, str(mnt)], check=True)
        try:
            entries, hot, cold = [], [], []
            for i in range(12):
                for name in (f"pkg/m{i}.py", f"pkg/__pycache__/m{i}.cpython-311.pyc",
                             f"pkg/m{i}.so", f"include/m{i}.h"):
                    entries.append({"name": name, "data": os.urandom(12288)})
                    (cold if cold_file(name) else hot).append(name)
            # A version-3 file capability for root: reading it back gives the kernel's
            # version-2 translation; the bytes stored must stay the entry's.
            cap_v3 = bytes.fromhex("010000030020000000000000000000000000000000000000")
            entries.append({"name": "bin/capable.py", "data": b"#!/bin/sh\n", "mode": 0o755,
                            "xattrs": {"security.capability":
                                       cap_v3.decode("utf-8", "surrogateescape")}})
            previous = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {min(previous)})
            try:
                apply_tar(io.BytesIO(make_tar(entries)), str(mnt), layer="sha256:test",
                          defer=deferral(layout))
            finally:
                os.sched_setaffinity(0, previous)
            os.sync()
            blocks = _first_blocks(mnt, hot + cold)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "--detach", loop], check=True)
    stored = subprocess.run(["debugfs", "-R", "ea_get -x /bin/capable.py security.capability",
                             str(image)], check=True, capture_output=True, text=True).stdout
    assert stored.split("=", 1)[1].split() == [f"{b:02x}" for b in cap_v3]
    last_hot = max(blocks[n] for n in hot)
    first_cold = min(blocks[n] for n in cold)
    if layout == "cold-last":
        assert first_cold > last_hot
        # Among themselves, the cold files keep tar order.
        assert [blocks[n] for n in cold] == sorted(blocks[n] for n in cold)
    else:
        assert first_cold < last_hot


def test_unknown_layouts_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown layout 'random': use one of cold-last, tar"):
        deferral("random")

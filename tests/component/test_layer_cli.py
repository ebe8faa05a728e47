"""`overlaybd-py layer ...` end to end on the original tools' files (the issue's acceptance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from overlaybd_py import _accel
from overlaybd_py.engine.layer import open_layer
from overlaybd_py.engine.source import MemorySource
from overlaybd_py.formats import zfile
from tests.fixtures.system import need_program
from tests.fixtures.testdata import sample, sample_bytes

L1_VARIANTS = ["l1.lz4.tar", "l1.lz4.hdrov.zfile", "l1.zstd64k.zfile", "l1.commit.lz4.zfile",
               "l1.commit.zstd.zfile", "l1.commit"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "overlaybd_py", *map(str, args)],
                          capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"overlaybd-py {' '.join(map(str, args))} failed "
                             f"({proc.returncode}): {proc.stderr}")
    return proc


def debugfs_cat(image: Path, path: str) -> bytes:
    debugfs = need_program("debugfs")
    return subprocess.run([debugfs, "-R", f"cat {path}", str(image)], capture_output=True,
                          check=True).stdout


@pytest.mark.parametrize("name", L1_VARIANTS)
def test_extract_l0_plus_l1_variant(tmp_path, name):
    raw = tmp_path / "raw.img"
    info = json.loads(cli("layer", "extract", sample("l0.commit"), sample(name), "--output",
                          raw, "--json").stdout)
    assert info["virtual_size"] == 1 << 30 and raw.stat().st_size == 1 << 30
    assert debugfs_cat(raw, "/data/pattern.bin") == sample_bytes("pattern.bin")
    assert debugfs_cat(raw, "/etc/hello.txt") == b"hello overlaybd\n"
    e2fsck = need_program("e2fsck")
    fsck = subprocess.run([e2fsck, "-fn", str(raw)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.parametrize("name", [n for n in L1_VARIANTS if n != "l1.commit"])
def test_decompress_gives_l1_commit(tmp_path, name):
    cli("layer", "decompress", sample(name), tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == sample_bytes("l1.commit")


def test_inspect_every_sample():
    expect = {
        "l0.commit": ("lsmt", 14), "l1.commit": ("lsmt", 10), "empty.commit": ("lsmt", 0),
        "l1.lz4.tar": ("zfile", 10), "l1.zstd64k.zfile": ("zfile", 10),
        "baselayer-ext4_64.zfile": ("zfile", 8323),
    }
    for name, (kind, segments) in expect.items():
        info = json.loads(cli("layer", "inspect", sample(name), "--json").stdout)
        assert (info["kind"], info["segments"]) == (kind, segments), name
    info = json.loads(cli("layer", "inspect", sample("l1.zstd64k.zfile"), "--json").stdout)
    assert (info["algorithm"], info["chunk_size"]) == ("zstd", 65536)
    assert info["virtual_size"] == 1 << 30
    assert info["uuid"] == "00000000-0000-0000-0000-000000000000"
    info = json.loads(cli("layer", "inspect", sample("l1.index"), "--json").stdout)
    assert info["sealed"] is False and info["file_type"] == "index"


def test_turbo_oci_refused_clearly():
    proc = cli("layer", "inspect", sample("t1.commit"), check=False)
    assert proc.returncode == 1 and "turboOCI" in proc.stderr and "Traceback" not in proc.stderr


def test_commit_reproduces_the_plain_layer(tmp_path):
    out = tmp_path / "c"
    cli("layer", "commit", sample("l1.data"), sample("l1.index"), out, "-m", "layer1 apply")
    assert out.read_bytes() == sample_bytes("l1.commit")


def _decoded(blob: bytes):
    """(plaintext, ZFile slot) of a bare or tar-wrapped ZFile layer blob."""

    async def run():
        layer = await open_layer(MemorySource(blob), key="blob")
        return await layer.lsmt.read_at(0, layer.lsmt.size), layer.zfile.index.header

    return trio.run(run)


def _assert_same_but_payload(ours: bytes, theirs: bytes) -> None:
    """Equal, or differing only in compressed payloads and what covers them."""
    if ours == theirs:
        return
    (a, ha), (b, hb) = _decoded(ours), _decoded(theirs)
    assert a == b
    for field in ("flags", "index_size", "original_size", "block_size", "algorithm", "verify"):
        assert getattr(ha, field) == getattr(hb, field), field


@pytest.mark.parametrize("args,reference", [
    (["--algorithm", "lz4", "--tar"], "l1.lz4.tar"),
    (["--algorithm", "lz4"], "l1.lz4.hdrov.zfile"),
    (["--algorithm", "zstd", "--chunk-size", "64"], "l1.zstd64k.zfile"),
])
def test_commit_compressed_variants(tmp_path, args, reference):
    out = tmp_path / "c"
    cli("layer", "commit", sample("l1.data"), sample("l1.index"), out, "-m", "layer1 apply",
        *args)
    ours, theirs = out.read_bytes(), sample_bytes(reference)
    _assert_same_but_payload(ours, theirs)
    if _accel.BACKEND == "native":  # Debian's liblz4/libzstd compress as the original did
        assert ours == theirs
    assert cli("layer", "verify", out).returncode == 0


@pytest.mark.parametrize("algorithm,reference", [
    ("lz4", "l1.commit.lz4.zfile"), ("zstd", "l1.commit.zstd.zfile")])
def test_compress_variants(tmp_path, algorithm, reference):
    out = tmp_path / "z"
    cli("layer", "compress", sample("l1.commit"), out, "--algorithm", algorithm)
    ours, theirs = out.read_bytes(), sample_bytes(reference)
    _assert_same_but_payload(ours, theirs)
    assert ours[:512] == theirs[:512]
    if _accel.BACKEND == "native":
        assert ours == theirs


def test_create_mkfs_commit_extract_is_a_clean_ext4(tmp_path):
    cli("layer", "create", tmp_path / "d", tmp_path / "i", "1", "--mkfs")
    cli("layer", "commit", tmp_path / "d", tmp_path / "i", tmp_path / "c", "--algorithm",
        "lz4", "--tar")
    cli("layer", "extract", tmp_path / "c", "--output", tmp_path / "raw")
    e2fsck = need_program("e2fsck")
    fsck = subprocess.run([e2fsck, "-fn", str(tmp_path / "raw")], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dumpe2fs = need_program("dumpe2fs")
    features = subprocess.run([dumpe2fs, "-h", str(tmp_path / "raw")], capture_output=True,
                              text=True).stdout
    assert "has_journal" not in features and "metadata_csum" not in features
    for feature in ("64bit", "sparse_super2", "extent", "flex_bg", "dir_index"):
        assert feature in features
    # Only what mke2fs wrote went into the layer: a few hundred KiB for 1 GiB.
    assert os.path.getsize(tmp_path / "d") < 2 << 20
    # Two runs give identical layers (reproducible mkfs).
    cli("layer", "create", tmp_path / "d2", tmp_path / "i2", "1", "--mkfs")
    cli("layer", "commit", tmp_path / "d2", tmp_path / "i2", tmp_path / "c2")
    cli("layer", "commit", tmp_path / "d", tmp_path / "i", tmp_path / "c1")
    assert (tmp_path / "c1").read_bytes() == (tmp_path / "c2").read_bytes()


def test_verify_reports_corruption(tmp_path):
    blob = bytearray(sample_bytes("l1.lz4.tar"))
    blob[1536 + 600] ^= 0x10  # inside a chunk payload
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(blob))
    proc = cli("layer", "verify", bad, check=False)
    assert proc.returncode == 1 and "CORRUPT" in proc.stdout and "chunk" in proc.stdout
    proc = cli("layer", "verify", sample("l0.commit"))
    assert "no checksum" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["layer", "commit", "a", "b", "c", "--chunk-size", "3"], "chunk size"),
    (["layer", "inspect", "/nonexistent"], "no such file"),
    (["layer", "create", "d", "i", "0"], "virtual size"),
    (["layer", "compress", "a", "b", "--level", "13"], "lz4 compression level must be 0-12"),
    (["layer", "compress", "a", "b", "--algorithm", "zstd", "--level", "30"],
     "zstd compression level must be 0-22"),
    (["layer", "commit", "a", "b", "c", "--level", "5"], "--level needs --algorithm"),
    (["convert", "r/x:1", "--referrer", "--algorithm", "zstd", "--level", "23"],
     "zstd compression level must be 0-22"),
])
def test_usage_errors_exit_2(args, message):
    proc = cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_zfile_chunk_sizes_roundtrip(tmp_path):
    for kib in (4, 8, 16, 32, 64):
        out = tmp_path / f"z{kib}"
        cli("layer", "compress", sample("l0.commit"), out, "--chunk-size", str(kib))
        info = json.loads(cli("layer", "inspect", out, "--json").stdout)
        assert info["chunk_size"] == kib * 1024 and zfile.is_zfile(out.read_bytes()[:512])
        cli("layer", "decompress", out, tmp_path / "plain")
        assert (tmp_path / "plain").read_bytes() == sample_bytes("l0.commit")


def test_compress_and_commit_at_a_higher_level(tmp_path):
    """--level: smaller files that decode to the same bytes (and the same layer)."""
    sizes = {}
    for level in ("0", "9"):
        out = tmp_path / f"l{level}.zfile"
        cli("layer", "compress", sample("l1.commit"), out, "--level", level)
        sizes[level] = out.stat().st_size
        cli("layer", "decompress", out, tmp_path / "plain")
        assert (tmp_path / "plain").read_bytes() == sample_bytes("l1.commit")
    assert sizes["9"] < sizes["0"]
    data, index = tmp_path / "data", tmp_path / "index"
    cli("layer", "create", data, index, "1")
    committed = tmp_path / "c.zfile"
    cli("layer", "commit", data, index, committed, "--algorithm", "zstd", "--level", "19")
    info = json.loads(cli("layer", "inspect", committed, "--json").stdout)
    assert info["algorithm"] == "zstd"
    cli("layer", "verify", committed)

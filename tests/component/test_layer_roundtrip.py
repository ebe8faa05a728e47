"""Writable layers -> commit -> (ZFile, tar) -> open -> merged device, against a bytearray
model; and damaged files: a FormatError or exactly the right bytes, never anything else."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaybd_py.engine.layer import open_layer
from overlaybd_py.engine.layer_files import commit_layer
from overlaybd_py.engine.layered import LayeredDevice
from overlaybd_py.engine.source import FileSource
from overlaybd_py.engine.writable import WritableLayer
from overlaybd_py.errors import FormatError

VSIZE = 1 << 20
SECTORS = VSIZE // 512

writes = st.lists(
    st.tuples(st.integers(0, SECTORS - 1), st.integers(1, 300), st.sampled_from(["w", "w", "d"]),
              st.integers(0, 2**32)),
    max_size=12,
)
forms = st.tuples(st.sampled_from([None, "lz4", "zstd"]), st.sampled_from([4096, 16384, 65536]),
                  st.booleans())


def apply_writes(layer: WritableLayer, model: bytearray, ops) -> None:
    for sector, count, kind, seed in ops:
        count = min(count, SECTORS - sector)
        offset, length = sector * 512, count * 512
        if kind == "d":
            layer.discard(offset, length)
            model[offset : offset + length] = bytes(length)
        else:
            data = random.Random(seed).randbytes(length)
            layer.write(offset, data)
            model[offset : offset + length] = data


def build_layer(workdir: str, name: str, ops, form, model: bytearray) -> str:
    data, index = os.path.join(workdir, name + ".data"), os.path.join(workdir, name + ".index")
    layer = WritableLayer.create(data, index, VSIZE)
    apply_writes(layer, model, ops)
    layer.close()
    algorithm, chunk_size, tar = form
    out = os.path.join(workdir, name + ".commit")
    commit_layer(data, index, out, algorithm=algorithm, chunk_size=chunk_size, tar=tar,
                 message=name)
    return out


async def read_device(paths: list[str], upper: WritableLayer | None = None) -> bytes:
    layers = []
    try:
        for path in paths:
            layers.append(await open_layer(await FileSource.open(path), key=path))
        device = LayeredDevice(layers, upper)
        assert device.size == VSIZE
        parts = []
        rnd = random.Random(len(paths))
        pos = 0
        while pos < VSIZE:  # odd-sized, unaligned reads
            n = min(rnd.choice((1, 511, 4096, 70_000)), VSIZE - pos)
            parts.append(await device.read_at(pos, n))
            pos += n
        return b"".join(parts)
    finally:
        for layer in layers:
            await layer.blob.aclose()


@settings(max_examples=40, deadline=None)
@given(stack=st.lists(st.tuples(writes, forms), min_size=1, max_size=3), upper_ops=writes)
def test_stack_reads_like_the_model(accel, stack, upper_ops):
    model = bytearray(VSIZE)
    with tempfile.TemporaryDirectory() as workdir:
        paths = [build_layer(workdir, f"l{i}", ops, form, model)
                 for i, (ops, form) in enumerate(stack)]
        assert trio.run(read_device, paths) == bytes(model)
        # A writable upper on top: its writes win, the lower files stay untouched.
        before = [Path(p).read_bytes() for p in paths]
        upper = WritableLayer.create(os.path.join(workdir, "u.data"),
                                     os.path.join(workdir, "u.index"), VSIZE)
        apply_writes(upper, model, upper_ops)
        try:
            assert trio.run(read_device, paths, upper) == bytes(model)
        finally:
            upper.close()
        # Reopening the upper replays its log to the same state.
        upper = WritableLayer.open(os.path.join(workdir, "u.data"),
                                   os.path.join(workdir, "u.index"))
        try:
            assert trio.run(read_device, paths, upper) == bytes(model)
        finally:
            upper.close()
        assert [Path(p).read_bytes() for p in paths] == before


async def _device_write_read(paths, upper, writes_):
    layers = [await open_layer(await FileSource.open(p), key=p) for p in paths]
    device = LayeredDevice(layers, upper)
    for offset, data in writes_:
        await device.write_at(offset, data)
    out = await device.read_at(0, VSIZE)
    for layer in layers:
        await layer.blob.aclose()
    return out


def test_unaligned_device_writes(tmp_path):
    model = bytearray(VSIZE)
    base = build_layer(str(tmp_path), "base", [(0, 2048, "w", 1)], ("lz4", 4096, True), model)
    upper = WritableLayer.create(str(tmp_path / "u.data"), str(tmp_path / "u.index"), VSIZE)
    rnd = random.Random(3)
    ops = []
    for _ in range(50):
        offset = rnd.randrange(VSIZE - 10_000)
        data = rnd.randbytes(rnd.randrange(1, 10_000))
        ops.append((offset, data))
        model[offset : offset + len(data)] = data
    assert trio.run(_device_write_read, [base], upper, ops) == bytes(model)
    upper.close()


def _damaged_variants(blob: bytes, structural: list[int], rnd: random.Random):
    for cut in sorted({0, 1, 100, 511, 512, 4095, len(blob) // 2, len(blob) - 513,
                       len(blob) - 1}):
        if 0 <= cut < len(blob):
            yield f"truncated at {cut}", blob[:cut]
    for offset in structural:
        if 0 <= offset < len(blob):
            damaged = bytearray(blob)
            damaged[offset] ^= 1 << rnd.randrange(8)
            yield f"bit flip at {offset}", bytes(damaged)


@pytest.mark.allow_log_warnings
@pytest.mark.parametrize("form", [("lz4", 4096, False), ("zstd", 16384, True),
                                  ("lz4", 65536, True), (None, 4096, False)])
def test_damaged_layers_fail_cleanly(tmp_path, form):
    model = bytearray(VSIZE)
    ops = [(s, 37, "w", s) for s in range(0, SECTORS - 37, 97)] + [(500, 100, "d", 0)]
    path = build_layer(str(tmp_path), "l", ops, form, model)
    blob = Path(path).read_bytes()
    rnd = random.Random(11)
    if form[0] is None:
        # A plain LSMT layer has no checksums: only damage that is always detectable.
        structural = [0, 3, 9, 24, len(blob) - 4096, len(blob) - 4090, len(blob) - 4072]
    else:
        # Every byte of a ZFile is covered: header, chunks, jump table, trailer.
        structural = sorted(rnd.sample(range(len(blob)), 120)) + list(range(0, 96, 7)) + list(
            range(len(blob) - 512, len(blob) - 400, 5))
    damaged_path = str(tmp_path / "damaged")
    outcomes = {"error": 0, "exact": 0}
    for what, damaged in _damaged_variants(blob, structural, rnd):
        with open(damaged_path, "wb") as f:
            f.write(damaged)
        try:
            data = trio.run(read_device, [damaged_path])
        except FormatError:
            outcomes["error"] += 1
            continue
        assert data == bytes(model), f"{what}: wrong bytes served without an error"
        outcomes["exact"] += 1
    assert outcomes["error"] > 0

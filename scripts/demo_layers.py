"""Offline demo of the formats (no root, no network): an ext4 image, written as two
overlaybd layers, read back through the merged index.

1. Build a small ext4 image from a directory of files with mke2fs (no root needed).
2. Layer 0: an empty ext4 made by ``layer create --mkfs``; layer 1: the blocks where the
   full image differs from it, written into a writable layer stacked on layer 0.
3. Seal both (ZFile lz4 / zstd, tar-wrapped: the registry blob form).
4. Open the two blobs, stack them, read the whole device back and compare it with the
   original image; extract one file with debugfs from the merged device.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from overlaybd_py.engine.layer import open_layer
from overlaybd_py.engine.layer_files import commit_layer
from overlaybd_py.engine.layered import LayeredDevice
from overlaybd_py.engine.mkfs import FAKE_TIME, mkfs_command, mkfs_into
from overlaybd_py.engine.source import FileSource
from overlaybd_py.engine.writable import WritableLayer

VSIZE = 1 << 30
STEP = 4 << 20


def make_files(root: str) -> None:
    os.makedirs(f"{root}/etc")
    os.makedirs(f"{root}/data/deep/er")
    with open(f"{root}/etc/hello.txt", "w") as f:
        f.write("hello from overlaybd-py\n")
    with open(f"{root}/data/random.bin", "wb") as f:
        f.write(os.urandom(3 << 20))
    with open(f"{root}/data/deep/er/text.txt", "w") as f:
        f.write("overlaybd " * 100_000)
    os.symlink("../etc/hello.txt", f"{root}/data/link")


async def build_layers(work: str, image: str) -> list[str]:
    # Layer 0: the empty filesystem, made by our mkfs path.
    base = WritableLayer.create(f"{work}/l0.data", f"{work}/l0.index", VSIZE)
    await mkfs_into(base)
    base.close()
    commit_layer(f"{work}/l0.data", f"{work}/l0.index", f"{work}/l0.tar", algorithm="lz4",
                 tar=True, message="layer0 mkfs")
    # Layer 1: every 4 KiB block where the full image differs from layer 0.
    blob0 = await FileSource.open(f"{work}/l0.tar")
    lower = LayeredDevice([await open_layer(blob0, key="l0")])
    upper = WritableLayer.create(f"{work}/l1.data", f"{work}/l1.index", VSIZE)
    changed = 0
    with open(image, "rb") as f:
        for pos in range(0, VSIZE, STEP):
            want = f.read(STEP)
            have = await lower.read_at(pos, STEP)
            for i in range(0, STEP, 4096):
                if want[i : i + 4096] != have[i : i + 4096]:
                    upper.write(pos + i, want[i : i + 4096])
                    changed += 4096
    upper.close()
    await blob0.aclose()
    commit_layer(f"{work}/l1.data", f"{work}/l1.index", f"{work}/l1.tar", algorithm="zstd",
                 tar=True, message="layer1 files")
    print(f"  layer 1 holds {changed >> 10} KiB of changed blocks")
    return [f"{work}/l0.tar", f"{work}/l1.tar"]


async def read_back(paths: list[str], image: str, merged_path: str) -> bool:
    blobs = [await FileSource.open(p) for p in paths]
    layers = [
        await open_layer(b, key=os.path.basename(p)) for b, p in zip(blobs, paths, strict=True)
    ]
    device = LayeredDevice(layers)
    print(f"  merged index: {len(device.merged)} segments over {len(layers)} layers, "
          f"device {device.size >> 20} MiB")
    same = True
    started = time.monotonic()
    with open(image, "rb") as f, open(merged_path, "wb") as out:
        out.truncate(device.size)
        for pos in range(0, device.size, STEP):
            data = await device.read_at(pos, STEP)
            if data != f.read(STEP):
                same = False
            if data.count(0) != len(data):
                out.seek(pos)
                out.write(data)
    print(f"  read {device.size >> 20} MiB through the merged index in "
          f"{time.monotonic() - started:.1f} s")
    for b in blobs:
        await b.aclose()
    return same


def main() -> int:
    for tool in ("mke2fs", "debugfs"):
        if not (shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")):
            print(f"demo: {tool} not found (install e2fsprogs)", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="overlaybd-demo-") as work:
        files = f"{work}/files"
        make_files(files)
        image = f"{work}/full.img"
        with open(image, "wb") as f:
            f.truncate(VSIZE)
        print("1. ext4 image from a directory (mke2fs -d)")
        env = dict(os.environ, E2FSPROGS_FAKE_TIME=FAKE_TIME)
        cmd = mkfs_command(image)
        subprocess.run([*cmd[:-1], "-d", files, image], check=True, env=env)
        print("2-3. two overlaybd layers, sealed as tar-wrapped ZFiles")
        paths = trio.run(build_layers, work, image)
        for p in paths:
            print(f"  {os.path.basename(p)}: {os.path.getsize(p) >> 10} KiB")
        print("4. read back through the merged index")
        merged = f"{work}/merged.img"
        same = trio.run(read_back, paths, image, merged)
        debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
        text = subprocess.run([debugfs, "-R", "cat /etc/hello.txt", merged],
                              capture_output=True, text=True).stdout
        want = hashlib.sha256(Path(f"{files}/data/random.bin").read_bytes()).hexdigest()
        got = hashlib.sha256(subprocess.run(
            [debugfs, "-R", "cat /data/random.bin", merged], capture_output=True).stdout
        ).hexdigest()
        print(f"  /etc/hello.txt from the merged device: {text.strip()!r}")
        print(f"  /data/random.bin sha256 matches: {got == want}")
        print("RESULT:", "merged device == original image" if same and got == want
              else "MISMATCH")
        return 0 if same and got == want else 1


if __name__ == "__main__":
    sys.exit(main())

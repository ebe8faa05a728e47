"""Conversion throughput vs the work no converter can skip, side by side in one run (root).

    .venv/bin/python bench/bench_convert.py [--repeat 3] [--output bench/results/convert]

The image: three gzip layers, >= 300 MB uncompressed (a Debian rootfs from the demo's cache,
or generated files when it is absent, then two layers of mixed data and changes), pushed to
a private docker-registry on 127.0.0.1.

- overlaybd-py: ``overlaybd-py convert --dest ... --no-cache`` (download, gunzip, apply
  through FUSE + loop + ext4, seal + lz4 ZFile, upload), with its per-phase times.
- baseline: ``gunzip -c | tar -x`` of the same layer files into an ext4 loop mount (the same
  mkfs options), then ``lz4`` of the resulting image file.

The page cache is dropped before each run of either side. Results: OUTPUT/result.json and
OUTPUT/report.md (ratio = our time / baseline time; the target is <= 2).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from overlaybd_py.engine.mkfs import FAKE_TIME, mkfs_command  # noqa: E402
from tests.fixtures.oci_images import push_layout, write_layout  # noqa: E402
from tests.fixtures.registry import RegistryServer  # noqa: E402

DEMO_ROOTFS = Path.home() / ".cache" / "overlaybd-py" / "demo-bookworm-minbase-python3.tar"


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def image_layers() -> list[bytes]:
    rnd = random.Random(7)
    if DEMO_ROOTFS.exists():
        base = DEMO_ROOTFS.read_bytes()
    else:  # no demo cache: ~200 MB of generated "binaries" and text in many files
        base = _tar({f"usr/lib/pkg{i // 50}/f{i}": rnd.randbytes(20_000) + b"x" * 60_000
                     for i in range(2500)})
    words = b"lorem ipsum dolor sit amet overlaybd container image layer block "
    l1 = _tar({**{f"opt/data/blob{i}.bin": rnd.randbytes(1 << 20) for i in range(40)},
               **{f"opt/docs/doc{i}.txt": words * (6000 + i) for i in range(200)}})
    l2 = _tar({**{f"opt/data/blob{i}.bin": rnd.randbytes(1 << 20) for i in range(0, 40, 4)},
               **{f"srv/log{i}.txt": words * 3000 for i in range(300)}})
    return [base, l1, l2]


def baseline(work: Path, gz_layers: list[Path], image_size: int) -> dict[str, float]:
    raw = work / "baseline.img"
    mnt = work / "baseline-mnt"
    mnt.mkdir(exist_ok=True)
    raw.unlink(missing_ok=True)
    with open(raw, "wb") as f:
        f.truncate(image_size)
    subprocess.run(mkfs_command(str(raw)), check=True, capture_output=True,
                   env=dict(os.environ, E2FSPROGS_FAKE_TIME=FAKE_TIME))
    drop_caches()
    started = time.perf_counter()
    subprocess.run(["mount", "-o", "loop", str(raw), str(mnt)], check=True)
    try:
        for layer in gz_layers:
            subprocess.run(f"gunzip -c {layer} | tar --numeric-owner -x -C {mnt}", shell=True,
                           check=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    applied = time.perf_counter()
    subprocess.run(["lz4", "-q", "-f", str(raw), str(raw) + ".lz4"], check=True)
    done = time.perf_counter()
    return {"apply": applied - started, "compress": done - applied, "total": done - started}


def ours(work: Path, ref: str, dest: str) -> dict:
    drop_caches()
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "overlaybd_py", "convert", ref, "--dest", dest,
                          "--plain-http", "--no-cache", "--quiet", "--json",
                          "--work-dir", str(work / "convert")],
                         check=True, capture_output=True, text=True).stdout
    total = time.perf_counter() - started
    summary = json.loads(out)
    layers = summary["platforms"][0]["layers"]
    phases = {k: sum(layer["seconds"].get(k, 0) for layer in layers) for k in ("apply", "seal")}
    phases["upload"] = summary["pushed"][0]["upload_seconds"]
    return {"total": total, "phases": phases,
            "blob_bytes": sum(layer["blob_size"] for layer in layers)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "convert"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_convert needs root", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="obd-bench-convert-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        tars = image_layers()
        uncompressed = sum(len(t) for t in tars)
        image = write_layout(work / "layout", tars)
        gz_layers = []
        for i, t in enumerate(tars):
            path = work / f"layer{i}.tar.gz"
            path.write_bytes(gzip.compress(t, compresslevel=6, mtime=0))
            gz_layers.append(path)
        gzip_bytes = sum(p.stat().st_size for p in gz_layers)
        registry = RegistryServer(work / "registry").start()
        try:
            ref = push_layout(image, registry.host, "bench/convert:src")
            size = max(1 << 30, -(-2 * uncompressed // (1 << 30)) << 30)
            runs_ours, runs_base = [], []
            for i in range(args.repeat):
                runs_base.append(baseline(work, gz_layers, size))
                runs_ours.append(ours(work, ref, f"{registry.host}/bench/convert:obd{i}"))
                shutil.rmtree(work / "convert", ignore_errors=True)
        finally:
            registry.stop()
    med = statistics.median
    result = {
        "uncompressed_bytes": uncompressed, "gzip_bytes": gzip_bytes,
        "ours_seconds": [r["total"] for r in runs_ours],
        "baseline_seconds": [r["total"] for r in runs_base],
        "ours_phases_median": {k: med(r["phases"][k] for r in runs_ours)
                               for k in runs_ours[0]["phases"]},
        "baseline_phases_median": {k: med(r[k] for r in runs_base) for k in ("apply", "compress")},
        "ratio": med(r["total"] for r in runs_ours) / med(r["total"] for r in runs_base),
        "throughput_mb_s": uncompressed / med(r["total"] for r in runs_ours) / 1e6,
        "blob_bytes": runs_ours[0]["blob_bytes"],
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    o, b = result["ours_phases_median"], result["baseline_phases_median"]
    report = (
        f"# Conversion benchmark\n\n{uncompressed / 1e6:.0f} MB uncompressed in 3 gzip layers; "
        f"medians of {args.repeat} runs; page cache dropped before each.\n\n"
        f"| | total | phases |\n|---|---|---|\n"
        f"| overlaybd-py convert | {med(result['ours_seconds']):.1f} s "
        f"({result['throughput_mb_s']:.0f} MB/s) | download+gunzip+apply {o['apply']:.1f} s, "
        f"seal+lz4 {o['seal']:.1f} s (overlapped), upload {o['upload']:.1f} s |\n"
        f"| baseline gunzip + tar -x into ext4 + lz4 | {med(result['baseline_seconds']):.1f} s "
        f"| gunzip+tar {b['apply']:.1f} s, lz4 {b['compress']:.1f} s |\n\n"
        f"Ratio (ours / baseline): **{result['ratio']:.2f}** (target <= 2).\n"
    )
    (out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

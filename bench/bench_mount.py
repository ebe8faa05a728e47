"""Lazy mount benchmarks, each side by side with its baseline in the same run (root only).

    .venv/bin/python bench/bench_mount.py [--size-mib 256] [--output bench/results/mount]

1. Warm block cache, cold page cache: sequential and random 4 KiB reads of a large file
   through the lazily mounted image vs the same ext4 image file on a plain loop device.
2. Cold read of the large file over loopback (empty block cache) vs ``curl`` downloading the
   same content as an lz4 frame piped into ``lz4 -d`` (a full download + decompress).
3. Daemon memory (RSS) with an image of 1M index records mounted, next to the 16 MiB the
   records take on disk.

The page cache is dropped before every cold measurement, on both sides. Results go to
``OUTPUT/result.json`` and ``OUTPUT/report.md``; the machine is shared and noisy, so the
report gives ratios, each the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from overlaybd_py.engine.layer_files import commit_layer  # noqa: E402
from overlaybd_py.engine.writable import WritableLayer  # noqa: E402
from tests.fixtures.images import build_layers, loop_mounted, push_layers  # noqa: E402
from tests.fixtures.node import Node  # noqa: E402
from tests.fixtures.registry import RegistryServer  # noqa: E402


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def seq_read(path: Path) -> float:
    drop_caches()
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    return time.perf_counter() - started


def random_reads(path: Path, count: int, seed: int) -> float:
    drop_caches()
    size = path.stat().st_size
    rnd = random.Random(seed)
    offsets = [rnd.randrange(size // 4096) * 4096 for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        started = time.perf_counter()
        for offset in offsets:
            os.pread(fd, 4096, offset)
        return time.perf_counter() - started
    finally:
        os.close(fd)


def median(values: list[float]) -> float:
    return statistics.median(values)


def bench_reads(work: Path, registry: RegistryServer, size_mib: int, repeat: int) -> dict:
    def step(root: Path) -> None:
        rnd = random.Random(1)
        with open(root / "big.bin", "wb") as f:
            for _ in range(size_mib):
                # half random, half text: compresses about like real binaries
                f.write(rnd.randbytes(512 << 10) + (b"overlaybd benchmark " * 26215)[: 512 << 10])

    layers, raw = build_layers(work / "layers", [step])
    ref = push_layers(registry.host, "bench/reads:v1", layers)
    # the baseline blob for the cold download: the same file as one lz4 frame
    with loop_mounted(raw, work / "plain", readonly=True) as plain:
        lz4_path = work / "big.bin.lz4"
        subprocess.run(["lz4", "-q", "-f", str(plain / "big.bin"), str(lz4_path)], check=True)
    push_layers(registry.host, "bench/lz4:v1", [lz4_path])  # its blob is the download
    lz4_digest = (
        "sha256:"
        + subprocess.run(
            ["sha256sum", str(lz4_path)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    node = Node(work / "node")
    target = work / "lazy"
    results: dict = {"file_mib": size_mib, "blob_bytes": layers[0].stat().st_size}
    try:
        cold_lazy, cold_curl = [], []
        for _ in range(repeat):
            node.run("cache", "clear", "--cache-dir", str(node.cache))
            node.mount(ref, target)
            cold_lazy.append(seq_read(target / "big.bin"))
            node.umount(target)
            node.stop()
            drop_caches()
            started = time.perf_counter()
            url = f"{registry.url}/v2/bench/lz4/blobs/{lz4_digest}"
            subprocess.run(f"curl -sf {url} | lz4 -d -q > /dev/null", shell=True, check=True)
            cold_curl.append(time.perf_counter() - started)
        results["cold_seconds"] = {"lazy": median(cold_lazy), "curl_lz4": median(cold_curl)}
        results["cold_runs"] = {"lazy": cold_lazy, "curl_lz4": cold_curl}
        results["cold_ratio"] = median(cold_curl) / median(cold_lazy)
        node.mount(ref, target)
        seq_read(target / "big.bin")  # warm the block cache
        with loop_mounted(raw, work / "plain", readonly=True) as plain:
            warm_seq = [seq_read(target / "big.bin") for _ in range(repeat)]
            plain_seq = [seq_read(plain / "big.bin") for _ in range(repeat)]
            warm_rand = [random_reads(target / "big.bin", 2000, r) for r in range(repeat)]
            plain_rand = [random_reads(plain / "big.bin", 2000, r) for r in range(repeat)]
        node.umount(target)
        results["warm_sequential_seconds"] = {
            "lazy": median(warm_seq),
            "plain_loop": median(plain_seq),
        }
        results["warm_sequential_ratio"] = median(plain_seq) / median(warm_seq)
        results["warm_random4k_seconds"] = {
            "lazy": median(warm_rand),
            "plain_loop": median(plain_rand),
        }
        results["warm_random4k_ratio"] = median(plain_rand) / median(warm_rand)
    finally:
        node.stop()
    return results


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_memory(work: Path, registry: RegistryServer, records: int) -> dict:
    """A layer with ``records`` one-sector data records (every other sector), on top of an
    empty ext4: the merged index then holds that many records."""
    base, _raw = build_layers(work / "mem-base", [lambda root: None], vsize_gib=64)
    data, index = work / "mem.data", work / "mem.index"
    layer = WritableLayer.create(str(data), str(index), 64 << 30)
    first = 48 << 30  # free space far above the filesystem's metadata
    sector = bytes(512)
    for i in range(records):
        layer.write(first + i * 1024, sector)
    layer.close()
    sealed = work / "mem.commit"
    commit_layer(str(data), str(index), str(sealed), algorithm="lz4", tar=True)
    ref = push_layers(registry.host, "bench/memory:v1", [*base, sealed])
    node = Node(work / "mem-node")
    target = work / "mem-target"
    try:
        node.run("daemon", *node.node_flags())
        pid = node.daemon_pid()
        assert pid
        before = _rss(pid)
        node.mount(ref, target)
        after = _rss(pid)
        node.umount(target)
    finally:
        node.stop()
    return {
        "records": records,
        "index_bytes": records * 16,
        "rss_before": before,
        "rss_after_mount": after,
        "rss_delta": after - before,
        "rss_delta_per_record": (after - before) / records,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    # 999,000 records: padded to 999,168, under the 1,000,000 a sealed layer may hold
    parser.add_argument("--records", type=int, default=999_000)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "mount"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_mount needs root (loop devices, FUSE, drop_caches)", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="obd-bench-") as tmp:
        work = Path(tmp)
        registry = RegistryServer(work / "registry").start()
        try:
            result = {
                "reads": bench_reads(work, registry, args.size_mib, args.repeat),
                "memory": bench_memory(work, registry, args.records),
            }
        finally:
            registry.stop()
    (out / "result.json").write_text(json.dumps(result, indent=2))
    r, m = result["reads"], result["memory"]
    rows = [
        (
            "cold sequential read (empty cache) vs curl + lz4 -d",
            r["cold_seconds"]["lazy"],
            r["cold_seconds"]["curl_lz4"],
            r["cold_ratio"],
        ),
        (
            "warm cache, sequential read vs plain loop",
            r["warm_sequential_seconds"]["lazy"],
            r["warm_sequential_seconds"]["plain_loop"],
            r["warm_sequential_ratio"],
        ),
        (
            "warm cache, 2000 random 4 KiB reads vs plain loop",
            r["warm_random4k_seconds"]["lazy"],
            r["warm_random4k_seconds"]["plain_loop"],
            r["warm_random4k_ratio"],
        ),
    ]
    table = "\n".join(
        f"| {name} | {ours:.2f} s | {base:.2f} s | {ratio:.2f} |"
        for name, ours, base, ratio in rows
    )
    report = (
        f"# Lazy mount benchmarks\n\n"
        f"File of {r['file_mib']} MiB (half random, half text), one ZFile lz4 layer of "
        f"{r['blob_bytes'] >> 20} MiB; loopback registry; medians of {args.repeat} runs; page "
        f"cache dropped before every measurement. Ratio = baseline time / our time "
        f"(1.0 = as fast, higher = faster).\n\n"
        f"| measurement | overlaybd-py | baseline | ratio |\n|---|---|---|---|\n{table}\n\n"
        f"Daemon memory with {m['records']:,} index records mounted: RSS grew by "
        f"{m['rss_delta'] / 2**20:.1f} MiB ({m['rss_delta_per_record']:.1f} bytes per record) "
        f"for an index of {m['index_bytes'] / 2**20:.1f} MiB on disk (16 bytes per record).\n"
    )
    (out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

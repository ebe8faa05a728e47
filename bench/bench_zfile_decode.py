"""ZFile decode throughput: native and pure ``zfile_decode`` vs the raw per-chunk loop.

Each data set is compressed once (4 KiB chunks, CRC on, as the overlaybd tools write
them), then decoded by:

* ``raw``: a Python loop calling ``lz4.block.decompress`` / ``ZstdDecompressor.decompress``
  on pre-sliced payloads, with no CRC check: the most a per-chunk Python loop can do;
* ``pure``: ``_pure.zfile_decode`` (CRC check + decompress, per chunk in Python);
* ``native``: ``_native.zfile_decode`` (the same in one C loop, without the GIL);
* ``native-2t``: the native decode split over two threads (chunks halves).

Throughput is uncompressed MB/s of the median round. The summary prints the ratios to
``raw`` (target: native >= 0.8) and saves them to ``.benchmarks/zfile_decode/``.

Run: ``.venv/bin/pytest bench/bench_zfile_decode.py -p no:cacheprovider``
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lz4.block
import pytest
import zstandard

from overlaybd_py import _accel
from tests.fixtures.testdata import sample_bytes

CHUNK = 4096
ALGORITHMS = {"lz4": 1, "zstd": 2}
VARIANTS = ["raw", "pure", "native", "native-2t"]
RESULTS: dict[str, dict[str, float]] = {}
OUT_DIR = Path(__file__).resolve().parents[1] / ".benchmarks" / "zfile_decode"


def mixed(size: int, seed: int = 3) -> bytes:
    """Unevenly compressible bytes: zero runs, random runs and repeated text."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind, run = rng.randrange(3), rng.randrange(1, 6000)
        if kind == 0:
            out += bytes(run)
        elif kind == 1:
            out += rng.randbytes(min(run, 1500))
        else:
            out += (b"overlaybd %d " % rng.randrange(1000)) * (run // 12 + 1)
    return bytes(out[:size])


DATASETS = {
    "mixed-16MiB": lambda: mixed(16 << 20),
    "l1.commit": lambda: sample_bytes("l1.commit"),  # a real ext4 layer, very compressible
    "random-8MiB": lambda: random.Random(1).randbytes(8 << 20),  # incompressible
}


class Encoded:
    """One data set compressed as a ZFile stores it, plus its pre-sliced payloads."""

    def __init__(self, data: bytes, algorithm: int) -> None:
        pure = _accel.backend_module("pure")
        self.size = len(data)
        self.algorithm = algorithm
        self.buf, self.lengths = pure.zfile_encode(data, algorithm, True, CHUNK)
        self.last = len(data) - (len(self.lengths) - 1) * CHUNK
        self.payloads, pos = [], 0
        for stored in self.lengths:
            self.payloads.append(self.buf[pos : pos + stored - 4])
            pos += stored
        self.data = data

    def halves(self):
        """Two (buf, lengths, last_length) pieces split at a chunk boundary."""
        cut = len(self.lengths) // 2
        at = sum(self.lengths[:cut])
        return [
            (self.buf[:at], self.lengths[:cut], CHUNK),
            (self.buf[at:], self.lengths[cut:], self.last),
        ]


_encoded: dict[tuple[str, str], Encoded] = {}


def encoded(dataset: str, algorithm: str) -> Encoded:
    key = (dataset, algorithm)
    if key not in _encoded:
        _encoded[key] = Encoded(DATASETS[dataset](), ALGORITHMS[algorithm])
    return _encoded[key]


def decoder(variant: str, enc: Encoded):
    """A callable decoding everything once, for the given variant."""
    if variant == "raw":
        payloads = enc.payloads
        if enc.algorithm == 1:

            def raw():
                decompress = lz4.block.decompress
                for payload in payloads:
                    decompress(payload, uncompressed_size=CHUNK)
        else:

            def raw():
                decompress = zstandard.ZstdDecompressor().decompress
                for payload in payloads:
                    decompress(payload, max_output_size=CHUNK)

        return raw, None
    name = "pure" if variant == "pure" else "native"
    try:
        module = _accel.backend_module(name)
    except ImportError:
        pytest.skip("native extension not built (needs gcc, liblz4-dev, libzstd-dev)")
    args = (enc.buf, enc.lengths, enc.algorithm, True, CHUNK, enc.last)
    if variant != "native-2t":
        return (lambda: module.zfile_decode(*args)), None
    pool = ThreadPoolExecutor(2)
    pieces = enc.halves()

    def two_threads():
        futures = [
            pool.submit(module.zfile_decode, buf, lengths, enc.algorithm, True, CHUNK, last)
            for buf, lengths, last in pieces
        ]
        return b"".join(f.result() for f in futures)

    return two_threads, pool


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("dataset", list(DATASETS))
def test_decode(benchmark, dataset, algorithm, variant):
    enc = encoded(dataset, algorithm)
    run, pool = decoder(variant, enc)
    try:
        if variant != "raw":
            assert run() == enc.data
        benchmark.group = f"{dataset} {algorithm}"
        benchmark.extra_info["MB"] = enc.size / 1e6
        benchmark.pedantic(run, rounds=7 if variant != "pure" else 3, warmup_rounds=1, iterations=1)
    finally:
        if pool:
            pool.shutdown()
    if benchmark.stats:
        mb_s = enc.size / 1e6 / benchmark.stats.stats.median
        RESULTS.setdefault(f"{dataset} {algorithm}", {})[variant] = mb_s


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """After the module: MB/s per variant and the ratios to the raw loop."""
    yield
    if not RESULTS:
        return
    lines = [
        "",
        "| data, codec | raw MB/s | pure MB/s | native MB/s | native-2t MB/s "
        "| pure/raw | native/raw | native-2t/raw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    report = {}
    for case, rates in RESULTS.items():
        raw = rates.get("raw")
        ratios = {f"{v}/raw": rates[v] / raw for v in VARIANTS[1:] if raw and v in rates}
        report[case] = {"MB_per_s": rates, "ratios": ratios}
        cells = [f"{rates[v]:.0f}" if v in rates else "-" for v in VARIANTS]
        ratio_cells = [
            f"{ratios[k]:.2f}" if k in ratios else "-"
            for k in ("pure/raw", "native/raw", "native-2t/raw")
        ]
        lines.append(f"| {case} | " + " | ".join(cells + ratio_cells) + " |")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "summary.json").write_text(json.dumps(report, indent=2))
    plugins = request.config.pluginmanager
    writer = plugins.get_plugin("terminalreporter")
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        for line in lines:  # teardown output would otherwise be captured
            writer.write_line(line)

"""Merged index: build (``merge``) and 4 KiB lookups, pure vs native backend, same run.

Four random layer tables of 280,000 records each (sorted, gaps, 5% zeroed, overlapping
one another over a 32 GiB device) are merged into one table of about a million records;
then random 4 KiB reads at unaligned byte offsets are looked up in it, one call per read
as ``MergedIndex.lookup`` makes them. The summary prints the merge time, the lookups per
second and the native/pure speed-ups, and saves them to ``.benchmarks/merged_index/``.

Run: ``.venv/bin/pytest bench/bench_merged_index.py -p no:cacheprovider``
"""

from __future__ import annotations

import json
import random
from array import array
from pathlib import Path

import pytest

from overlaybd_py import _accel

LAYERS = 4
RECORDS_PER_LAYER = 280_000
SPACE = 1 << 26  # sectors: a 32 GiB device
READ = 4096
QUERIES = {"pure": 20_000, "native": 200_000}  # lookups per timed round
ROUNDS = {"pure": 1, "native": 10}  # merge rounds (the pure merge takes seconds)
RESULTS: dict[str, dict[str, float]] = {}
OUT_DIR = Path(__file__).resolve().parents[1] / ".benchmarks" / "merged_index"


def backend(name: str):
    try:
        return _accel.backend_module(name)
    except ImportError:
        pytest.skip("native extension not built (needs gcc, liblz4-dev, libzstd-dev)")


def random_layer(rng: random.Random, count: int) -> tuple[array, ...]:
    offsets, lengths, moffsets = array("Q"), array("I"), array("Q")
    zeroed, tags = array("B"), array("B")
    moffset = 8
    for start in sorted(rng.sample(range(0, SPACE, 16), count)):
        length = rng.randrange(1, 16)
        zero = rng.random() < 0.05
        offsets.append(start)
        lengths.append(length)
        moffsets.append(moffset)
        zeroed.append(zero)
        tags.append(0)
        moffset += 0 if zero else length
    return offsets, lengths, moffsets, zeroed, tags


@pytest.fixture(scope="module")
def layers():
    rng = random.Random(20240611)
    return [random_layer(rng, RECORDS_PER_LAYER) for _ in range(LAYERS)]


@pytest.fixture(scope="module")
def merged(layers):
    try:
        module = _accel.backend_module("native")
    except ImportError:
        module = _accel.backend_module("pure")
    return module.merge(layers)


@pytest.fixture(scope="module")
def queries():
    rng = random.Random(7)
    return [rng.randrange(0, SPACE * 512 - READ) for _ in range(max(QUERIES.values()))]


@pytest.mark.parametrize("name", ["pure", "native"])
def test_merge(benchmark, layers, name):
    module = backend(name)
    benchmark.group = "merge 4 x 280k records"
    result = benchmark.pedantic(module.merge, args=(layers,), rounds=ROUNDS[name], iterations=1)
    RESULTS.setdefault("merge_records", {})[name] = len(result[0])
    if benchmark.stats:
        RESULTS.setdefault("merge_s", {})[name] = benchmark.stats.stats.median


@pytest.mark.parametrize("name", ["pure", "native"])
def test_lookup(benchmark, merged, queries, name):
    module = backend(name)
    offsets, lengths, moffsets, _, tags = merged
    batch = queries[: QUERIES[name]]

    def run():
        lookup = module.lookup
        for at in batch:
            lookup(offsets, lengths, moffsets, tags, at, READ)

    benchmark.group = f"lookup 4 KiB in {len(offsets)} records"
    benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
    RESULTS.setdefault("table_records", {})[name] = len(offsets)
    if benchmark.stats:
        RESULTS.setdefault("lookups_per_s", {})[name] = len(batch) / benchmark.stats.stats.median


def test_same_results(layers, merged, queries):
    """Not a benchmark: both backends agree on the data measured here."""
    native = backend("native")
    pure = backend("pure")
    offsets, lengths, moffsets, _, tags = merged
    for at in queries[:2000]:
        args = (offsets, lengths, moffsets, tags, at, READ)
        assert native.lookup(*args) == pure.lookup(*args)
    small = [tuple(column[:5000] for column in layer) for layer in layers]
    assert [c.tolist() for c in native.merge(small)] == [c.tolist() for c in pure.merge(small)]


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """After the module: merge time, lookups/s and the native/pure ratios."""
    yield
    merge = RESULTS.get("merge_s", {})
    rate = RESULTS.get("lookups_per_s", {})
    if not merge and not rate:
        return
    report = dict(RESULTS)
    lines = ["", "| measure | pure | native | native vs pure | target |", "|---|---|---|---|---|"]
    if merge:
        speedup = merge["pure"] / merge["native"] if len(merge) == 2 else None
        report["merge_speedup"] = speedup
        lines.append(
            f"| merge {LAYERS} x {RECORDS_PER_LAYER} records (s) | {merge.get('pure', 0):.3f} | "
            f"{merge.get('native', 0):.3f} | {speedup or 0:.1f}x faster | native < 1 s |"
        )
    if rate:
        speedup = rate["native"] / rate["pure"] if len(rate) == 2 else None
        report["lookup_speedup"] = speedup
        records = RESULTS.get("table_records", {}).get("native", 0)
        lines.append(
            f"| 4 KiB lookups/s in {records} records | {rate.get('pure', 0):,.0f} | "
            f"{rate.get('native', 0):,.0f} | {speedup or 0:.1f}x faster | native >= 1,000,000 |"
        )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "summary.json").write_text(json.dumps(report, indent=2))
    plugins = request.config.pluginmanager
    writer = plugins.get_plugin("terminalreporter")
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        for line in lines:  # teardown output would otherwise be captured
            writer.write_line(line)

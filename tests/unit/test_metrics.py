"""Prometheus exposition of statistics snapshots, read back with prometheus_client's own
parser (the independent reader), and the incremental latency histogram."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from overlaybd_py.engine.block_cache import BlockCacheStatistics
from overlaybd_py.metrics import (
    FETCH_BUCKETS,
    LatencyHistogram,
    MountStatistics,
    NodeStatistics,
    render,
)


def _mount(image: str, target: str, histogram: LatencyHistogram, **counters) -> MountStatistics:
    values = dict(bytes_read=0, reads=0, bytes_written=0, errors=0, bytes_fetched=0,
                  requests=histogram.count, cache_hits=0, cache_misses=0)
    values.update(counters)
    return MountStatistics(id="0123456789ab", image=image, target=target, owner="cli",
                           serving=True, fetch_buckets=histogram.cumulative(),
                           fetch_seconds=histogram.sum, **values)


def _cache(**counters) -> BlockCacheStatistics:
    values = dict(hits=0, misses=0, bytes_fetched=0, bytes_served=0, requests=0, evictions=0,
                  evicted_bytes=0, corrupt_blocks=0, size=0, capacity=0)
    values.update(counters)
    return BlockCacheStatistics(**values)


def test_histogram_buckets_are_cumulative_and_read_only_new_values():
    histogram = LatencyHistogram()
    first, second = [0.0005, 0.001, 0.003], [20.0]
    histogram.update([first, second])
    first.extend([0.001, 0.2])
    histogram.update([first, second])
    histogram.update([first, second, [0.05]])  # a source added later
    buckets = dict(zip([*FETCH_BUCKETS, math.inf], histogram.cumulative(), strict=True))
    assert buckets[0.001] == 3  # 0.0005 and twice 0.001: the bound is inclusive ("le")
    assert buckets[0.005] == 4 and buckets[0.05] == 5 and buckets[0.25] == 6
    assert buckets[10.0] == 6 and buckets[math.inf] == 7 == histogram.count
    assert histogram.sum == pytest.approx(0.0005 + 0.001 + 0.003 + 20 + 0.001 + 0.2 + 0.05)


def test_render_parses_back_with_every_series():
    histogram = LatencyHistogram()
    histogram.update([[0.002, 0.004, 0.3]])
    odd_target = '/mnt/with "quotes" and \\ back\nslash'
    stats = NodeStatistics(
        started=1700000000.5,
        mounts=(
            _mount("127.0.0.1:5000/a:v1", "/mnt/a", histogram, bytes_read=4096, reads=1,
                   bytes_fetched=8192, cache_hits=5, cache_misses=2, errors=1),
            _mount("127.0.0.1:5000/b:v1", odd_target, LatencyHistogram()),
        ),
        cache=_cache(size=1 << 20, capacity=4 << 20, evictions=3, evicted_bytes=3 << 20,
                     hits=7, misses=9, bytes_fetched=12345, corrupt_blocks=1),
        recoveries=2, recovery_failures=1,
    )
    families = {f.name: f for f in text_string_to_metric_families(render(stats).decode())}

    def value(name: str, **labels: str) -> float:
        family = name.removesuffix("_total").removesuffix("_bucket").removesuffix("_count") \
            .removesuffix("_sum")
        (sample,) = [s for s in families[family].samples if s.name == name
                     and all(s.labels.get(k) == v for k, v in labels.items())]
        return sample.value

    a = {"image": "127.0.0.1:5000/a:v1", "target": "/mnt/a"}
    assert value("overlaybd_py_image_read_bytes_total", **a) == 4096
    assert value("overlaybd_py_image_reads_total", **a) == 1
    assert value("overlaybd_py_image_fetched_bytes_total", **a) == 8192
    assert value("overlaybd_py_image_fetch_requests_total", **a) == 3
    assert value("overlaybd_py_image_cache_hits_total", **a) == 5
    assert value("overlaybd_py_image_cache_misses_total", **a) == 2
    assert value("overlaybd_py_image_errors_total", **a) == 1
    assert value("overlaybd_py_image_serving", id="0123456789ab", owner="cli", **a) == 1
    assert value("overlaybd_py_image_fetch_duration_seconds_bucket", le="0.005", **a) == 2
    assert value("overlaybd_py_image_fetch_duration_seconds_bucket", le="+Inf", **a) == 3
    assert value("overlaybd_py_image_fetch_duration_seconds_count", **a) == 3
    assert value("overlaybd_py_image_fetch_duration_seconds_sum", **a) == pytest.approx(0.306)
    # Label values are escaped and read back intact.
    assert value("overlaybd_py_image_read_bytes_total", target=odd_target) == 0
    assert value("overlaybd_py_cache_size_bytes") == 1 << 20
    assert value("overlaybd_py_cache_capacity_bytes") == 4 << 20
    assert value("overlaybd_py_cache_evictions_total") == 3
    assert value("overlaybd_py_cache_evicted_bytes_total") == 3 << 20
    assert value("overlaybd_py_cache_hits_total") == 7
    assert value("overlaybd_py_cache_misses_total") == 9
    assert value("overlaybd_py_cache_fetched_bytes_total") == 12345
    assert value("overlaybd_py_cache_corrupt_blocks_total") == 1
    assert value("overlaybd_py_mounts") == 2
    assert value("overlaybd_py_recoveries_total") == 2
    assert value("overlaybd_py_recovery_failures_total") == 1
    assert value("overlaybd_py_daemon_start_time_seconds") == 1700000000.5
    assert families["overlaybd_py_build_info"].samples[0].labels["version"]
    assert families["overlaybd_py_image_fetch_duration_seconds"].type == "histogram"
    assert families["overlaybd_py_image_read_bytes"].type == "counter"


def test_render_without_a_cache_or_mounts():
    stats = NodeStatistics(started=0.0, mounts=(), cache=None, recoveries=0,
                           recovery_failures=0)
    families = {f.name: f for f in text_string_to_metric_families(render(stats).decode())}
    assert families["overlaybd_py_mounts"].samples[0].value == 0
    assert "overlaybd_py_cache_size_bytes" not in families
    assert families["overlaybd_py_image_read_bytes"].samples == []

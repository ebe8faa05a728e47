"""``trace show``'s numbers on a hand-made trace whose answers are worked out by hand, and
``trace plot``'s pictures."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from overlaybd_py.coldstart.traces import load_trace, summarize, union_length
from overlaybd_py.errors import UsageError
from overlaybd_py.formats import trace as t
from tests.fixtures.system import need

L0 = t.LayerInfo(0, "sha256:" + "0" * 64, 10_000, 1 << 20, "zfile", 4096)
L1 = t.LayerInfo(1, "sha256:" + "1" * 64, 5_000, 1 << 20, "zfile", 4096)


def _write(tmp_path: Path) -> Path:
    """Three reads and three fetches on a timeline (seconds):

    read 1  [0.10, 0.30)  device 0+8192      -> layer 0 at 0+8192, issued fetch 1
    read 2  [0.40, 0.45)  device 4096+4096   -> layer 0 at 4096+4096, a hit (overlaps read 1)
    read 3  [0.50, 0.90)  device 65536+4096  -> layer 1 at 0+4096, waited for prefetch fetch 3
    fetch 1 [0.12, 0.28)  layer 0, 3000 bytes, by read 1
    fetch 2 [0.60, 0.70)  layer 1, 1000 bytes, prefetch
    fetch 3 [0.50, 0.85)  layer 1, 2000 bytes, prefetch
    """
    path = tmp_path / "hand.trace"
    records = [t.TraceRecord("R", 0, 8192, 0), t.TraceRecord("R", 0, 4096, 4096),
               t.TraceRecord("R", 1, 4096, 0)]
    path.write_bytes(t.encode_trace(records))
    events = [
        t.TraceLogHeader(1 << 30, (L0, L1), 1.7e9, "test"),
        t.ReadEvent(1, 0.10, 0.20, 0, 8192, (t.ReadPiece(0, 0, 8192, 0, 1),), 1, 3000),
        t.FetchEvent(1, 0.12, 0.16, 0, 0, 3000, "read", 1),
        t.ReadEvent(2, 0.40, 0.05, 4096, 4096, (t.ReadPiece(0, 4096, 4096, 1, 1),)),
        t.ReadEvent(3, 0.50, 0.40, 65536, 4096, (t.ReadPiece(1, 0, 4096, 0, 0),)),
        t.FetchEvent(3, 0.50, 0.35, 1, 0, 2000, "prefetch"),
        t.FetchEvent(2, 0.60, 0.10, 1, 2000, 1000, "prefetch"),
        t.EndEvent(1.0),
    ]
    Path(str(path) + ".jsonl").write_text("".join(t.encode_event(e) + "\n" for e in events))
    return path


def test_summary_numbers_worked_out_by_hand(tmp_path):
    s = summarize(load_trace(str(_write(tmp_path))))
    assert (s.records, s.record_bytes) == (3, 16384)
    assert s.unique_layer_bytes == 8192 + 4096  # layer 0: [0, 8192); layer 1: [0, 4096)
    assert (s.reads, s.bytes_read) == (3, 16384)
    assert s.bytes_covered == 8192 + 4096  # device [0, 8192) and [65536, 69632)
    assert (s.requests, s.bytes_fetched) == (3, 6000)
    assert (s.prefetch_requests, s.prefetch_bytes) == (2, 3000)
    assert s.amplification == round(6000 / 12288, 4)
    assert s.hit_ratio == round(2 / 3, 4)
    assert s.time_to_first_byte_s == pytest.approx(0.30)
    assert s.read_wait_s == pytest.approx(0.20 + 0.05 + 0.40)
    # reads ∩ fetches: [0.12, 0.28) + [0.50, 0.85) (fetch 2 lies inside fetch 3)
    assert s.critical_path_fetch_s == pytest.approx(0.16 + 0.35)
    assert s.duration_s == 1.0
    assert [(x.index, x.records, x.unique_bytes, x.fetches, x.bytes_fetched)
            for x in s.layers] == [(0, 2, 8192, 1, 3000), (1, 1, 4096, 2, 3000)]


def test_trace_alone_and_log_alone(tmp_path):
    path = _write(tmp_path)
    Path(str(path) + ".jsonl").rename(tmp_path / "elsewhere.jsonl")
    alone = summarize(load_trace(str(path)))
    assert alone.records == 3 and alone.reads is None
    log_only = summarize(load_trace(str(tmp_path / "elsewhere.jsonl")))
    assert log_only.records == 3 and log_only.reads == 3  # records rebuilt from the pieces
    with pytest.raises(UsageError):
        load_trace(str(tmp_path / "missing"))
    (tmp_path / "list").write_text("/usr/bin/python3\n")
    with pytest.raises(UsageError):
        load_trace(str(tmp_path / "list"))


def test_union_length():
    assert union_length([(0, 2), (1, 3), (5, 6), (6, 7), (10, 10)]) == 5
    assert union_length([]) == 0


def test_cli_show_and_plot(tmp_path):
    need(importlib.util.find_spec("matplotlib") is not None,
         "trace plot needs matplotlib (a test dependency: pip install -e '.[test]')")
    path = _write(tmp_path)
    shown = subprocess.run([sys.executable, "-m", "overlaybd_py", "trace", "show", str(path)],
                           capture_output=True, text=True, check=True)
    assert "critical-path fetch: 0.510 s" in shown.stdout
    out = tmp_path / "plots"
    plotted = subprocess.run([sys.executable, "-m", "overlaybd_py", "trace", "plot", str(path),
                              "--output", str(out), "--format", "svg", "--json"],
                             capture_output=True, text=True, check=True)
    files = json.loads(plotted.stdout)["files"]
    assert sorted(Path(f).name for f in files) == ["cumulative.svg", "heatmap.svg",
                                                   "timeline.svg"]
    assert all(Path(f).read_text().lstrip().startswith("<?xml") for f in files)
    bad = subprocess.run([sys.executable, "-m", "overlaybd_py", "trace", "show",
                          str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and "no trace" in bad.stderr


def test_ranges_of_one_multi_range_request_count_as_one_request(tmp_path):
    path = tmp_path / "multi.trace"
    path.write_bytes(t.encode_trace([t.TraceRecord("R", 0, 4096, 0)]))
    events = [
        t.TraceLogHeader(1 << 30, (L0,), 1.7e9, "test"),
        t.FetchEvent(1, 0.1, 0.2, 0, 0, 100, "prefetch", request=1),
        t.FetchEvent(2, 0.1, 0.2, 0, 500, 100, "prefetch", request=1),
        t.FetchEvent(3, 0.1, 0.2, 0, 900, 100, "prefetch", request=1),
        t.FetchEvent(4, 0.2, 0.1, 0, 2000, 100, "prefetch"),
        t.FetchEvent(5, 0.3, 0.1, 0, 3000, 100, "read", request=5),
        t.FetchEvent(6, 0.3, 0.1, 0, 4000, 100, "read", request=5),
        t.EndEvent(1.0),
    ]
    Path(str(path) + ".jsonl").write_text("".join(t.encode_event(e) + "\n" for e in events))
    loaded = load_trace(str(path))
    assert [f.request for f in loaded.log.fetches] == [1, 1, 1, None, 5, 5]
    s = summarize(loaded)
    assert (s.requests, s.bytes_fetched) == (3, 600)
    assert (s.prefetch_requests, s.prefetch_bytes) == (2, 400)

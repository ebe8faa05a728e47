"""Reading and summarising recorded traces: what ``trace show`` prints and the benchmark
reports. Works on the original's trace file alone (per-layer records, no times) and, when
the JSONL log is beside it, on the timed events.

Definitions (the report uses the same words):

* *bytes read*: what the device served (FUSE reads); *bytes covered*: the union of the
  device ranges read, i.e. each byte counted once: the workload's own footprint.
* *bytes fetched*: blob bytes the registry sent (range requests), of any origin.
* *amplification*: bytes fetched / bytes covered (block-level; compression makes it < 1).
* *hit ratio*: reads that issued no request / reads.
* *time to first byte*: end of the first device read, from the start of recording.
* *read wait*: time during which at least one read was in progress; *critical-path fetch
  time*: time during which a read was in progress *and* a request was in flight (the start
  was waiting, and the network was busy).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import UsageError
from ..formats import trace as tracefmt
from ..formats.trace import TraceFile, TraceLog

__all__ = ["LoadedTrace", "TraceSummary", "load_trace", "summarize", "union_length"]


@dataclass
class LoadedTrace:
    path: str
    trace: TraceFile | None
    log: TraceLog | None


@dataclass(frozen=True)
class LayerSummary:
    index: int
    records: int
    record_bytes: int
    unique_bytes: int  # union of the layer ranges read
    fetches: int
    bytes_fetched: int


@dataclass(frozen=True)
class TraceSummary:
    records: int
    record_bytes: int
    unique_layer_bytes: int
    layers: list[LayerSummary] = field(default_factory=list)
    # from the JSONL log (None without one)
    reads: int | None = None
    bytes_read: int | None = None
    bytes_covered: int | None = None
    requests: int | None = None
    bytes_fetched: int | None = None
    prefetch_requests: int | None = None
    prefetch_bytes: int | None = None
    amplification: float | None = None
    hit_ratio: float | None = None
    time_to_first_byte_s: float | None = None
    read_wait_s: float | None = None
    critical_path_fetch_s: float | None = None
    duration_s: float | None = None
    failed_reads: int | None = None

    def to_json(self) -> dict:
        out = dict(self.__dict__)
        out["layers"] = [dict(layer.__dict__) for layer in self.layers]
        return out


def load_trace(path: str) -> LoadedTrace:
    """Load ``path``: a trace file (its ``.jsonl`` beside it is loaded too) or a ``.jsonl``
    log (its trace file beside it too). Raises UsageError when neither can be read."""
    if path.endswith(".jsonl"):
        trace_path, log_path = path[: -len(".jsonl")], path
    else:
        trace_path, log_path = path, path + ".jsonl"
    if not os.path.exists(trace_path) and not os.path.exists(log_path):
        raise UsageError(f"no trace at {path}")
    trace = log = None
    if os.path.exists(trace_path):
        with open(trace_path, "rb") as f:
            data = f.read()
        if tracefmt.is_trace(data):
            trace = tracefmt.decode_trace(data)
        elif trace_path == path:
            raise UsageError(f"{path} is not a trace file (no 0xC2EF1820 magic; a priority "
                             "list holds paths, not reads)")
    if os.path.exists(log_path):
        with open(log_path, encoding="utf-8") as f:
            log = tracefmt.decode_events(f.read())
    return LoadedTrace(path, trace, log)


def union_length(ranges: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of half-open ranges (start, end)."""
    return float(sum(b - a for a, b in _merge(ranges)))


def _merge(ranges: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(ranges):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _intersection_length(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Length of (union of xs) ∩ (union of ys); both already merged and sorted."""
    total, i, j = 0.0, 0, 0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if hi > lo:
            total += hi - lo
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def _requests(fetches: list[tracefmt.FetchEvent]) -> int:
    """HTTP requests behind fetch events (the ranges of one multi-range request share it)."""
    return len({f.id if f.request is None else -f.request for f in fetches})


def summarize(loaded: LoadedTrace) -> TraceSummary:
    records = list(loaded.trace.records) if loaded.trace else []
    if not records and loaded.log is not None:  # the log alone: rebuild the records
        records = [tracefmt.TraceRecord("R", p.layer, p.length, p.offset)
                   for r in loaded.log.reads for p in r.pieces]
    reads_only = [r for r in records if r.op == "R"]
    by_layer: dict[int, list[tracefmt.TraceRecord]] = {}
    for r in reads_only:
        by_layer.setdefault(r.layer_index, []).append(r)
    fetch_by_layer: dict[int, list[tracefmt.FetchEvent]] = {}
    if loaded.log is not None:
        for f in loaded.log.fetches:
            if f.ok:
                fetch_by_layer.setdefault(f.layer, []).append(f)
    layers = []
    for index in sorted(set(by_layer) | set(fetch_by_layer)):
        recs = by_layer.get(index, [])
        fetches = fetch_by_layer.get(index, [])
        layers.append(LayerSummary(
            index, len(recs), sum(r.count for r in recs),
            int(union_length((r.offset, r.offset + r.count) for r in recs)),
            len(fetches), sum(f.length for f in fetches)))
    base = dict(records=len(reads_only), record_bytes=sum(r.count for r in reads_only),
                unique_layer_bytes=sum(layer.unique_bytes for layer in layers), layers=layers)
    log = loaded.log
    if log is None:
        return TraceSummary(**base)
    reads = [r for r in log.reads if r.ok]
    fetches = [f for f in log.fetches if f.ok]
    covered = int(union_length((r.offset, r.offset + r.length) for r in reads))
    fetched = sum(f.length for f in fetches)
    prefetch = [f for f in fetches if f.origin == "prefetch"]
    read_spans = _merge((r.t, r.t + r.dt) for r in reads)
    fetch_spans = _merge((f.t, f.t + f.dt) for f in fetches)
    first = min((r.t + r.dt for r in reads), default=None)
    ends = [r.t + r.dt for r in reads] + [f.t + f.dt for f in fetches]
    duration = log.end.t if log.end is not None else max(ends, default=0.0)
    return TraceSummary(
        **base,
        reads=len(reads), bytes_read=sum(r.length for r in reads), bytes_covered=covered,
        requests=_requests(fetches), bytes_fetched=fetched,
        prefetch_requests=_requests(prefetch), prefetch_bytes=sum(f.length for f in prefetch),
        amplification=round(fetched / covered, 4) if covered else None,
        hit_ratio=round(sum(1 for r in reads if not r.fetches) / len(reads), 4) if reads
        else None,
        time_to_first_byte_s=round(first, 6) if first is not None else None,
        read_wait_s=round(sum(b - a for a, b in read_spans), 6),
        critical_path_fetch_s=round(_intersection_length(read_spans, fetch_spans), 6),
        duration_s=round(duration, 6),
        failed_reads=sum(1 for r in log.reads if not r.ok),
    )

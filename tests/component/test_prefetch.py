"""Trace recording and prefetch at the engine level: real layers (committed ZFiles in tars),
the real block cache, and an in-memory 'registry' that logs every range request with its
start and end time. No FUSE, no mounts.

The truths are independent of the recorder: the remote's own request log (what was fetched
and when), the workload's own log of when each of its reads was waiting, and the merged
index (which layer ranges a device read must touch).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from overlaybd_py.coldstart.traces import load_trace, summarize
from overlaybd_py.engine.block_cache import READING_AHEAD, BlockCache
from overlaybd_py.engine.image import LayerBlob, OpenImage, open_image
from overlaybd_py.engine.layer_files import commit_layer
from overlaybd_py.engine.prefetch import Prefetcher, records_from_trace, run_prefetch
from overlaybd_py.engine.source import MemorySource
from overlaybd_py.engine.trace_recorder import PREFETCHING, attach_recorder
from overlaybd_py.engine.writable import WritableLayer
from overlaybd_py.errors import UsageError
from overlaybd_py.formats import trace as tracefmt
from overlaybd_py.registry.byteranges import Part

VSIZE = 64 << 20
LATENCY = 0.010  # per range request, virtual seconds (MockClock)


class Remote(MemorySource):
    """A blob 'in the registry': logs (start, end, offset, length) of every request, and
    in ``ahead`` those the block cache's background read-ahead made."""

    def __init__(self, data: bytes, log: list, name: str, ahead: list | None = None) -> None:
        super().__init__(data)
        self.log = log
        self.ahead = ahead if ahead is not None else []
        self.name = name

    async def read_at(self, offset: int, length: int) -> bytes:
        start = trio.current_time()
        await trio.sleep(LATENCY)
        data = await super().read_at(offset, length)
        entry = (start, trio.current_time(), self.name, offset, length)
        self.log.append(entry)
        if READING_AHEAD.get():
            self.ahead.append(entry)
        return data


def _layer(workdir: Path, name: str, writes: list[tuple[int, bytes]]) -> bytes:
    data, index = workdir / f"{name}.data", workdir / f"{name}.index"
    layer = WritableLayer.create(str(data), str(index), VSIZE)
    for offset, payload in writes:
        layer.write(offset, payload)
    layer.close()
    out = workdir / f"{name}.commit"
    commit_layer(str(data), str(index), str(out), algorithm="lz4", tar=True, message=name)
    return out.read_bytes()


class MultiRemote(Remote):
    """A registry that answers several ranges in one request (parts handed to ``on_part``
    as they 'arrive'); logs each range like a request of its own in ``log`` (for
    critical_fetches) and every request, with whether a prefetch made it, in ``calls``."""

    def __init__(self, data: bytes, log: list, name: str, ahead: list | None = None,
                 calls: list | None = None) -> None:
        super().__init__(data, log, name, ahead)
        self.calls = calls if calls is not None else []

    async def read_at(self, offset: int, length: int) -> bytes:
        self.calls.append((self.name, PREFETCHING.get(), 1))
        return await super().read_at(offset, length)

    async def read_ranges(self, ranges, on_part=None):
        self.calls.append((self.name, PREFETCHING.get(), len(ranges)))
        start = trio.current_time()
        await trio.sleep(LATENCY)
        body = b"".join([await MemorySource.read_at(self, o, n) for o, n in ranges])
        view, at, out = memoryview(body), 0, []
        for offset, length in ranges:
            if on_part is not None:
                on_part(view, Part(offset, length, at))
            out.append(view[at : at + length])
            self.log.append((start, trio.current_time(), self.name, offset, length))
            at += length
        return out


@pytest.fixture(scope="module")
def blobs(tmp_path_factory) -> list[bytes]:
    """Two layers: the bottom one holds 8 MiB of half-compressible data at 0, the top one
    overwrites some of it and adds 4 MiB further on."""
    work = tmp_path_factory.mktemp("layers")
    rnd = random.Random(7)

    def payload(n: int) -> bytes:  # compresses about 2:1, like binaries
        return b"".join(rnd.randbytes(2048) + bytes(2048) for _ in range(n // 4096))

    bottom = _layer(work, "l0", [(0, payload(8 << 20))])
    top = _layer(work, "l1", [(1 << 20, payload(256 << 10)), (16 << 20, payload(4 << 20))])
    return [bottom, top]


class Image:
    """An open image over fresh Remotes and a block cache in ``cache_dir``."""

    def __init__(self, blobs: list[bytes], cache_dir: Path, multi: bool = False) -> None:
        self.blobs = blobs
        self.multi = multi
        self.calls: list[tuple[str, bool, int]] = []  # MultiRemote's requests
        self.cache_dir = cache_dir
        self.log: list[tuple[float, float, str, int, int]] = []
        self.ahead: list[tuple[float, float, str, int, int]] = []  # background read-ahead
        self.cache: BlockCache | None = None
        self.image: OpenImage | None = None

    async def __aenter__(self) -> OpenImage:
        self.cache = BlockCache.open(self.cache_dir, 0)
        descs = [LayerBlob("sha256:" + hashlib.sha256(b).hexdigest(), len(b)) for b in self.blobs]
        by_digest = {d.digest: (i, b) for i, (d, b) in enumerate(zip(descs, self.blobs,
                                                                       strict=True))}

        async def open_blob(digest: str, size: int) -> Remote:
            i, data = by_digest[digest]
            if self.multi:
                return MultiRemote(data, self.log, f"l{i}", self.ahead, self.calls)
            return Remote(data, self.log, f"l{i}", self.ahead)

        self.image = await open_image(descs, open_blob, cache=self.cache)
        self.log.clear()  # opening (headers, indexes) is not the workload
        self.calls.clear()
        return self.image

    async def __aexit__(self, *exc: object) -> None:
        assert self.image is not None and self.cache is not None
        await self.image.aclose()
        self.cache.close()


def workload(seed: int = 3) -> list[tuple[int, int]]:
    """A start-like read pattern: runs of sequential 128 KiB reads in a few places, plus
    scattered 4 KiB reads, in a fixed order."""
    rnd = random.Random(seed)
    reads = []
    for base in (0, 3 << 20, 16 << 20, 18 << 20, 6 << 20):
        reads.extend((base + i * (128 << 10), 128 << 10) for i in range(rnd.randrange(3, 8)))
    reads.extend((rnd.randrange(0, 20 << 20) // 4096 * 4096, 4096) for _ in range(30))
    return reads


async def run_workload(device, reads, waits: list | None = None, image: OpenImage | None = None,
                       think: float = 0.002) -> list[bytes]:
    """Read one at a time with a little think time (a process between page faults). With
    ``waits``, log (start, end, blob ranges needed) of each read."""
    out = []
    for offset, length in reads:
        start = trio.current_time()
        out.append(await device.read_at(offset, length))
        if waits is not None:
            assert image is not None
            waits.append((start, trio.current_time(), blob_ranges(image, offset, length)))
        await trio.sleep(think)
    return out


def blob_ranges(image: OpenImage, offset: int, length: int) -> list[tuple[str, int, int]]:
    """(layer name, start, end) of the blob bytes a device read needs: merged index, then
    the ZFile jump table (compressed ranges), then the tar offset."""
    out = []
    for layer_no, layer_offset, n in image.device.merged.lookup(offset, length):
        if layer_no < 0:
            continue
        layer = image.layers[layer_no]
        start, size = layer.zfile.index.compressed_range(layer_offset, n)
        start += layer.tar_offset or 0
        out.append((f"l{layer_no}", start, start + size))
    return out


def critical_fetches(image: OpenImage, fetches, waits) -> int:
    """Fetches that were in flight while a read was waiting for their bytes."""
    count = 0
    for fs, fe, name, offset, length in fetches:
        for ws, we, ranges in waits:
            if fs < we and ws < fe and any(
                    n == name and a < offset + length and offset < b for n, a, b in ranges):
                count += 1
                break
    return count


def _expected_records(image: OpenImage, reads) -> list[tuple[int, int, int]]:
    """The per-layer reads the device must issue: merged-index pieces, joined where
    contiguous in one layer (as the device joins them), from the index alone."""
    out = []
    for offset, length in reads:
        run = None
        for layer, layer_offset, n in image.device.merged.lookup(offset, length):
            if layer < 0:
                run = None  # a hole breaks device contiguity
                continue
            if run and run[0] == layer and run[1] + run[2] == layer_offset:
                run[2] += n
            else:
                if run:
                    out.append(tuple(run))
                run = [layer, layer_offset, n]
        if run:
            out.append(tuple(run))
    return out


def test_record_then_replay_round_trip(tmp_path, blobs):
    reads = workload()
    trace_path = tmp_path / "start.trace"

    async def main():
        async with Image(blobs, tmp_path / "cache0") as image:
            want = [await image.device.read_at(o, n) for o, n in reads]
        # 1. Cold start, recorded.
        holder = Image(blobs, tmp_path / "cache1")
        async with holder as image:
            recorder = attach_recorder(image, None, trace_path)
            assert os.path.exists(str(trace_path) + ".lock")
            got = await run_workload(recorder.device, reads)
            assert got == want
            stats = await recorder.close()
            cold_fetches = list(holder.log)
        assert not os.path.exists(str(trace_path) + ".lock")
        assert os.path.exists(str(trace_path) + ".ok")
        assert stats.reads == len(reads)

        trace = tracefmt.decode_trace(trace_path.read_bytes())
        records = [(r.layer_index, r.offset, r.count) for r in trace.records]
        assert all(r.op == "R" for r in trace.records)
        assert sorted(records) == sorted(_expected_records(image, reads))

        log = tracefmt.decode_events((tmp_path / "start.trace.jsonl").read_text())
        assert [(e.offset, e.length) for e in sorted(log.reads, key=lambda e: e.id)] == reads
        assert [e.index for e in log.header.layers] == [0, 1]
        # Every fetch the remote served is in the log, charged to the read that issued it
        # or marked as the block cache's background read-ahead.
        assert sorted((f"l{f.layer}", f.offset, f.length) for f in log.fetches) == sorted(
            (name, off, n) for _s, _e, name, off, n in cold_fetches)
        read_ids = {e.id for e in log.reads}
        charged = [f for f in log.fetches if f.origin == "read"]
        assert all(f.read in read_ids for f in charged)
        assert all(f.origin == "readahead" and f.read is None
                   for f in log.fetches if f.origin != "read")
        assert sum(e.fetched for e in log.reads) == sum(f.length for f in charged)
        assert {e.cache for e in log.reads} == {"hit", "fetch"}

        # 2. A new node (empty cache): replay the trace, then run the same start.
        holder = Image(blobs, tmp_path / "cache2")
        async with holder as image:
            prefetch = await run_prefetch(image, trace, concurrency=4)
            assert prefetch.failed == 0 and prefetch.requests == prefetch.planned_requests
            prefetched = len(holder.log)
            assert prefetched < len(trace.records) / 2  # coalesced: few, larger requests
            got = await run_workload(image.device, reads)
            assert got == want
            # The start fetched nothing itself (the cache may read further ahead of it).
            assert [f for f in holder.log[prefetched:] if f not in holder.ahead] == []
            fetched = sum(n for *_, n in holder.log)
            cold = sum(n for *_, n in cold_fetches)
            # Coalescing fills gaps, read-ahead in the cold run fetches extra: same ballpark.
            assert fetched <= 1.5 * cold

    trio.run(main)


def test_prefetch_during_the_start_takes_fetches_off_the_critical_path(tmp_path, blobs):
    reads = workload()

    async def start(cache: str, with_prefetch: tracefmt.TraceFile | None = None):
        waits: list[tuple[float, float]] = []
        holder = Image(blobs, tmp_path / cache)
        async with holder as image:
            async with trio.open_nursery() as nursery:
                if with_prefetch is not None:
                    nursery.start_soon(run_prefetch, image, with_prefetch)
                await run_workload(image.device, reads, waits, image)
            background = len(holder.ahead)
            return critical_fetches(image, holder.log, waits), len(holder.log) - background

    async def main():
        trace_path = tmp_path / "t.trace"
        holder = Image(blobs, tmp_path / "rec")
        async with holder as image:
            recorder = attach_recorder(image, None, trace_path)
            await run_workload(recorder.device, reads)
            await recorder.close()
        trace = tracefmt.decode_trace(trace_path.read_bytes())
        lazy_critical, lazy_total = await start("lazy")
        pre_critical, pre_total = await start("prefetch", trace)
        print(f"\ncritical-path fetches: lazy {lazy_critical} of {lazy_total}, "
              f"with prefetch {pre_critical} of {pre_total}")
        # A lazy start waits for every fetch but the cache's background read-ahead.
        assert lazy_critical >= lazy_total
        assert pre_critical * 3 <= lazy_critical

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_recording_a_prefetching_start_marks_prefetch_fetches(tmp_path, blobs):
    reads = workload()

    async def main():
        first = tmp_path / "first.trace"
        holder = Image(blobs, tmp_path / "c1")
        async with holder as image:
            recorder = attach_recorder(image, None, first)
            await run_workload(recorder.device, reads)
            await recorder.close()
        trace = tracefmt.decode_trace(first.read_bytes())
        second = tmp_path / "second.trace"
        holder = Image(blobs, tmp_path / "c2")
        async with holder as image:
            recorder = attach_recorder(image, None, second)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_prefetch, image, trace)
                await run_workload(recorder.device, reads)
            await recorder.close()
            remote_total = sum(n for *_, n in holder.log)
        log = tracefmt.decode_events(Path(str(second) + ".jsonl").read_text())
        origins = {f.origin for f in log.fetches}
        assert "prefetch" in origins
        assert sum(f.length for f in log.fetches) == remote_total
        # The workload's trace is the same start: prefetch reads are not traced as reads.
        again = tracefmt.decode_trace(second.read_bytes())
        assert sorted(records_from_trace(again)) == sorted(records_from_trace(trace))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_deleting_the_lock_file_ends_the_recording(tmp_path, blobs):
    path = tmp_path / "locked.trace"

    async def main():
        async with Image(blobs, tmp_path / "c") as image:
            recorder = attach_recorder(image, None, path)
            with pytest.raises(UsageError):
                attach_recorder(image, None, path)  # one recording per file
            async with trio.open_nursery() as nursery:
                nursery.start_soon(recorder.watch_lock, 0.01)
                await recorder.device.read_at(0, 4096)
                os.unlink(str(path) + ".lock")
                await trio.sleep(0.05)
                assert not recorder.recording
                # Reads after the end are served but not recorded, and the layers are unwrapped.
                await recorder.device.read_at(8192, 4096)
                assert all(type(layer.lsmt).__name__ != "_RecordingLayer"
                           for layer in image.layers)
        trace = tracefmt.decode_trace(path.read_bytes())
        assert [(r.layer_index, r.offset) for r in trace.records][:1] != []
        log = tracefmt.decode_events(Path(str(path) + ".jsonl").read_text())
        assert [e.offset for e in log.reads] == [0]
        assert log.end is not None

    trio.run(main)


def test_a_trace_of_another_image_is_skipped_not_misread(tmp_path, blobs):
    foreign = tracefmt.TraceFile((
        tracefmt.TraceRecord("R", 5, 4096, 0),  # no such layer
        tracefmt.TraceRecord("R", 0, 4096, 1 << 40),  # beyond the layer
        tracefmt.TraceRecord("W", 0, 4096, 0),  # writes are ignored
        tracefmt.TraceRecord("R", 1, 4096, 2 << 20),  # not read by opening the layer
    ))

    async def main():
        holder = Image(blobs, tmp_path / "c")
        async with holder as image:
            prefetcher = Prefetcher(image, foreign)
            stats = await prefetcher.run()
            assert stats.skipped_records == 2
            assert stats.requests == stats.planned_requests == 1
            assert len(holder.log) == 1

    trio.run(main)


def test_prefetch_asks_for_neighbouring_spans_in_one_request(tmp_path, blobs):
    """Where the registry takes several ranges per request, the prefetch sends the spans of a
    layer that come next in the plan together: fewer requests than spans, the same bytes,
    the reads as fast; the recorded trace counts HTTP requests, not ranges."""
    reads = workload()

    async def start(cache: str, multi: bool, trace: tracefmt.TraceFile | None = None):
        holder = Image(blobs, tmp_path / cache, multi=multi)
        waits: list = []
        path = tmp_path / f"{cache}.trace"
        async with holder as image:
            recorder = attach_recorder(image, None, path)
            async with trio.open_nursery() as nursery:
                if trace is not None:
                    nursery.start_soon(run_prefetch, image, trace)
                out = await run_workload(recorder.device, reads, waits, image)
            await recorder.close()
            return out, holder, critical_fetches(image, holder.log, waits), path

    async def main():
        plain, _, lazy_critical, recorded = await start("rec", False)
        trace = tracefmt.decode_trace(recorded.read_bytes())
        out, holder, critical, path = await start("multi", True, trace)
        assert out == plain
        prefetch_calls = [c for c in holder.calls if c[1]]
        spans = sum(n for *_, n in prefetch_calls)
        assert any(n > 1 for *_, n in prefetch_calls)
        assert len(prefetch_calls) < spans
        assert critical * 3 <= lazy_critical
        summary = summarize(load_trace(str(path)))
        assert summary.prefetch_requests == len(prefetch_calls)
        log = tracefmt.decode_events(Path(str(path) + ".jsonl").read_text())
        shared = [f for f in log.fetches if f.request is not None]
        assert shared and all(f.origin == "prefetch" for f in shared)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

"""The persistent block cache over an in-memory 'remote' that counts its requests."""

from __future__ import annotations

import os
import random

import pytest
import trio
import trio.testing

from overlaybd_py.engine.block_cache import BLOCK, LOCALITY_WINDOW, BlockCache
from overlaybd_py.engine.source import MemorySource
from overlaybd_py.errors import UsageError
from overlaybd_py.registry.range_sockets import PROGRESS_STEP, RANGE_PROGRESS

DIGEST = "sha256:" + "ab" * 32


class CountingSource(MemorySource):
    def __init__(self, data: bytes, delay: float = 0.0) -> None:
        super().__init__(data)
        self.requests: list[tuple[int, int]] = []
        self.delay = delay

    async def read_at(self, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        if self.delay:
            await trio.sleep(self.delay)
        return await super().read_at(offset, length)


@pytest.fixture
def blob() -> bytes:
    return random.Random(1).randbytes(3 * 1024 * 1024 + 1234)  # not a multiple of BLOCK


async def read_random(source, blob: bytes, count: int, seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(count):
        offset = rnd.randrange(len(blob))
        length = min(rnd.choice((1, 100, 4096, 10_000, 300_000)), len(blob) - offset)
        assert await source.read_at(offset, length) == blob[offset : offset + length]


def test_hits_after_first_read_and_after_reopen(tmp_path, blob):
    async def main():
        remote = CountingSource(blob)
        cache = BlockCache.open(tmp_path, 0)
        source = cache.source(remote, DIGEST)
        await read_random(source, blob, 200, 1)
        fetched = len(remote.requests)
        assert fetched > 0
        await read_random(source, blob, 200, 1)  # same reads: all cached
        assert len(remote.requests) == fetched
        stats = cache.statistics()
        assert stats.hits > 0 and stats.bytes_fetched > 0 and stats.size > 0
        cache.close()
        # A new process (new cache object) finds everything on disk.
        remote2 = CountingSource(blob)
        cache = BlockCache.open(tmp_path, 0)
        await read_random(cache.source(remote2, DIGEST), blob, 200, 1)
        assert remote2.requests == []
        assert [b.digest for b in cache.list_blobs()] == [DIGEST]
        cache.close()

    trio.run(main)


def test_concurrent_readers_share_one_fetch(tmp_path, blob):
    async def main():
        remote = CountingSource(blob, delay=0.05)
        cache = BlockCache.open(tmp_path, 0)
        source = cache.source(remote, DIGEST)
        results = []

        async def reader():
            results.append(await source.read_at(10_000, 8192))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(reader)
        assert results == [blob[10_000:18_192]] * 8
        assert len(remote.requests) == 1
        cache.close()

    trio.run(main)


def test_coalescing_and_readahead(tmp_path, blob):
    async def main():
        remote = CountingSource(blob)
        cache = BlockCache.open(tmp_path, 0)
        source = cache.source(remote, DIGEST)
        # one read spanning many missing blocks = one request
        await source.read_at(0, 100 * BLOCK)
        assert remote.requests == [(0, 100 * BLOCK)]
        # sequential reads: read-ahead doubles with every read that continues the stream
        remote.requests.clear()
        pos = 120 * BLOCK
        for _ in range(40):
            assert await source.read_at(pos, 65536) == blob[pos : pos + 65536]
            pos += 65536
        assert len(remote.requests) < 14
        cache.close()

    trio.run(main)


def _fetched_from(requests: list[tuple[int, int]], offset: int) -> int:
    """Bytes of contiguous requests starting at ``offset`` (one window may be split in
    several MAX_FETCH requests)."""
    total = 0
    for start, length in sorted(requests):
        if start == offset + total:
            total += length
    return total


async def serve(source, start: int, end: int) -> None:
    """Read ``[start, end)`` in 1 MiB reads and let the read-ahead land."""
    for offset in range(start, end, 1 << 20):
        await source.read_at(offset, 1 << 20)
    await source.settle()


def test_a_miss_reads_a_locality_window_that_grows_with_what_was_served(tmp_path):
    blob = random.Random(2).randbytes(32 << 20)

    async def main():
        remote = CountingSource(blob)
        cache = BlockCache.open(tmp_path, 0)
        source = cache.source(remote, DIGEST)
        # Scattered small reads of a fresh blob (a mount reading ext4's metadata and one
        # small file) fetch only what they read.
        for offset in (0, 8 << 20, 16 << 20):
            assert await source.read_at(offset + 10, 100) == blob[offset + 10 : offset + 110]
        assert remote.requests == [(0, BLOCK), (8 << 20, BLOCK), (16 << 20, BLOCK)]
        # After 8 MiB served, a miss that continues no stream brings 4 MiB after it along.
        await serve(source, 1 << 20, 9 << 20)
        remote.requests.clear()
        offset = 24 << 20
        assert await source.read_at(offset, 100) == blob[offset : offset + 100]
        assert sorted(remote.requests)[0][0] == offset  # (two requests: MAX_FETCH each)
        assert sum(n for _, n in remote.requests) == BLOCK + (4 << 20)
        # ... whose blocks are then hits.
        count = len(remote.requests)
        assert await source.read_at(offset + (1 << 20), 4096) == blob[
            offset + (1 << 20) : offset + (1 << 20) + 4096]
        assert len(remote.requests) == count
        cache.close()

    trio.run(main)


class ArrivingSource(CountingSource):
    """Sends a range's body as RangeSockets does (into one buffer it returns, telling
    RANGE_PROGRESS as it arrives), but stops after its first PROGRESS_STEP bytes until
    ``gate`` is set (a slow link); then raises ``fail`` if set, else sends the rest.
    ``fail_at_once`` fails before sending."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.gate = trio.Event()
        self.gate.set()
        self.fail: Exception | None = None
        self.fail_at_once: Exception | None = None

    async def read_at(self, offset: int, length: int) -> bytes:
        data = await super().read_at(offset, length)
        if self.fail_at_once is not None:
            raise self.fail_at_once
        progress = RANGE_PROGRESS.get()
        if length > PROGRESS_STEP:
            # As the socket path: one receive buffer, filled only up to what has arrived
            # when progress is told (the rest is zeros until then), returned itself.
            body = bytearray(length)
            body[:PROGRESS_STEP] = data[:PROGRESS_STEP]
            if progress is not None:
                progress(memoryview(body), PROGRESS_STEP)
            await self.gate.wait()
            if self.fail is not None:
                raise self.fail
            body[PROGRESS_STEP:] = data[PROGRESS_STEP:]
            return body if progress is not None else data
        return data


async def windowed_source(tmp_path, blob: bytes, remote: ArrivingSource | None = None):
    """An ArrivingSource (or ``remote``), a cache and a source over it that has served
    8 MiB, so that its next miss that starts no stream brings a 4 MiB window; the link then
    stalls after each request's first piece until ``remote.gate`` is set."""
    remote = remote or ArrivingSource(blob)
    cache = BlockCache.open(tmp_path, 0)
    source = cache.source(remote, DIGEST)
    await serve(source, 1 << 20, 9 << 20)
    remote.gate = trio.Event()
    remote.requests.clear()
    return remote, cache, source


def test_a_miss_goes_on_once_its_own_blocks_have_landed(tmp_path):
    """The read that missed is at the front of its window's request: it returns when its
    blocks have arrived, while the rest of the window is still on its way."""
    blob = random.Random(4).randbytes(32 << 20)

    async def main():
        remote, cache, source = await windowed_source(tmp_path, blob)
        offset = 24 << 20
        with trio.fail_after(10):
            assert await source.read_at(offset, 100) == blob[offset : offset + 100]
            # Its neighbour in the same piece has landed too.
            near = offset + 64 * 1024
            assert await source.read_at(near, 4096) == blob[near : near + 4096]
        asked = list(remote.requests)
        assert sorted(asked)[0][0] == offset and sum(n for _, n in asked) > 1 << 20
        # A reader further into the window waits for it, and does not ask again.
        far = offset + (2 << 20)
        late: list[bytes] = []

        async def late_reader():
            late.append(await source.read_at(far, 4096))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(late_reader)
            await trio.testing.wait_all_tasks_blocked()
            assert late == []
            remote.gate.set()
        assert late == [blob[far : far + 4096]]
        assert remote.requests == asked
        await source.settle()
        cache.close()

    trio.run(main)


def test_a_reader_waits_for_its_piece_of_a_fetch_not_the_whole_fetch(tmp_path, blob):
    async def main():
        remote = ArrivingSource(blob)
        remote.gate = trio.Event()
        cache = BlockCache.open(tmp_path, 0)
        source = cache.source(remote, DIGEST)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.fill, 0, 2 << 20)  # what a prefetcher does
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(10):
                assert await source.read_at(5000, 4096) == blob[5000:9096]
            remote.gate.set()
        assert remote.requests == [(0, 2 << 20)]
        cache.close()

    trio.run(main)


def test_a_window_that_fails_fails_the_read_that_started_it(tmp_path):
    blob = random.Random(5).randbytes(32 << 20)

    async def main():
        remote, cache, source = await windowed_source(tmp_path, blob)
        # Nothing arrives: the read gets the error (asked once, not again behind its back).
        remote.fail_at_once = RuntimeError("registry gone")
        offset = 20 << 20
        with pytest.raises(RuntimeError, match="registry gone"):
            await source.read_at(offset, 100)
        assert [o for o, _ in remote.requests].count(offset) == 1
        # Its own piece arrives, then the link fails: the read has its bytes; the rest of
        # the window is fetched again by whoever reads it.
        remote.fail_at_once = None
        remote.gate = trio.Event()
        remote.fail = RuntimeError("link reset")
        remote.requests.clear()
        with trio.fail_after(10):
            assert await source.read_at(offset, 100) == blob[offset : offset + 100]
        remote.gate.set()
        await source.settle()
        remote.fail = None
        remote.requests.clear()
        far = offset + (1 << 20)
        assert await source.read_at(far, 4096) == blob[far : far + 4096]
        assert remote.requests and sorted(remote.requests)[0][0] == far
        cache.close()

    trio.run(main)


def test_closing_a_source_stops_a_window_still_arriving(tmp_path):
    blob = random.Random(6).randbytes(32 << 20)

    async def main():
        _remote, cache, source = await windowed_source(tmp_path, blob)  # gate never opened
        offset = 20 << 20
        with trio.fail_after(10):
            assert await source.read_at(offset, 100) == blob[offset : offset + 100]
            await source.aclose()
        cache.close()
        # What landed is on disk and right; the rest is simply not cached.
        remote2 = CountingSource(blob)
        cache = BlockCache.open(tmp_path, 0)
        source = cache.source(remote2, DIGEST)
        assert await source.read_at(offset, 100) == blob[offset : offset + 100]
        assert remote2.requests == []
        cache.close()

    trio.run(main)


def test_a_window_run_that_stalls_does_not_hold_up_the_readers_of_another(tmp_path):
    blob = random.Random(7).randbytes(32 << 20)

    class StallingTail(ArrivingSource):
        """Never answers requests that start at ``stall_at``."""

        def __init__(self, data: bytes) -> None:
            super().__init__(data)
            self.stall_at = -1
            self.stalled: list[int] = []

        async def read_at(self, offset: int, length: int) -> bytes:
            if offset == self.stall_at:
                self.stalled.append(offset)
                await trio.sleep_forever()
            return await super().read_at(offset, length)

    async def main():
        remote, cache, source = await windowed_source(tmp_path, blob, StallingTail(blob))
        remote.gate.set()  # only the stalled request hangs
        offset = 20 << 20
        remote.stall_at = offset + (4 << 20)  # the window's second request (MAX_FETCH each)
        with trio.fail_after(10):
            assert await source.read_at(offset, 100) == blob[offset : offset + 100]
            late = offset + (3 << 20)  # in the first request, which has ended
            assert await source.read_at(late, 4096) == blob[late : late + 4096]
        assert remote.stalled == [remote.stall_at]
        await cache.stop_background()  # what a daemon that keeps its mounts does at stop
        cache.close()

    trio.run(main)


def test_a_piece_that_cannot_be_stored_is_stored_by_its_fetch(tmp_path):
    """Storing a piece as it arrives runs outside any task: a failure there (a full disk)
    must not end the event loop; the fetch stores the bytes itself."""
    blob = random.Random(8).randbytes(32 << 20)

    async def main():
        remote, cache, source = await windowed_source(tmp_path, blob)
        remote.gate.set()
        store = source._store
        failures = []

        def store_once_failing(data, offset):
            if not failures and offset == 20 << 20:  # the first piece of the read's fetch
                failures.append(offset)
                raise OSError(28, "No space left on device")
            return store(data, offset)

        source._store = store_once_failing
        offset = 20 << 20
        with trio.fail_after(10):
            assert await source.read_at(offset, 100) == blob[offset : offset + 100]
            await source.settle()
        assert failures == [offset]
        far = offset + (1 << 20)
        remote.requests.clear()
        assert await source.read_at(far, 4096) == blob[far : far + 4096]
        assert remote.requests == []
        cache.close()

    trio.run(main)


def test_windows_nobody_reads_stop(tmp_path):
    blob = random.Random(3).randbytes(176 << 20)

    async def main():
        remote = CountingSource(blob)
        cache = BlockCache.open(tmp_path, 0)
        source = cache.source(remote, DIGEST)
        await serve(source, 0, 40 << 20)  # 40 MiB served: windows of 8 MiB
        fetched = []
        for k in range(8):  # scattered 4 KiB reads, 12 MiB apart: nobody reads the windows
            offset = (80 << 20) + k * (12 << 20)  # beyond the read-ahead
            remote.requests.clear()
            assert await source.read_at(offset, 4096) == blob[offset : offset + 4096]
            fetched.append(_fetched_from(remote.requests, offset))
        window = BLOCK + LOCALITY_WINDOW
        # WINDOW_ALLOWANCE (16 MiB) of unread windows, one more at the limit, then none.
        assert fetched == [window] * 3 + [BLOCK] * 5
        cache.close()

    trio.run(main)


def test_sequential_reader_is_read_ahead_in_the_background(tmp_path, blob):
    """With a slow remote, a sequential reader stops waiting once its stream is known (the
    next window is fetched while it reads: without that it waits for every window), never
    fetches more than twice what it read, and closing the source waits for the background
    fetch."""

    async def main():
        remote = CountingSource(blob, delay=0.01)
        cache = BlockCache.open(tmp_path, 0)
        source = cache.source(remote, DIGEST)
        waited = 0
        pos = 0
        for _ in range(24):
            started = trio.current_time()
            assert await source.read_at(pos, 32768) == blob[pos : pos + 32768]
            waited += trio.current_time() - started >= 0.01
            pos += 32768
            await trio.sleep(0.004)  # the workload computes between reads
        fetched = sum(n for _, n in remote.requests)
        assert waited <= 2  # the stream's start; after it the window is fetched ahead
        assert len(remote.requests) > waited
        assert pos < fetched <= 2 * pos + 2 * BLOCK
        await source.aclose()  # a background fetch may be in flight: closing waits for it
        cache.close()
        # everything it published is correct on disk
        cache = BlockCache.open(tmp_path, 0)
        again = CountingSource(blob)
        assert await cache.source(again, DIGEST).read_at(0, pos) == blob[:pos]
        assert again.requests == []
        cache.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_read_ahead_fetches_a_short_tail_of_the_blob(tmp_path, blob):
    """A stream near the end of the blob: the missing tail is less than a quarter of its
    window, and is fetched ahead all the same (the reader does not wait for it)."""

    async def main():
        remote = CountingSource(blob)
        cache = BlockCache.open(tmp_path, 0)
        source = cache.source(remote, DIGEST)
        size = len(blob)
        tail = (size // BLOCK - 2) * BLOCK  # the last 3 blocks (the last one short)
        stream = tail - 50 * BLOCK
        await source.fill(0, stream)
        await source.fill(stream + 16 * BLOCK, tail - stream - 16 * BLOCK)
        remote.requests.clear()
        assert await source.read_at(stream, 16 * BLOCK) == blob[stream : stream + 16 * BLOCK]
        assert remote.requests == [(stream, 16 * BLOCK)]  # a miss: the stream starts
        pos = stream + 16 * BLOCK  # cached: the read-ahead is 32 blocks, the tail 3
        assert await source.read_at(pos, 16 * BLOCK) == blob[pos : pos + 16 * BLOCK]
        await source.settle()
        assert remote.requests[1:] == [(tail, size - tail)]
        await source.aclose()
        cache.close()

    trio.run(main)


class GatedSource(CountingSource):
    """Requests reaching past ``gate_at`` wait until ``gate`` is set."""

    def __init__(self, data: bytes, gate_at: int) -> None:
        super().__init__(data, delay=0.001)
        self.gate_at = gate_at
        self.gate = trio.Event()

    async def read_at(self, offset: int, length: int) -> bytes:
        if offset + length > self.gate_at:
            await self.gate.wait()
        return await super().read_at(offset, length)


def test_settle_waits_for_what_is_in_flight_not_for_a_reader_that_goes_on(tmp_path):
    """``settle`` (umount, ``status --settle``) must end while a reader keeps reading: the
    read-ahead stops after its current fetch, and fetches started later are not waited
    for. Here they would never end: requests past 32 MiB hang until the test lets them go."""
    blob = random.Random(4).randbytes(48 << 20)

    async def main():
        remote = GatedSource(blob, gate_at=32 << 20)
        cache = BlockCache.open(tmp_path, 0)
        source = cache.source(remote, DIGEST)
        pos = 0

        async def reader():
            nonlocal pos
            while pos < len(blob):
                assert await source.read_at(pos, 65536) == blob[pos : pos + 65536]
                pos += 65536
                await trio.sleep(0)  # a hit does not yield

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            while pos < 1 << 20:  # the stream is known, its read-ahead running
                await trio.sleep(0.001)
            with trio.fail_after(30):  # a hang, not a speed limit
                await source.settle()
            remote.gate.set()
            nursery.cancel_scope.cancel()
        await source.aclose()
        cache.close()

    trio.run(main)


def test_sequential_reader_through_a_cache_smaller_than_its_window(tmp_path, blob):
    """Read-ahead must not evict itself: a long sequential read through a 1 MiB cache ends,
    reads right, fetches each block about once, and the cache stays near its cap."""

    async def main():
        remote = CountingSource(blob, delay=0.001)
        cache = BlockCache.open(tmp_path, 1 << 20)
        source = cache.source(remote, DIGEST)
        async def read(pos: int) -> None:
            n = min(65536, len(blob) - pos)
            assert await source.read_at(pos, n) == blob[pos : pos + n]

        with trio.fail_after(60):
            for _ in range(2):
                for batch in range(0, len(blob), 4 * 65536):  # the kernel's parallel reads
                    async with trio.open_nursery() as nursery:
                        for pos in range(batch, min(batch + 4 * 65536, len(blob)), 65536):
                            nursery.start_soon(read, pos)
        assert sum(n for _, n in remote.requests) <= 2 * 1.5 * len(blob)
        await source.aclose()
        # Eviction skips regions being fetched: the cap may be passed by one window (1/8).
        assert cache.statistics().size <= (1 << 20) + (1 << 17)
        cache.close()

    trio.run(main)


@pytest.mark.allow_log_warnings
def test_corrupt_entries_are_detected_and_refetched(tmp_path, blob):
    async def main():
        remote = CountingSource(blob)
        cache = BlockCache.open(tmp_path, 0)
        source = cache.source(remote, DIGEST)
        await source.read_at(0, len(blob))
        cache.close()
        data_path = next((tmp_path / "blobs").glob("*.data"))
        with open(data_path, "r+b") as f:
            f.seek(5 * BLOCK + 17)
            f.write(b"\xff\x00\xee")
        remote2 = CountingSource(blob)
        cache = BlockCache.open(tmp_path, 0)
        source = cache.source(remote2, DIGEST)
        assert await source.read_at(0, len(blob)) == blob
        assert remote2.requests == [(5 * BLOCK, BLOCK)]
        assert cache.statistics().corrupt_blocks == 1
        cache.close()
        # a truncated meta file: rebuilt from scratch, reads still right
        meta_path = next((tmp_path / "blobs").glob("*.meta"))
        with open(meta_path, "r+b") as f:
            f.truncate(100)
        cache = BlockCache.open(tmp_path, 0)
        remote3 = CountingSource(blob)
        assert await cache.source(remote3, DIGEST).read_at(0, 5000) == blob[:5000]
        assert remote3.requests
        cache.close()

    trio.run(main)


def test_size_cap_evicts_lru_and_reads_stay_right(tmp_path):
    async def main():
        cap = 2 << 20
        cache = BlockCache.open(tmp_path, cap)
        blobs = {}
        for i in range(3):
            data = random.Random(i).randbytes(2 << 20)
            digest = "sha256:" + f"{i:02x}" * 32
            blobs[digest] = (data, cache.source(CountingSource(data), digest))
        for _ in range(3):
            for data, source in blobs.values():
                await read_random(source, data, 30, 7)
                assert cache.size() <= cap
        stats = cache.statistics()
        assert stats.evictions > 0 and stats.evicted_bytes > 0
        on_disk = sum(os.stat(p).st_blocks * 512 for p in (tmp_path / "blobs").glob("*.data"))
        assert on_disk <= cap + (1 << 20)  # holes really punched (fs rounding allowed)
        cache.close()

    trio.run(main)


def test_clear_and_version_check(tmp_path, blob):
    async def main():
        cache = BlockCache.open(tmp_path, 0)
        await cache.source(CountingSource(blob), DIGEST).read_at(0, 10_000)
        cache.close()
        cache = BlockCache.open(tmp_path, 0)
        assert cache.clear() > 0 and cache.list_blobs() == []
        cache.close()

    trio.run(main)
    (tmp_path / "VERSION").write_text('{"format": 99, "block_size": 4096}')
    with pytest.raises(UsageError, match="different cache format"):
        BlockCache.open(tmp_path, 0)


@pytest.mark.parametrize(("name", "rounds"), [
    ("baselayer-ext4_64.zfile", 2),  # 4 KiB chunks: a 529 KB jump table
    ("l1.lz4.tar", 1), ("l1.zstd64k.zfile", 1), ("l1.commit", 1), ("l1.lz4.hdrov.zfile", 1)])
def test_opening_a_layer_fetches_its_tables_in_one_or_two_rounds(tmp_path, name, rounds):
    """A layer's tables sit at the end of its blob and were read one after another (ZFile
    trailer, jump table, LSMT trailer, index: five round trips with the head). Through the
    cache, a cold open fetches the first and last blocks at once and, when the jump table is
    larger than that tail, the jump table and the chunks before it (the LSMT tables) in one
    more request. Files written by the original tools; the layer reads like an uncached one."""
    from overlaybd_py.engine.layer import open_layer
    from tests.fixtures.testdata import sample

    data = sample(name).read_bytes()
    delay = 0.01

    async def main():
        remote = CountingSource(data, delay=delay)
        cache = BlockCache.open(tmp_path, 0)
        started = trio.current_time()
        layer = await open_layer(cache.source(remote, DIGEST), key=name)
        assert trio.current_time() - started == pytest.approx(rounds * delay), remote.requests
        assert len(remote.requests) <= 3
        plain = await open_layer(MemorySource(data), key=name)
        assert layer.segments == plain.segments and layer.trailer == plain.trailer
        cache.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("chunk_size", [4096, 65536])
@pytest.mark.parametrize("data_size", [(3 << 20) + (12 << 10), (8 << 20) + (4 << 10)])
def test_a_jump_table_inside_the_tail_fill_costs_no_second_round(tmp_path, chunk_size,
                                                                   data_size):
    """Layers written here (ZFile, unaligned sizes, many index records): their jump tables
    fit the open's tail fill, so nothing is fetched in a second round."""
    from overlaybd_py.engine.layer import open_layer
    from overlaybd_py.engine.layer_files import commit_layer
    from overlaybd_py.engine.writable import WritableLayer

    rnd = random.Random(data_size + chunk_size)
    writable = WritableLayer.create(str(tmp_path / "d"), str(tmp_path / "i"), 64 << 20)
    for offset in range(0, data_size, 12 << 10):  # 8 KiB runs with gaps: one record each
        writable.write(offset, rnd.randbytes(4096) + bytes(4096))
    writable.close()
    commit_layer(str(tmp_path / "d"), str(tmp_path / "i"), str(tmp_path / "c"),
                 algorithm="zstd", chunk_size=chunk_size)
    data = (tmp_path / "c").read_bytes()
    delay = 0.01

    async def main():
        remote = CountingSource(data, delay=delay)
        cache = BlockCache.open(tmp_path / "cache", 0)
        started = trio.current_time()
        await open_layer(cache.source(remote, DIGEST), key="synthetic")
        assert trio.current_time() - started == pytest.approx(delay), remote.requests
        cache.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_blob_asked_for_at_another_size_is_refused_and_kept(tmp_path, blob):
    """The same digest at another size: the request is wrong (the entry's size came from
    the registry's answers). Before, the entry was rebuilt, dropping what was cached."""
    from overlaybd_py.errors import DigestMismatchError

    async def main():
        cache = BlockCache.open(tmp_path, 0)
        await cache.source(CountingSource(blob), DIGEST).read_at(0, 8192)
        cache.close()
        cache = BlockCache.open(tmp_path, 0)
        with pytest.raises(DigestMismatchError, match=f"{len(blob) + 1} bytes asked for"):
            cache.source(CountingSource(blob + b"x"), DIGEST)
        remote = CountingSource(blob)
        assert await cache.source(remote, DIGEST).read_at(0, 8192) == blob[:8192]
        assert remote.requests == []  # still cached
        cache.close()

    trio.run(main)


class MultiRangeSource(CountingSource):
    """A remote that answers several ranges in one request, handing each part to
    ``on_part`` as a server's multipart answer would (``fail``: the request fails after the
    first part)."""

    def __init__(self, data: bytes, fail: bool = False) -> None:
        super().__init__(data)
        self.multi: list[list[tuple[int, int]]] = []
        self.fail = fail

    async def read_ranges(self, ranges, on_part=None):
        from overlaybd_py.registry.byteranges import Part

        self.multi.append(list(ranges))
        body = b"".join([await MemorySource.read_at(self, o, n) for o, n in ranges])
        view, at, out = memoryview(body), 0, []
        for i, (offset, length) in enumerate(ranges):
            if self.fail and i == 1:
                raise OSError("connection reset in the middle of the answer")
            if on_part is not None:
                on_part(view, Part(offset, length, at))
            out.append(view[at : at + length])
            at += length
        return out


def test_fill_many_fetches_the_missing_blocks_in_one_request(tmp_path, blob):
    async def main():
        cache = BlockCache.open(tmp_path / "c", 0)
        remote = MultiRangeSource(blob)
        source = cache.source(remote, "sha256:" + "5" * 64)
        await source.read_at(100 * BLOCK, 10)  # present already: not asked for again
        remote.requests.clear()
        wanted = [(0, 3 * BLOCK), (100 * BLOCK, 2 * BLOCK), (400 * BLOCK + 5, 10 * BLOCK),
                  (len(blob) - 100, 100)]
        await source.fill_many(wanted)
        assert remote.multi == [[(0, 3 * BLOCK), (101 * BLOCK, BLOCK),
                                 (400 * BLOCK, 11 * BLOCK),
                                 (len(blob) // BLOCK * BLOCK, len(blob) % BLOCK)]]
        assert remote.requests == []
        for offset, length in wanted:
            assert await source.read_at(offset, length) == blob[offset : offset + length]
        assert remote.requests == [] and source.requests == 2  # the first read, fill_many
        await source.aclose()
        cache.close()

    trio.run(main)


def test_fill_many_after_a_failed_request_leaves_nothing_half_claimed(tmp_path, blob):
    async def main():
        cache = BlockCache.open(tmp_path / "c", 0)
        remote = MultiRangeSource(blob, fail=True)
        source = cache.source(remote, "sha256:" + "6" * 64)
        with pytest.raises(OSError):
            await source.fill_many([(0, BLOCK), (50 * BLOCK, BLOCK), (90 * BLOCK, BLOCK)])
        with trio.fail_after(5):  # no reader waits for a claim the failed request held
            for offset in (0, 50 * BLOCK, 90 * BLOCK):
                assert await source.read_at(offset, BLOCK) == blob[offset : offset + BLOCK]
        await source.aclose()
        cache.close()

    trio.run(main)


def test_fill_many_without_multi_range_fills_range_by_range(tmp_path, blob):
    async def main():
        cache = BlockCache.open(tmp_path / "c", 0)
        remote = CountingSource(blob)
        source = cache.source(remote, "sha256:" + "7" * 64)
        await source.fill_many([(0, BLOCK), (10 * BLOCK, BLOCK)])
        assert remote.requests == [(0, BLOCK), (10 * BLOCK, BLOCK)]
        await source.aclose()
        cache.close()

    trio.run(main)


class SplittingSource(CountingSource):
    """A remote whose registry does not take several ranges per request (``read_ranges``
    answers None); ``slow`` offsets take 1 s, ``broken`` ones fail."""

    def __init__(self, data: bytes, slow=(), broken=()) -> None:
        super().__init__(data)
        self.slow, self.broken = set(slow), set(broken)

    async def read_ranges(self, ranges, on_part=None):
        return None

    async def read_at(self, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        await trio.sleep(1.0 if offset in self.slow else 0.01)
        if offset in self.broken:
            raise OSError(f"connection reset reading {offset}")
        return await MemorySource.read_at(self, offset, length)


def test_fill_many_on_a_single_range_registry_wakes_each_reader_as_its_range_lands(
        tmp_path, blob):
    async def main():
        cache = BlockCache.open(tmp_path / "c", 0)
        remote = SplittingSource(blob, slow={200 * BLOCK})
        source = cache.source(remote, "sha256:" + "8" * 64)
        done: dict[str, float] = {}

        async def reader():
            await trio.sleep(0.001)  # after fill_many has claimed the blocks
            assert await source.read_at(0, BLOCK) == blob[:BLOCK]
            done["reader"] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await source.fill_many([(0, BLOCK), (200 * BLOCK, BLOCK)])
            done["fill"] = trio.current_time()
        assert sorted(remote.requests) == [(0, BLOCK), (200 * BLOCK, BLOCK)]
        assert done["reader"] < 0.5 < done["fill"]  # not held until the slow range landed
        await source.aclose()
        cache.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_fill_many_on_a_single_range_registry_raises_the_error_itself(tmp_path, blob):
    async def main():
        cache = BlockCache.open(tmp_path / "c", 0)
        remote = SplittingSource(blob, broken={50 * BLOCK})
        source = cache.source(remote, "sha256:" + "9" * 64)
        with pytest.raises(OSError, match="connection reset"):  # not an ExceptionGroup
            await source.fill_many([(0, BLOCK), (50 * BLOCK, BLOCK), (90 * BLOCK, BLOCK)])
        remote.broken.clear()
        with trio.fail_after(5):
            for offset in (0, 50 * BLOCK, 90 * BLOCK):
                assert await source.read_at(offset, BLOCK) == blob[offset : offset + BLOCK]
        await source.aclose()
        cache.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

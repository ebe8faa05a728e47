"""Record what a start reads and fetches: the original's trace file plus a JSONL event log.

Theory of operation
-------------------
The recorder observes an open image at three depths, by wrapping (and, at close, unwrapping)
objects the image already has:

* the device (``ServedImage.device``, the object FUSE reads): one ``read`` event per read,
  with its time, device range and duration;
* each layer's uncompressed LSMT source (``Layer.lsmt``): the per-layer reads, which become
  the original's trace records ('R', layer index with 0 = bottom, LSMT offset, count) and the
  ``pieces`` (layer, offset, length, ZFile chunks) of the read event;
* each layer's remote blob (the source ``Layer.blob``, a block-cache ``CachedSource``,
  fetches misses from; ``Layer.blob`` itself without a cache): one ``fetch`` event per
  range request, with its latency.

Attribution uses a ``ContextVar``: the device wrapper sets it for the duration of a read,
and trio copies the context into the child tasks the engine starts for that read, so a layer
read or fetch knows which device read it serves, even with many reads in flight. Reads that
wait for a fetch *another* read (or the prefetcher) issued are not charged with it; their
``dt`` shows the wait. A read is charged with a fetch when the fetch starts: the window the
block cache fetches behind a miss may still be arriving when the read returns. Prefetch
tasks run with ``PREFETCHING`` set, so their fetches are marked ``origin: prefetch`` and
never become trace records (the trace holds what the workload read).
The block cache's background read-ahead of a sequential reader is ``origin: readahead``.

Everything is kept in memory (bounded by ``MAX_EVENTS``) and written at ``close``: ``FILE``
in the original format, ``FILE.jsonl``, then ``FILE.ok``. As the original does, ``FILE.lock``
exists while recording; deleting it ends the recording early (``watch_lock``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from .. import __version__
from ..errors import UsageError
from ..formats import trace as tracefmt
from ..formats.trace import FetchEvent, LayerInfo, ReadEvent, ReadPiece, TraceRecord
from .block_cache import READING_AHEAD, CachedSource
from .source import BlobSource

if TYPE_CHECKING:
    from ..fusefs.fs import ServedImage
    from .image import OpenImage

__all__ = ["PREFETCHING", "RecorderStatistics", "TraceRecorder", "attach_recorder"]

log = logging.getLogger(__name__)

# Set (to True) in tasks that prefetch: their fetches are marked and not traced as reads.
PREFETCHING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "overlaybd_py_prefetching", default=False
)
# The device read the current task works for (None outside reads).
_CURRENT_READ: contextvars.ContextVar[_ReadContext | None] = contextvars.ContextVar(
    "overlaybd_py_trace_read", default=None
)

# ~1,200 reads and a few hundred fetches for a numpy+pandas start; a day-long recording of
# a busy container could grow without end, so stop keeping events past this many (~200 B
# each in memory).
MAX_EVENTS = 2_000_000


class _ReadContext:
    __slots__ = ("fetched", "fetches", "id", "pieces")

    def __init__(self, read_id: int) -> None:
        self.id = read_id
        self.pieces: list[ReadPiece] = []
        self.fetches = 0
        self.fetched = 0


@dataclass(frozen=True, slots=True)
class RecorderStatistics:
    recording: bool
    reads: int  # device reads observed
    bytes_read: int
    records: int  # trace records (layer reads) kept
    fetches: int  # range requests observed (any origin)
    bytes_fetched: int
    dropped: int  # events not kept because of MAX_EVENTS


class _RecordingDevice:
    """Stands in for the device FUSE reads: times each read and sets the read context."""

    def __init__(self, device: Any, recorder: TraceRecorder) -> None:
        self._device = device
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:  # size, writable, upper, write_at, ...
        return getattr(self._device, name)

    async def read_at(self, offset: int, length: int) -> bytes:
        recorder = self._recorder
        if not recorder.recording:
            return await self._device.read_at(offset, length)
        ctx = _ReadContext(recorder._next_read_id())
        started = trio.current_time()
        token = _CURRENT_READ.set(ctx)
        ok = False
        try:
            data = await self._device.read_at(offset, length)
            ok = True
        finally:
            _CURRENT_READ.reset(token)
            recorder._read_done(ctx, offset, length, started, trio.current_time(), ok)
        return data


class _RecordingLayer:
    """Wraps ``Layer.lsmt``: every successful read becomes a trace record."""

    def __init__(self, inner: BlobSource, index: int, chunk_size: int | None,
                 recorder: TraceRecorder) -> None:
        self.inner = inner
        self.size = inner.size
        self._index = index
        self._chunk_size = chunk_size
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read_at(self, offset: int, length: int) -> bytes:
        data = await self.inner.read_at(offset, length)
        if self._recorder.recording and length > 0:
            first = last = None
            if self._chunk_size:
                first, last = offset // self._chunk_size, (offset + length - 1) // self._chunk_size
            self._recorder._layer_read(ReadPiece(self._index, offset, length, first, last))
        return data


class TraceRecorder:
    """Records reads of one open image until ``close``. Build with ``attach_recorder``."""

    def __init__(self, image: OpenImage, path: str, served: ServedImage | None = None) -> None:
        self.image = image
        self.path = path
        self.served = served
        self.recording = False
        self.device: Any = image.device  # reads through this are recorded (after attach)
        self._records: list[TraceRecord] = []
        self._events: list[ReadEvent | FetchEvent] = []
        self._read_id = 0
        self._fetch_id = 0
        self._counters = dict(reads=0, bytes_read=0, fetches=0, bytes_fetched=0, dropped=0)
        self._t0 = 0.0
        self._started_unix = 0.0
        self._undo: list[Callable[[], None]] = []
        self._closed = trio.Event()
        self._summary: RecorderStatistics | None = None

    @property
    def lock_path(self) -> str:
        return self.path + ".lock"

    # -- attaching -------------------------------------------------------------------------

    def _attach(self) -> None:
        image = self.image
        self._t0 = trio.current_time()
        self._started_unix = time.time()
        device = _RecordingDevice(image.device, self)
        self.device = device
        if self.served is not None:
            served, original = self.served, self.served.device
            served.device = device

            def restore_device() -> None:
                if served.device is device:
                    served.device = original
            self._undo.append(restore_device)
        for i, layer in enumerate(image.layers):
            chunk_size = layer.zfile.index.chunk_size if layer.zfile is not None else None
            wrapped = _RecordingLayer(layer.lsmt, i, chunk_size, self)
            layer.lsmt = wrapped
            self._undo.append(lambda layer=layer, wrapped=wrapped: _unwrap_layer(layer, wrapped))
        for i, layer in enumerate(image.layers):
            self._undo.append(self._observe_fetches(fetch_source(layer.blob), i))
        self.recording = True

    def _observe_fetches(self, remote: BlobSource, index: int) -> Callable[[], None]:
        """Shadow ``remote.read_at`` on the instance (the block cache holds this object and
        calls it for every miss). Returns the undo."""
        inner = remote.read_at
        recorder = self

        async def read_at(offset: int, length: int) -> bytes:
            if not recorder.recording:
                return await inner(offset, length)
            started = trio.current_time()
            recorder._fetch_started(length)
            ok = False
            try:
                data = await inner(offset, length)
                ok = True
                return data
            finally:
                recorder._fetch_done(index, offset, length, started, trio.current_time(), ok)

        remote.read_at = read_at  # type: ignore[method-assign]
        inner_ranges = getattr(remote, "read_ranges", None)

        async def read_ranges(ranges: list[tuple[int, int]], on_part: Any = None) -> list:
            if not recorder.recording:
                return await inner_ranges(ranges, on_part)
            started = trio.current_time()
            for _, length in ranges:
                recorder._fetch_started(length)
            data = None
            ok = False
            try:
                data = await inner_ranges(ranges, on_part)
                ok = True
                return data
            finally:
                if data is not None or not ok:  # None: nothing was fetched, ranges come next
                    ended = trio.current_time()
                    request = recorder._fetch_id + 1 if len(ranges) > 1 else None
                    for offset, length in ranges:
                        recorder._fetch_done(index, offset, length, started, ended, ok,
                                             request)

        if inner_ranges is not None:
            remote.read_ranges = read_ranges  # type: ignore[attr-defined]

        def undo() -> None:
            if remote.__dict__.get("read_at") is read_at:
                del remote.read_at
            if remote.__dict__.get("read_ranges") is read_ranges:
                del remote.read_ranges
        return undo

    # -- events (called from the wrappers; all on the trio thread) --------------------------

    def _next_read_id(self) -> int:
        self._read_id += 1
        return self._read_id

    def _keep(self, event: ReadEvent | FetchEvent) -> None:
        if len(self._events) >= MAX_EVENTS:
            if not self._counters["dropped"]:
                log.warning("trace %s: more than %d events; keeping no more", self.path,
                            MAX_EVENTS)
            self._counters["dropped"] += 1
            return
        self._events.append(event)

    def _read_done(self, ctx: _ReadContext, offset: int, length: int, started: float,
                   ended: float, ok: bool) -> None:
        if not self.recording:
            return
        self._counters["reads"] += 1
        self._counters["bytes_read"] += length if ok else 0
        self._keep(ReadEvent(ctx.id, started - self._t0, ended - started, offset, length,
                             tuple(ctx.pieces), ctx.fetches, ctx.fetched, ok))

    def _layer_read(self, piece: ReadPiece) -> None:
        ctx = _CURRENT_READ.get()
        if ctx is None or PREFETCHING.get():
            return  # not the workload's read (opening, background download, prefetch)
        ctx.pieces.append(piece)
        if len(self._records) < MAX_EVENTS:
            self._records.append(TraceRecord("R", piece.layer, piece.length, piece.offset))

    def _fetch_origin(self) -> tuple[str, _ReadContext | None]:
        """Why the fetch in this context was made, and the read it is for (if one)."""
        if PREFETCHING.get():
            return "prefetch", None
        if READING_AHEAD.get():
            return "readahead", None
        ctx = _CURRENT_READ.get()
        return ("read", ctx) if ctx is not None else ("other", None)

    def _fetch_started(self, length: int) -> None:
        """A read counts its fetches when they start: the part of a window behind the read
        may still be arriving when the read returns."""
        if self.recording:
            _, ctx = self._fetch_origin()
            if ctx is not None:
                ctx.fetches += 1
                ctx.fetched += length

    def _fetch_done(self, layer: int, offset: int, length: int, started: float, ended: float,
                    ok: bool, request: int | None = None) -> None:
        if not self.recording:
            return
        origin, ctx = self._fetch_origin()
        read_id = ctx.id if ctx is not None else None
        if ctx is not None and not ok:
            ctx.fetched -= length
        self._fetch_id += 1
        if ok:
            self._counters["fetches"] += 1
            self._counters["bytes_fetched"] += length
        self._keep(FetchEvent(self._fetch_id, started - self._t0, ended - started, layer,
                              offset, length, origin, read_id, ok, request))

    # -- results -----------------------------------------------------------------------------

    def statistics(self) -> RecorderStatistics:
        if self._summary is not None:
            return self._summary
        c = self._counters
        return RecorderStatistics(self.recording, c["reads"], c["bytes_read"],
                                  len(self._records), c["fetches"], c["bytes_fetched"],
                                  c["dropped"])

    def _layer_infos(self) -> tuple[LayerInfo, ...]:
        infos = []
        for i, layer in enumerate(self.image.layers):
            z = layer.zfile
            infos.append(LayerInfo(i, layer.key, layer.blob.size, layer.lsmt.size, layer.kind,
                                   z.index.chunk_size if z is not None else None))
        return tuple(infos)

    def _write(self, header: tracefmt.TraceLogHeader, end: tracefmt.EndEvent,
               records: list[TraceRecord], events: list[ReadEvent | FetchEvent]) -> None:
        events.sort(key=lambda e: (e.t, e.type, e.id))
        _write_atomic(self.path, tracefmt.encode_trace(records))
        lines = [tracefmt.encode_event(header)]
        lines.extend(tracefmt.encode_event(e) for e in events)
        lines.append(tracefmt.encode_event(end))
        _write_atomic(self.path + ".jsonl", ("\n".join(lines) + "\n").encode())
        with open(self.path + ".ok", "w"):
            pass
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_path)

    async def close(self) -> RecorderStatistics:
        """Stop recording, unwrap, and write ``FILE``, ``FILE.jsonl`` and ``FILE.ok``
        (each complete or absent). Idempotent: a second call waits for the first."""
        if not self.recording:
            await self._closed.wait()
            assert self._summary is not None
            return self._summary
        summary = self.statistics()
        self.recording = False
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        header = tracefmt.TraceLogHeader(self.image.device.size, self._layer_infos(),
                                         self._started_unix, f"overlaybd-py {__version__}")
        end = tracefmt.EndEvent(trio.current_time() - self._t0, self._counters["dropped"])
        records, events = self._records, self._events
        self._records, self._events = [], []
        self._summary = dataclasses.replace(summary, recording=False)
        try:
            with trio.CancelScope(shield=True):  # an unmount must not lose the trace
                await trio.to_thread.run_sync(self._write, header, end, records, events)
        finally:
            self._closed.set()
        log.info("trace %s: %d records, %d reads, %d fetches", self.path, len(records),
                 summary.reads, summary.fetches)
        return self._summary

    async def watch_lock(self, poll: float = 1.0) -> None:
        """End the recording when ``FILE.lock`` is deleted (the original's protocol), checked
        every ``poll`` seconds; returns once the recording is closed either way."""
        while self.recording:
            if not os.path.exists(self.lock_path):
                log.info("trace %s: lock file removed; writing the trace", self.path)
                await self.close()
                return
            with trio.move_on_after(poll):
                await self._closed.wait()


def fetch_source(blob: BlobSource) -> BlobSource:
    """The source a layer's misses are fetched from: the remote behind a block-cache
    ``CachedSource``, or the blob itself when nothing caches it."""
    if isinstance(blob, CachedSource):
        return blob.remote
    return blob


def _unwrap_layer(layer: Any, wrapped: _RecordingLayer) -> None:
    if layer.lsmt is wrapped:
        layer.lsmt = wrapped.inner


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def attach_recorder(image: OpenImage, served: ServedImage | None, path: str | os.PathLike[str]
                    ) -> TraceRecorder:
    """Start recording every read of ``image`` (through ``served``, the FUSE image, when given;
    otherwise read through ``recorder.device``) into ``path`` and ``path.jsonl``.

    Creates ``path.lock`` now; the trace files appear at ``await recorder.close()`` (or when
    the lock is deleted while ``watch_lock`` runs). Raises UsageError when the directory of
    ``path`` does not exist or a recording to ``path`` is already running.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise UsageError(f"cannot record a trace to {path}: {directory} is not a directory")
    try:
        fd = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise UsageError(f"{path}.lock exists: a recording to {path} is running (or a dead "
                         "one left it; delete it)") from None
    os.close(fd)
    if os.path.exists(path + ".ok"):  # stale: from an earlier recording
        os.unlink(path + ".ok")
    recorder = TraceRecorder(image, path, served)
    recorder._attach()
    return recorder

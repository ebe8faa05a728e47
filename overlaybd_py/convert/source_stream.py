"""Stream a source layer from the registry into the tar applier, decompressing on the way.

A trio task reads the blob in fixed-size range requests (each retried by the registry
client, so a dropped connection resumes where it stopped instead of restarting the layer),
two requests ahead, hashes it and writes it into a pipe. A worker thread reads the pipe,
decompresses (gzip or zstd, detected from the first bytes, or none) and applies the tar. The
digest and size are checked when the stream ends; a mismatch fails the layer (whose scratch
upper is then discarded: nothing is sealed or pushed). Memory stays bounded by the request
size times the prefetch depth plus the pipe buffer.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Callable
from typing import IO, Any

import trio
import zstandard

from ..engine._tasks import unwrap_group
from ..errors import DigestMismatchError
from ..formats.oci import Descriptor, digest_hasher
from ..registry import Reference, RegistryClient

__all__ = ["decompressing_reader", "stream_layer_into"]

log = logging.getLogger(__name__)

REQUEST_BYTES = 8 << 20
PREFETCH = 2
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _Peekable:
    """A read-only file wrapper that can look at its first bytes without consuming them."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._head = b""

    def peek(self, n: int) -> bytes:
        while len(self._head) < n:
            more = self._raw.read(n - len(self._head))
            if not more:
                break
            self._head += more
        return self._head[:n]

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0:
                data, self._head = self._head + self._raw.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            if len(data) < n:
                data += self._raw.read(n - len(data))
            return data
        return self._raw.read(n)

    def readable(self) -> bool:
        return True


class _Future:
    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data = b""
        self.error: BaseException | None = None


def decompressing_reader(raw: IO[bytes]) -> IO[bytes]:
    """Wrap ``raw`` in the right decompressor, chosen by magic (media types lie)."""
    peekable = _Peekable(raw)
    head = peekable.peek(4)
    if head[:2] == _GZIP_MAGIC:
        return gzip.GzipFile(fileobj=peekable, mode="rb")  # type: ignore[arg-type]
    if head == _ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().stream_reader(peekable, read_across_frames=True)
    return peekable  # type: ignore[return-value]


async def stream_layer_into(
    client: RegistryClient,
    ref: Reference,
    layer: Descriptor,
    consume: Callable[[IO[bytes]], Any],
    *,
    on_progress: Callable[[int], None] | None = None,
) -> Any:
    """Feed the decompressed bytes of ``layer`` to ``consume`` (run in a worker thread with a
    readable file) and return its result, once the blob's digest and size are verified."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    hasher = digest_hasher(layer.digest)
    received = 0
    result: dict[str, Any] = {}

    def run_consumer() -> None:
        with open(read_fd, "rb", buffering=1 << 20) as raw:
            reader = decompressing_reader(raw)
            result["value"] = consume(reader)
            # Drain what the tar did not need (padding, trailing zero blocks) so the
            # producer never blocks on a full pipe.
            while raw.read(1 << 20):
                pass

    async def produce(out: trio.lowlevel.FdStream) -> None:
        """Fetch ranges (up to PREFETCH in flight) and write them to the pipe in order."""
        nonlocal received
        # capacity 0: the starter blocks while one future waits to be written and one is
        # being written, so at most PREFETCH (= 2) ranges are in memory or in flight.
        send_futures, receive_futures = trio.open_memory_channel[_Future](PREFETCH - 2)

        async def fetch(offset: int, future: _Future) -> None:
            try:
                length = min(REQUEST_BYTES, layer.size - offset)
                future.data = await client.read_blob_range(
                    ref, layer.digest, offset, length, blob_size=layer.size)
            except Exception as exc:  # handed to the writer, which raises it in order
                future.error = exc
            finally:
                future.done.set()

        async with trio.open_nursery() as nursery:

            async def start_fetches() -> None:
                async with send_futures:
                    for offset in range(0, layer.size, REQUEST_BYTES):
                        future = _Future()
                        nursery.start_soon(fetch, offset, future)
                        await send_futures.send(future)

            nursery.start_soon(start_fetches)
            async with receive_futures:
                async for future in receive_futures:
                    await future.done.wait()
                    if future.error is not None:
                        raise future.error
                    hasher.update(future.data)
                    received += len(future.data)
                    await out.send_all(future.data)
                    future.data = b""
                    if on_progress:
                        on_progress(received)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, run_consumer)
            out = trio.lowlevel.FdStream(write_fd)
            try:
                await produce(out)
            except (trio.BrokenResourceError, BrokenPipeError):
                pass  # the consumer stopped early: its error (raised in the nursery) explains
            finally:
                await out.aclose()
    except BaseExceptionGroup as group:
        raise unwrap_group(group) from None
    if received != layer.size or hasher.hexdigest() != layer.digest.partition(":")[2]:
        raise DigestMismatchError(
            f"layer {layer.digest}: the registry sent {received} bytes that do not match the "
            f"descriptor (size {layer.size}); nothing of this layer was kept"
        )
    return result["value"]

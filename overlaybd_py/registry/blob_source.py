"""A BlobSource over HTTP Range: ``size`` and ``async read_at(offset, length)`` for one blob.

This is what the lazy block device reads through. It adds nothing to the client's range
read but bounds checks and counters: connection reuse, the per-host bound on parallel
requests, retries and mirror fallback all live in the client, shared by every source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from ..errors import DigestMismatchError
from ..formats.oci import Descriptor, validate_digest
from .client import RegistryClient
from .range_sockets import PartCallback
from .reference import Reference

__all__ = ["BlobSourceStatistics", "HttpBlobSource"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BlobSourceStatistics:
    reads: int
    bytes_read: int
    seconds: float  # summed wall time of reads (overlapping reads count each)


class HttpBlobSource:
    """Reads byte ranges of blob ``digest`` in ``ref``'s repository. Build with :meth:`open`.

    The client is borrowed, not owned: close it yourself after the last read.
    """

    def __init__(self, client: RegistryClient, ref: Reference, digest: str, size: int) -> None:
        validate_digest(digest)
        if size < 0:
            raise ValueError(f"negative blob size {size}")
        self._client = client
        self._ref = ref
        self.digest = digest
        self.size = size
        self._reads = 0
        self._bytes = 0
        self._seconds = 0.0

    @classmethod
    async def open(
        cls, client: RegistryClient, ref: Reference, blob: Descriptor | str
    ) -> HttpBlobSource:
        """Check that the blob exists (HEAD, which also warms the connection and the token)
        and, for a descriptor, that the registry agrees on its size."""
        digest = blob if isinstance(blob, str) else blob.digest
        size = await client.blob_size(ref, digest)
        if not isinstance(blob, str) and blob.size != size:
            raise DigestMismatchError(
                f"blob {digest}: registry reports {size} bytes, the descriptor says {blob.size}"
            )
        return cls(client, ref, digest, size)

    async def read_at(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``; ValueError outside ``[0, size]``."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"read {offset}+{length} outside blob {self.digest} of {self.size} bytes"
            )
        start = trio.current_time()
        data = await self._client.read_blob_range(
            self._ref, self.digest, offset, length, blob_size=self.size
        )
        self._reads += 1
        self._bytes += length
        self._seconds += trio.current_time() - start
        return data

    async def read_ranges(self, ranges: list[tuple[int, int]],
                          on_part: PartCallback | None = None
                          ) -> list[memoryview] | None:
        """Several (offset, length) ranges in one request, or None where the registry does
        not take several (see ``RegistryClient.read_blob_ranges``)."""
        for offset, length in ranges:
            if offset < 0 or length <= 0 or offset + length > self.size:
                raise ValueError(
                    f"read {offset}+{length} outside blob {self.digest} of {self.size} bytes"
                )
        start = trio.current_time()
        data = await self._client.read_blob_ranges(
            self._ref, self.digest, ranges, blob_size=self.size, on_part=on_part
        )
        if data is None:
            return None
        self._reads += 1
        self._bytes += sum(length for _, length in ranges)
        self._seconds += trio.current_time() - start
        return data

    def statistics(self) -> BlobSourceStatistics:
        return BlobSourceStatistics(self._reads, self._bytes, self._seconds)

    def __repr__(self) -> str:
        return f"HttpBlobSource({self._ref.registry}/{self._ref.repository}@{self.digest})"

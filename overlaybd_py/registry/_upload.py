"""Blob uploads: skip when present, cross-repository mount, monolithic PUT, resumable chunks.

Sends through the client's ``_exchange`` (only ``client.py`` holds the httpx client). A failed
chunk is resumed from the offset the registry reports for the session (``GET`` on the upload
URL answers ``Range: 0-N``), so a reset late in a large layer does not restart it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import trio

from ..errors import DigestMismatchError, RegistryError, TransientError
from ..formats.oci import Descriptor, sha256_digest
from ._http import raise_for_status
from .retry import retry

if TYPE_CHECKING:
    from .client import RegistryClient, _Endpoint
    from .reference import Reference

__all__ = ["BlobData", "upload_blob"]

log = logging.getLogger(__name__)

_OCTET = "application/octet-stream"


class BlobData:
    """Bytes to upload, in memory or in a file; read in pieces so a layer need not fit in RAM."""

    def __init__(self, source: bytes | os.PathLike[str]) -> None:
        self._bytes: bytes | None = None
        self._path: Path | None = None
        if isinstance(source, bytes | bytearray | memoryview):
            self._bytes = bytes(source)
            self.size = len(self._bytes)
        else:
            self._path = Path(source)
            self.size = self._path.stat().st_size

    async def digest(self) -> str:
        if self._bytes is not None:
            if self.size < (1 << 20):
                return sha256_digest(self._bytes)
            return await trio.to_thread.run_sync(sha256_digest, self._bytes)
        return await trio.to_thread.run_sync(self._hash_file)

    def _hash_file(self) -> str:
        with self._path.open("rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()

    async def read(self, offset: int, length: int) -> bytes:
        if self._bytes is not None:
            return bytes(self._bytes[offset : offset + length])

        def read() -> bytes:
            with self._path.open("rb") as f:
                f.seek(offset)
                return f.read(length)

        return await trio.to_thread.run_sync(read)


async def upload_blob(
    client: RegistryClient,
    ref: Reference,
    source: bytes | os.PathLike[str],
    *,
    media_type: str,
    mount_from: Reference | None,
    chunk_size: int | None,
    digest: str | None = None,
) -> Descriptor:
    data = BlobData(source)
    digest = digest or await data.digest()
    descriptor = Descriptor(media_type, digest, data.size)
    present = await client._head_blob(ref, digest, pull=False)
    if present is not None:
        if present != data.size:
            raise RegistryError(
                f"{ref.repository} already has blob {digest} with {present} bytes, not {data.size}"
            )
        log.debug("blob %s already in %s: upload skipped", digest, ref.repository)
        return descriptor
    if mount_from is not None and mount_from.registry != ref.registry:
        mount_from = None  # mounting only works within one registry
    upload = _Upload(client, ref, data, digest, chunk_size)
    origin = client._origin(ref)
    location = await retry(
        lambda: upload.start(origin, mount_from),
        policy=client.retry_policy,
        what=f"start upload of {digest} to {ref.repository}",
    )
    if location is None:
        return descriptor
    upload.location = location
    if chunk_size is None or data.size <= chunk_size:
        await retry(
            upload.put_whole,
            policy=client.retry_policy,
            what=f"upload {digest} to {ref.repository}",
        )
        return descriptor
    while upload.offset < data.size:
        await retry(
            upload.patch_next,
            policy=client.retry_policy,
            what=f"upload chunk of {digest} to {ref.repository}",
        )
    await retry(
        upload.finish,
        policy=client.retry_policy,
        what=f"finish upload of {digest} to {ref.repository}",
    )
    return descriptor


class _Upload:
    """One upload session; its methods are retried whole by the caller."""

    def __init__(
        self,
        client: RegistryClient,
        ref: Reference,
        data: BlobData,
        digest: str,
        chunk_size: int | None,
    ) -> None:
        self.client = client
        self.ref = ref
        self.data = data
        self.digest = digest
        self.chunk_size = chunk_size or data.size
        self.origin = client._origin(ref)
        self.location = httpx.URL()
        self.offset = 0
        self.unsure = False  # a chunk failed: ask the registry where the session stands

    async def start(self, origin: _Endpoint, mount_from: Reference | None) -> httpx.URL | None:
        """POST a new session (or a mount). None means mounted: nothing to upload."""
        url = f"{origin.base}/v2/{self.ref.repository}/blobs/uploads/"
        params = {"mount": self.digest, "from": mount_from.repository} if mount_from else None
        async with self.client._exchange(
            origin, "POST", url, params=params, headers={"Content-Length": "0"}
        ) as response:
            await raise_for_status(response, f"start upload to {self.ref.repository}")
            if response.status_code == 201 and mount_from is not None:
                log.debug("blob %s mounted from %s", self.digest, mount_from.repository)
                return None
            return _location(response)

    async def put_whole(self) -> None:
        if self.unsure:  # a failed PUT may have consumed the session: start a fresh one
            located = await self.start(self.origin, None)
            assert located is not None
            self.location = located
        self.unsure = True
        body = await self.data.read(0, self.data.size)
        await self._put(body)
        self.unsure = False

    async def patch_next(self) -> None:
        if self.unsure:
            await self._resync()
        self.unsure = True
        body = await self.data.read(self.offset, self.chunk_size)
        end = self.offset + len(body) - 1
        headers = {"Content-Type": _OCTET, "Content-Range": f"{self.offset}-{end}"}
        async with self.client._exchange(
            self.origin, "PATCH", self.location, content=body, headers=headers
        ) as response:
            await raise_for_status(response, f"upload chunk to {self.ref.repository}")
            self.location = _location(response)
            confirmed = _range_end(response)
        if confirmed is not None and confirmed != end:
            self.offset = confirmed + 1  # the registry kept less: continue from there
        else:
            self.offset = end + 1
        self.unsure = False

    async def finish(self) -> None:
        await self._put(b"")

    async def _resync(self) -> None:
        """Continue where the registry stands; restart if it cannot resume this session.

        Distribution, for one, refuses a session whose PATCH died mid-body (the offset in
        its signed ``_state`` no longer matches the data it holds): then a fresh session
        from byte 0 is the only way forward.
        """
        try:
            async with self.client._exchange(self.origin, "GET", self.location) as response:
                await raise_for_status(response, f"upload status in {self.ref.repository}")
                confirmed = _range_end(response)
                if "location" in response.headers:
                    self.location = _location(response)
            self.offset = 0 if confirmed is None else confirmed + 1
            log.info("resuming upload of %s at byte %d", self.digest, self.offset)
        except RegistryError as exc:
            if isinstance(exc, TransientError):
                raise
            log.info("upload of %s cannot resume (%s): starting again", self.digest, exc)
            located = await self.start(self.origin, None)
            assert located is not None
            self.location, self.offset = located, 0

    async def _put(self, body: bytes) -> None:
        url = self.location.copy_merge_params({"digest": self.digest})
        async with self.client._exchange(
            self.origin, "PUT", url, content=body, headers={"Content-Type": _OCTET}
        ) as response:
            await raise_for_status(response, f"complete upload to {self.ref.repository}")
            stored = response.headers.get("docker-content-digest")
        if stored and stored != self.digest:
            raise DigestMismatchError(f"registry stored blob as {stored}, expected {self.digest}")


def _location(response: httpx.Response) -> httpx.URL:
    value = response.headers.get("location")
    if not value:
        raise RegistryError(f"upload answer (HTTP {response.status_code}) has no Location")
    return response.url.join(value)


def _range_end(response: httpx.Response) -> int | None:
    """Last byte the registry holds, from ``Range: 0-N`` (None if it holds nothing)."""
    value = response.headers.get("range", "").strip()
    if value.startswith("bytes="):
        value = value[6:]
    first, _, last = value.partition("-")
    if not (first.isdigit() and last.isdigit()):
        return None
    return int(last)

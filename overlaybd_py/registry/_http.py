"""Small helpers that read or judge one ``httpx.Response``: bounded bodies, error details,
``Retry-After``, ``Content-Range`` checks and range extraction from a whole-blob answer.

They never send requests (only ``client.py`` does) and raise only the registry exceptions.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
from collections.abc import Mapping

import httpx

from ..errors import AuthError, DigestMismatchError, NotFoundError, RegistryError, TransientError

__all__ = [
    "check_content_range",
    "check_unsatisfiable",
    "error_detail",
    "parse_content_range",
    "parse_retry_after",
    "raise_for_status",
    "read_limited",
    "skip_and_take",
]

log = logging.getLogger(__name__)

_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RE = re.compile(r"bytes\s+\*/(\d+)")
_MAX_ERROR_BODY = 8192


async def read_limited(response: httpx.Response, limit: int, what: str) -> bytes:
    """The whole body, refusing (RegistryError) one larger than ``limit`` bytes."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RegistryError(f"{what}: {declared} bytes is more than the {limit} allowed")
    body = bytearray()
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) > limit:
            raise RegistryError(f"{what}: body exceeds the {limit} bytes allowed")
    return bytes(body)


async def error_detail(response: httpx.Response) -> str:
    """``": CODE: message"`` from a distribution error body, or "" (bounded read)."""
    try:
        body = await read_limited(response, _MAX_ERROR_BODY, "error body")
    except (RegistryError, httpx.HTTPError):
        return ""
    try:
        errors = json.loads(body).get("errors")
        parts = [f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors]
    except (ValueError, AttributeError, TypeError):
        return ""
    return ": " + "; ".join(parts) if parts else ""


def parse_retry_after(response: httpx.Response, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def parse_content_range(header: str) -> tuple[int, int, int | None] | None:
    """(first, last, total or None for ``*``) of a ``bytes`` Content-Range, or None."""
    match = _CONTENT_RANGE_RE.fullmatch(header.strip())
    if match is None:
        return None
    return int(match[1]), int(match[2]), None if match[3] == "*" else int(match[3])


def check_content_range(
    response: httpx.Response, offset: int, length: int, blob_size: int | None, what: str
) -> None:
    """Refuse a 206 answer that is not exactly the range asked for (or of another blob size).

    A range ending early (asked past the end) is a short read: TransientError only if the
    blob size is unknown, since a retry cannot change a size the server reports honestly.
    """
    header = response.headers.get("content-range", "")
    parsed = parse_content_range(header)
    if parsed is None:
        raise RegistryError(f"{what}: 206 answer with unusable Content-Range {header!r}")
    first, last, total = parsed
    if total is not None and blob_size is not None and total != blob_size:
        raise DigestMismatchError(
            f"{what}: server reports a blob of {total} bytes, expected {blob_size}"
        )
    if first != offset or last != offset + length - 1:
        raise RegistryError(
            f"{what}: server answered bytes {first}-{last} instead of "
            f"{offset}-{offset + length - 1}"
        )


def check_unsatisfiable(status: int, headers: Mapping[str, str], blob_size: int | None,
                        what: str) -> None:
    """A 416 to a range inside ``blob_size`` whose ``Content-Range: bytes */N`` names
    another size: the blob is not the size the manifest says."""
    if status != 416 or blob_size is None:
        return
    match = _UNSATISFIED_RE.fullmatch(headers.get("content-range", "").strip())
    if match is not None and int(match[1]) != blob_size:
        raise DigestMismatchError(
            f"{what}: server reports a blob of {match[1]} bytes, expected {blob_size}")


async def skip_and_take(response: httpx.Response, offset: int, length: int) -> bytes:
    """From a whole-blob body, the ``length`` bytes at ``offset`` (reading no further).

    Returns fewer bytes only if the body ends early; the caller treats that as an error.
    """
    skipped = 0
    taken = bytearray()
    async for piece in response.aiter_bytes():
        if skipped < offset:
            drop = min(len(piece), offset - skipped)
            skipped += drop
            piece = piece[drop:]
        if piece:
            taken += piece[: length - len(taken)]
            if len(taken) == length:
                return bytes(taken)
    if skipped < offset or len(taken) < length:
        raise TransientError(
            f"body ended after {skipped + len(taken)} bytes, before byte {offset + length}"
        )
    return bytes(taken)


async def raise_for_status(response: httpx.Response, what: str) -> None:
    """Map a non-2xx answer to the exception tree (reading a bounded error body)."""
    status = response.status_code
    if 200 <= status < 300:
        return
    detail = await error_detail(response)
    url = str(response.url.copy_with(query=None))
    if status in (401, 403):
        raise AuthError(f"{what}: access denied (HTTP {status}{detail})", status=status, url=url)
    if status == 404:
        raise NotFoundError(f"{what}: not found{detail}", status=status, url=url)
    message = f"{what}: HTTP {status}{detail}"
    if status in (408, 429) or status >= 500:
        raise TransientError(
            message, retry_after=parse_retry_after(response), status=status, url=url
        )
    raise RegistryError(message, status=status, url=url)

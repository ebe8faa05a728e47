"""Multi-range requests (RFC 9110 14.2, 14.6): the ``Range`` header for several byte ranges
and an incremental parser for the ``multipart/byteranges`` body that answers it.

Pure: bytes in, values out. The socket code feeds the parser the body as it arrives, so a
caller can use each part before the last has come.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BodyParts", "Part", "boundary_of", "covering_parts", "range_header"]

_PART_RANGE_RE = re.compile(rb"(?im)^content-range:[ \t]*bytes[ \t]+(\d+)-(\d+)/(\d+|\*)[ \t]*\r?$")
_BOUNDARY_RE = re.compile(
    r'(?i)^multipart/byteranges\s*;(?:.*;)?\s*boundary\s*=\s*(?:"([^"]+)"|([^";\s]+))')
MAX_PART_HEAD = 8 * 1024


@dataclass(frozen=True, slots=True)
class Part:
    """One part of the answer: ``length`` bytes of the blob from ``start``, at ``body_offset``
    in the body."""

    start: int
    length: int
    body_offset: int


def range_header(ranges: Sequence[tuple[int, int]]) -> str:
    """``bytes=a-b,c-d,...`` for (offset, length) ranges (each at least one byte)."""
    if not ranges or any(length <= 0 or offset < 0 for offset, length in ranges):
        raise ValueError(f"byte ranges must be non-empty and positive: {list(ranges)}")
    return "bytes=" + ",".join(f"{offset}-{offset + length - 1}" for offset, length in ranges)


def boundary_of(content_type: str) -> str | None:
    """The boundary of a ``multipart/byteranges`` content type, or None for another type."""
    match = _BOUNDARY_RE.match(content_type.strip())
    if match is None:
        return None
    return match.group(1) if match.group(1) is not None else match.group(2)


class BodyParts:
    """Parses a ``multipart/byteranges`` body given in growing prefixes.

    ``feed(body, received)`` looks at ``body[:received]`` (the same buffer every call,
    filled further each time) and returns the parts completed since the last call.
    ``finish(received)`` checks the body ended with the closing delimiter. A part is handed
    out only once the delimiter after it has arrived and checked out (a part shorter than
    its Content-Range says must not pass the next part's header off as its bytes). Malformed
    input raises ValueError naming what was wrong.
    """

    def __init__(self, boundary: str, blob_size: int | None = None) -> None:
        self._delimiter = b"--" + boundary.encode("latin-1")
        self._blob_size = blob_size
        self._pos = 0  # where the next delimiter is expected
        self._ended = False
        self.parts: list[Part] = []

    def feed(self, body: bytes | bytearray | memoryview, received: int) -> list[Part]:
        new: list[Part] = []
        view = memoryview(body)[:received]
        while not self._ended:
            part = self._next(view)
            if part is None:
                break
            new.append(part)
        self.parts += new
        return new

    def finish(self, received: int) -> None:
        if not self._ended:
            raise ValueError(f"multipart body ended after {received} bytes without its "
                             "closing delimiter")

    def _next(self, view: memoryview) -> Part | None:
        delimiter = self._delimiter
        pos = self._pos
        if self.parts or pos:  # after a part: CRLF, then the delimiter
            need = pos + 2 + len(delimiter) + 2
            if len(view) < need:
                return None
            if view[pos : pos + 2] != b"\r\n":
                raise ValueError(f"multipart body: no CRLF after the part ending at {pos}")
            pos += 2
        else:  # the first delimiter may follow a preamble
            found = bytes(view[: MAX_PART_HEAD]).find(delimiter)
            if found < 0:
                if len(view) >= MAX_PART_HEAD:
                    raise ValueError("multipart body: no boundary in its first "
                                     f"{MAX_PART_HEAD} bytes")
                return None
            if found and bytes(view[found - 2 : found]) != b"\r\n":
                raise ValueError("multipart body: the first boundary does not start a line")
            pos = found
            if len(view) < pos + len(delimiter) + 2:
                return None
        if view[pos : pos + len(delimiter)] != delimiter:
            raise ValueError(f"multipart body: expected the boundary at byte {pos}")
        pos += len(delimiter)
        if view[pos : pos + 2] == b"--":
            self._ended = True
            self._pos = pos + 2
            return None
        head_end = bytes(view[pos : pos + MAX_PART_HEAD]).find(b"\r\n\r\n")
        if head_end < 0:
            if len(view) - pos >= MAX_PART_HEAD:
                raise ValueError(f"multipart body: part header at {pos} longer than "
                                 f"{MAX_PART_HEAD} bytes")
            return None
        head = bytes(view[pos : pos + head_end])
        match = _PART_RANGE_RE.search(head)
        if match is None:
            raise ValueError(f"multipart body: part at byte {pos} has no Content-Range")
        first, last = int(match.group(1)), int(match.group(2))
        size = match.group(3)
        if last < first or (self._blob_size is not None and (
                last >= self._blob_size or (size != b"*" and int(size) != self._blob_size))):
            raise ValueError(f"multipart body: bad part range {head!r}")
        data_at = pos + head_end + 4
        length = last - first + 1
        end = data_at + length
        if len(view) < end + 2 + len(delimiter):
            return None
        if view[end : end + 2] != b"\r\n" or view[end + 2 : end + 2 + len(delimiter)] != delimiter:
            raise ValueError(f"multipart body: the part at byte {data_at} is not followed by "
                             "the boundary where its Content-Range ends")
        self._pos = end
        return Part(first, length, data_at)


def covering_parts(parts: Sequence[Part], ranges: Sequence[tuple[int, int]]
                   ) -> list[tuple[Part, int]] | None:
    """For each (offset, length) range, a part holding all of it and where in the part it
    starts; None when some range is not wholly inside one part (a server may merge ranges or
    answer them in another order, but must cover them)."""
    out = []
    for offset, length in ranges:
        for part in parts:
            if part.start <= offset and offset + length <= part.start + part.length:
                out.append((part, offset - part.start))
                break
        else:
            return None
    return out

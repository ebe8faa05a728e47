"""The tar wrapper of overlaybd layer blobs: one member, ``overlaybd.commit``, in a plain tar.

Pure codec (spec section 2.7). ``find_payload`` locates the member inside the first bytes
of a blob by parsing the tar headers (a PAX header may carry the real size);
``wrap_head``/``wrap_tail`` produce the bytes the original writes around a payload.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CorruptLayerError

__all__ = ["HEAD_PROBE", "TarPayload", "find_payload", "is_tar", "wrap_head", "wrap_tail"]

BLOCK = 512
# Bytes a reader fetches first: enough for a PAX header, its records and the member header.
HEAD_PROBE = 4096
MEMBER_NAME = b"overlaybd.commit"
PAX_NAME = b"overlaybd.pax"


@dataclass(frozen=True, slots=True)
class TarPayload:
    offset: int  # bytes from the start of the blob
    size: int


def _checksum(header: bytes | memoryview) -> int:
    return sum(header[:148]) + 8 * 32 + sum(header[156:BLOCK])


def _octal(field: bytes, name: str, offset: int) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for values that do not fit in octal
        value = int.from_bytes(field[1:], "big")
        return value
    text = field.replace(b"\x00", b" ").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise CorruptLayerError(
            f"tar header: {name} is not an octal number", field=name, offset=offset,
            actual=bytes(field),
        ) from None


def is_tar(head: bytes | memoryview) -> bool:
    """True when the first 512 bytes are a ustar header with a valid checksum."""
    if len(head) < BLOCK or bytes(head[257:262]) != b"ustar":
        return False
    try:
        stored = _octal(bytes(head[148:156]), "chksum", 148)
    except CorruptLayerError:
        return False
    return stored == _checksum(head)


def _pax_size(records: bytes, offset: int) -> int | None:
    size = None
    pos = 0
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(records[pos:space])
        except ValueError:
            raise CorruptLayerError(
                "tar PAX header: bad record length", field="pax", offset=offset + pos,
                actual=records[pos:space],
            ) from None
        if length <= space - pos or pos + length > len(records):
            raise CorruptLayerError(
                "tar PAX header: record length out of range", field="pax", offset=offset + pos,
                actual=length,
            )
        key, _, value = records[space + 1 : pos + length - 1].partition(b"=")
        if key == b"size":
            try:
                size = int(value)
            except ValueError:
                raise CorruptLayerError(
                    "tar PAX header: size is not a number", field="pax size",
                    offset=offset + pos, actual=value,
                ) from None
        pos += length
    return size


def find_payload(head: bytes | memoryview, blob_size: int | None = None) -> TarPayload:
    """Locate the single member of a tar-wrapped layer blob.

    ``head`` is the start of the blob (``HEAD_PROBE`` bytes suffice for anything the
    original writes). Raises CorruptLayerError when the tar is malformed or the member
    does not fit in ``blob_size``.
    """
    head = bytes(head)
    pos = 0
    pax_size = None
    while True:
        header = head[pos : pos + BLOCK]
        if len(header) < BLOCK:
            raise CorruptLayerError(
                "tar wrapper: headers extend beyond the probed bytes", field="tar header",
                offset=pos, expected=f"<= {len(head)}", actual=pos + BLOCK,
            )
        if not is_tar(header):
            raise CorruptLayerError(
                "tar wrapper: bad ustar header or checksum", field="tar header", offset=pos,
            )
        typeflag = header[156:157]
        size = _octal(header[124:136], "size", pos + 124)
        if typeflag in (b"x", b"g"):
            data = head[pos + BLOCK : pos + BLOCK + size]
            if len(data) < size:
                raise CorruptLayerError(
                    "tar wrapper: PAX header larger than the probed bytes", field="pax",
                    offset=pos, expected=f"<= {len(head) - pos - BLOCK}", actual=size,
                )
            if typeflag == b"x":
                pax_size = _pax_size(data, pos + BLOCK)
            pos += BLOCK + -(-size // BLOCK) * BLOCK
            continue
        if typeflag not in (b"0", b"\x00", b"7"):
            raise CorruptLayerError(
                "tar wrapper: the member is not a regular file", field="typeflag",
                offset=pos + 156, expected=b"0", actual=typeflag,
            )
        payload = TarPayload(pos + BLOCK, pax_size if pax_size is not None else size)
        if blob_size is not None and payload.offset + payload.size > blob_size:
            raise CorruptLayerError(
                "tar wrapper: member runs beyond the end of the blob", field="size",
                offset=pos + 124, expected=f"<= {blob_size - payload.offset}",
                actual=payload.size,
            )
        return payload


def _num(value: int, width: int) -> bytes:
    """Octal, right-aligned in ``width - 1`` columns, then a space (libtar style)."""
    return f"{value:>{width - 1}o} ".encode()


def _finish(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = f"{_checksum(header):>6o} ".encode() + b"\x00"
    return bytes(header)


def wrap_head(payload_size: int, mode: int = 0o100644) -> bytes:
    """The 1536 bytes the original writes before the payload: PAX header, its record
    (``size=``), and the ustar header of ``overlaybd.commit`` (size field 0, mtime 0, root)."""
    record_body = f" size={payload_size}\n"
    length = len(record_body)
    length = len(f"{length + len(str(length))}{record_body}")
    record = f"{length}{record_body}".encode()
    assert len(record) == length

    pax = bytearray(BLOCK)
    pax[0 : len(PAX_NAME)] = PAX_NAME
    pax[124:136] = f"{len(record):>11o} ".encode()
    pax[156:157] = b"x"
    pax[257:263] = b"ustar\x00"
    pax[263:265] = b"00"

    member = bytearray(BLOCK)
    member[0 : len(MEMBER_NAME)] = MEMBER_NAME
    member[100:108] = f"{mode:>6o} ".encode() + b"\x00"
    member[108:116] = b"     0 \x00"
    member[116:124] = b"     0 \x00"
    member[124:136] = _num(0, 12)
    member[136:148] = _num(0, 12)
    member[156:157] = b"0"
    member[257:263] = b"ustar\x00"
    member[263:265] = b"00"
    member[265:269] = b"root"
    member[297:301] = b"root"
    return _finish(pax) + record.ljust(BLOCK, b"\x00") + _finish(member)


def wrap_tail(payload_size: int) -> bytes:
    """Padding of the payload to 512 bytes, then the two zero blocks that end a tar."""
    return b"\x00" * (-payload_size % BLOCK + 2 * BLOCK)

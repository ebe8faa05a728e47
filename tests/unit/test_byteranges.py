"""The multi-range request header and the multipart/byteranges parser (RFC 9110 14.6),
against bodies written out by hand in the layout docker-registry (Go's net/http) sends."""

from __future__ import annotations

import pytest

from overlaybd_py.registry.byteranges import (
    BodyParts,
    Part,
    boundary_of,
    covering_parts,
    range_header,
)

BLOB = bytes(range(256)) * 16


def body(parts: list[tuple[int, int]], boundary: str = "b0undary", preamble: bytes = b"",
         size: str = str(len(BLOB))) -> bytes:
    out = preamble
    for i, (offset, length) in enumerate(parts):
        out += b"\r\n" if i else b""
        out += (f"--{boundary}\r\nContent-Range: bytes {offset}-{offset + length - 1}/{size}"
                f"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
        out += BLOB[offset : offset + length]
    return out + f"\r\n--{boundary}--\r\n".encode()


def test_range_header():
    assert range_header([(0, 100), (1000, 1)]) == "bytes=0-99,1000-1000"
    with pytest.raises(ValueError):
        range_header([(5, 0)])
    with pytest.raises(ValueError):
        range_header([])


def test_boundary_of():
    assert boundary_of("multipart/byteranges; boundary=abc123") == "abc123"
    assert boundary_of('Multipart/Byteranges;boundary="q q"') == "q q"
    assert boundary_of("application/octet-stream") is None
    assert boundary_of("multipart/mixed; boundary=x") is None
    assert boundary_of('multipart/byteranges; boundary="a;b c"; x=1') == "a;b c"
    assert boundary_of("multipart/byteranges; boundary=abc; charset=x") == "abc"


@pytest.mark.parametrize("step", [1, 7, 100, 10_000])
def test_parts_come_out_as_their_bytes_arrive(step):
    wanted = [(0, 10), (300, 200), (4000, 96)]
    raw = body(wanted, preamble=b"ignored preamble\r\n")
    parser = BodyParts("b0undary", len(BLOB))
    buf = bytearray(len(raw))
    seen: list[Part] = []
    for end in range(step, len(raw) + step, step):
        end = min(end, len(raw))
        buf[:end] = raw[:end]
        for part in parser.feed(buf, end):
            # a part is handed out only once all of its bytes are there
            assert part.body_offset + part.length <= end
            seen.append(part)
    parser.finish(len(raw))
    assert [(p.start, p.length) for p in seen] == wanted
    assert [bytes(raw[p.body_offset : p.body_offset + p.length]) for p in seen] == \
        [BLOB[o : o + n] for o, n in wanted]


def test_malformed_bodies_are_refused_with_a_reason():
    good = body([(0, 10), (20, 10)])
    no_range = good.replace(b"Content-Range: bytes 20-29", b"X-Nothing: 1")
    with pytest.raises(ValueError, match="no Content-Range"):
        BodyParts("b0undary").feed(no_range, len(no_range))
    wrong_size = body([(0, 10)], size="99")
    with pytest.raises(ValueError, match="bad part range"):
        BodyParts("b0undary", len(BLOB)).feed(wrong_size, len(wrong_size))
    cut = good[:-12]  # no closing delimiter
    parser = BodyParts("b0undary")
    parser.feed(cut, len(cut))
    with pytest.raises(ValueError, match="closing delimiter"):
        parser.finish(len(cut))
    garbled = good.replace(b"\r\n--b0undary\r\nContent-Range: bytes 20", b"XX--b0undary\r\n"
                           b"Content-Range: bytes 20")
    with pytest.raises(ValueError, match="not followed by the boundary"):
        BodyParts("b0undary").feed(garbled, len(garbled))
    beyond = body([(4000, 96)], size=str(len(BLOB)))
    with pytest.raises(ValueError, match="bad part range"):
        BodyParts("b0undary", 4050).feed(beyond, len(beyond))
    glued = b"preamble--b0undary" + good[len(b"--b0undary"):]
    with pytest.raises(ValueError, match="does not start a line"):
        BodyParts("b0undary").feed(glued, len(glued))


def test_a_part_shorter_than_its_content_range_is_never_handed_out():
    """The server says 100 bytes and sends 60: the next delimiter and part header must not
    come out as the missing 40, however the body arrives."""
    raw = body([(0, 60), (500, 50)]).replace(b"bytes 0-59/", b"bytes 0-99/")
    for step in (1, 13, len(raw)):
        parser = BodyParts("b0undary", len(BLOB))
        handed: list[Part] = []
        with pytest.raises(ValueError, match="not followed by the boundary"):
            for end in range(step, len(raw) + step, step):
                handed += parser.feed(raw, min(end, len(raw)))
        assert handed == []


def test_covering_parts_accepts_merged_and_reordered_parts():
    parts = [Part(1000, 50, 500), Part(0, 300, 100)]
    assert covering_parts(parts, [(10, 20), (200, 100), (1000, 50)]) == \
        [(parts[1], 10), (parts[1], 200), (parts[0], 0)]
    assert covering_parts(parts, [(290, 20)]) is None  # runs past the part
    assert covering_parts(parts, [(500, 1)]) is None

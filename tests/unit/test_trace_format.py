"""The trace codec: the original's binary trace (golden bytes written by hand from the
spec's struct layout, checked in both directions), priority lists, the acceleration-layer
tar and our JSONL event log."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlaybd_py.errors import FormatError
from overlaybd_py.formats import trace as t


def crc32c_raw_bitwise(data: bytes, crc: int = 0) -> int:
    """Reference CRC32C, no inversion (spec 2.5 'raw'), one bit at a time: independent of
    both of our accelerator backends."""
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


# Spec section 4, by hand. Header: u32 magic @0, pad, u64 data_size @8, u32 checksum @16, pad.
# Record: u8 op @0, 3 pad, u32 layer_index @4, u64 count @8, i64 offset @16.
REC_1 = bytes.fromhex(
    "52" "000000"  # 'R' + padding
    "00000000"  # layer_index 0 (the bottom layer)
    "0010000000000000"  # count 4096
    "0020000000000000"  # offset 8192
)
REC_2 = bytes.fromhex(
    "57" "000000"  # 'W'
    "02000000"  # layer_index 2
    "0002000000000000"  # count 512
    "0000000001000000"  # offset 4 GiB
)
GOLDEN = bytes.fromhex(
    "2018efc2"  # magic 0xC2EF1820, little-endian
    "00000000"  # padding
    "3000000000000000"  # data_size = 2 * 24
    "9f100407"  # raw CRC32C of REC_1 + REC_2 = 0x0704109f
    "00000000"  # padding
) + REC_1 + REC_2
RECORDS = (t.TraceRecord("R", 0, 4096, 8192), t.TraceRecord("W", 2, 512, 4 << 30))


def test_golden_checksum_is_the_raw_crc32c_of_the_records():
    assert crc32c_raw_bitwise(REC_1 + REC_2) == 0x0704109F
    # chained record by record, as the original computes it
    assert crc32c_raw_bitwise(REC_2, crc32c_raw_bitwise(REC_1)) == 0x0704109F


def test_golden_bytes_both_directions(accel):
    assert t.encode_trace(RECORDS) == GOLDEN
    assert t.decode_trace(GOLDEN).records == RECORDS
    assert list(t.decode_trace(GOLDEN).reads()) == [RECORDS[0]]
    assert t.is_trace(GOLDEN)
    assert t.TraceHeader.unpack(GOLDEN) == t.TraceHeader(48, 0x0704109F)


def test_empty_trace_is_a_bare_header(accel):
    empty = bytes.fromhex("2018efc2" "00000000") + bytes(8) + bytes(8)  # crc of nothing = 0
    assert t.encode_trace([]) == empty
    assert t.decode_trace(t.encode_trace([])).records == ()


def test_padding_written_by_the_cpp_struct_is_not_assumed_zero(accel):
    # The C++ writes structs from memory: padding may hold anything, and it is inside the CRC.
    record = bytes.fromhex("52abcdef" "01000000" "0000100000000000" "0000000000000000")
    crc = crc32c_raw_bitwise(record)
    assert crc == 0x2BCE36CE
    data = bytes.fromhex("2018efc2" "deadbeef" "1800000000000000") + crc.to_bytes(4, "little") \
        + b"\x99\x99\x99\x99" + record
    assert t.decode_trace(data).records == (t.TraceRecord("R", 1, 1 << 20, 0),)


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b"\x21" + b[1:], "magic"),
    (lambda b: b[:-1], "data_size"),
    (lambda b: b + b"\0" * 24, "data_size"),
    (lambda b: b[:16] + b"\0\0\0\0" + b[20:], "checksum"),
    (lambda b: b[:24] + b"X" + b[25:], "checksum"),  # the CRC catches a flipped op first
    (lambda b: b[:12], "header"),
])
def test_damaged_traces_are_refused_naming_the_field(accel, mutate, field):
    with pytest.raises(FormatError) as info:
        t.decode_trace(mutate(GOLDEN))
    assert info.value.field == field


def test_an_op_that_is_neither_read_nor_write_is_refused(accel):
    bad = b"X" + REC_1[1:]
    data = t.TraceHeader(24, crc32c_raw_bitwise(bad)).pack() + bad
    with pytest.raises(FormatError) as info:
        t.decode_trace(data)
    assert info.value.field == "op" and info.value.offset == 24


@given(st.lists(st.tuples(st.sampled_from("RW"), st.integers(0, 2**32 - 1),
                          st.integers(0, 2**64 - 1), st.integers(-(2**63), 2**63 - 1)),
                max_size=50))
def test_round_trip(records):
    values = tuple(t.TraceRecord(*r) for r in records)
    data = t.encode_trace(values)
    assert len(data) == 24 + 24 * len(values)
    assert t.decode_trace(data).records == values


def test_prefetch_input_detection():
    assert isinstance(t.decode_prefetch_input(GOLDEN), t.TraceFile)
    listed = t.decode_prefetch_input(b"/usr/bin/python3\n\n/usr/lib/python3/dist-packages/\n")
    assert listed == t.PriorityList(("/usr/bin/python3", "/usr/lib/python3/dist-packages/"))
    with pytest.raises(FormatError):
        t.decode_prefetch_input(b"")  # empty means "record" to the original
    with pytest.raises(FormatError):
        t.decode_prefetch_input(b"relative/path\n")
    with pytest.raises(FormatError):
        t.decode_prefetch_input(b"/x\n" * (t.MAX_PRIORITY_LIST // 3 + 1))
    with pytest.raises(FormatError):
        t.decode_prefetch_input(b"/\xff\xfe\n")
    assert t.encode_priority_list(["/a", "/b/"]) == b"/a\n/b/\n"


def test_acceleration_layer_is_a_tar_with_one_member_named_trace():
    blob = t.acceleration_layer_tar(GOLDEN)
    assert blob == t.acceleration_layer_tar(GOLDEN)  # reproducible: same digest every time
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        (member,) = tar.getmembers()
        assert member.name == "trace" and member.size == len(GOLDEN) and member.mtime == 0
    assert t.trace_from_acceleration_layer(blob) == GOLDEN
    # A tar written by another tool (GNU format, ./ prefix, an extra member) is read too.
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("./README", b"x"), ("./trace", GOLDEN)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert t.trace_from_acceleration_layer(out.getvalue()) == GOLDEN
    with pytest.raises(FormatError):
        t.trace_from_acceleration_layer(b"not a tar" * 100)


def _log_text() -> str:
    header = t.TraceLogHeader(64 << 30, (t.LayerInfo(0, "sha256:" + "a" * 64, 1000, 8192,
                                                     "zfile", 4096),
                                         t.LayerInfo(1, "sha256:" + "b" * 64, 900, 8192,
                                                     "lsmt", None)),
                              1700000000.5, "overlaybd-py test")
    events = [
        t.ReadEvent(1, 0.001, 0.012, 4096, 4096, (t.ReadPiece(0, 4096, 4096, 1, 1),), 1, 512),
        t.FetchEvent(1, 0.002, 0.010, 0, 600, 512, "read", 1),
        t.ReadEvent(2, 0.02, 0.0001, 0, 512, (t.ReadPiece(1, 0, 512),)),
        t.FetchEvent(2, 0.03, 0.01, 1, 0, 900, "prefetch", None, ok=False),
        t.EndEvent(0.5),
    ]
    return "\n".join(t.encode_event(e) for e in [header, *events]) + "\n"


def test_event_log_round_trip():
    log = t.decode_events(_log_text())
    assert log.header.layers[1].chunk_size is None
    assert [e.cache for e in log.reads] == ["fetch", "hit"]
    assert log.reads[0].pieces == (t.ReadPiece(0, 4096, 4096, 1, 1),)
    assert [f.origin for f in log.fetches] == ["read", "prefetch"]
    assert log.fetches[1].ok is False
    assert log.end == t.EndEvent(0.5)
    assert '"cache":"fetch"' in _log_text().splitlines()[1]


@pytest.mark.parametrize("text", [
    "",
    '{"type":"read","id":1}\n',  # no header first
    _log_text().replace('"version":1', '"version":99'),
    _log_text().replace('"offset":4096', '"offset":"x"'),
    _log_text() + "not json\n",
    _log_text() + '{"type":"bogus"}\n',
])
def test_bad_event_logs_are_refused(text):
    with pytest.raises(FormatError):
        t.decode_events(text)

"""LSMT header/trailer and segment records against the original tools' files."""

from __future__ import annotations

import struct

import pytest

from overlaybd_py.errors import CorruptLayerError, FormatError, UnsupportedFormatError
from overlaybd_py.formats import lsmt
from overlaybd_py.formats.lsmt import LsmtHeader, Segments
from tests.fixtures.testdata import sample_bytes

# (file, header flags, trailer flags, index_offset, index_size, valid records, message)
SEALED = [
    ("l0.commit", 0x7, 0x6, 629760, 256, 14, b"layer0 mkfs"),
    ("l1.commit", 0x7, 0x6, 1445888, 256, 10, b"layer1 apply"),
    ("empty.commit", 0x7, 0x6, 4096, 0, 0, b"layer1 apply"),
]

# Hand-written 16-byte records (lo, hi words) and the fields they carry: both directions.
RECORDS = [
    # offset, length, moffset, zeroed, tag
    ((0, 256, 8, 0, 0), bytes.fromhex("0000000000000004" "0800000000000000")),
    ((1024, 256, 264, 0, 0), bytes.fromhex("0004000000000004" "0801000000000000")),
    ((5192, 1, 2, 0, 1), bytes.fromhex("4814000000000400" "0200000000000001")),
    ((2**50 - 2, 16383, 2**55 - 1, 1, 255),
     struct.pack("<QQ", (2**50 - 2) | (16383 << 50), (2**55 - 1) | (1 << 55) | (255 << 56))),
]


@pytest.mark.parametrize("name,hflags,tflags,index_offset,index_size,valid,message", SEALED)
def test_sealed_samples(accel, name, hflags, tflags, index_offset, index_size, valid, message):
    data = sample_bytes(name)
    header = LsmtHeader.unpack(data[:4096])
    trailer = LsmtHeader.unpack(data[-4096:], len(data) - 4096)
    assert (header.flags, trailer.flags) == (hflags, tflags)
    assert header.is_header and header.is_sealed and header.is_data_file
    assert not trailer.is_header and trailer.is_sealed
    assert (trailer.index_offset, trailer.index_size) == (index_offset, index_size)
    assert trailer.virtual_size == header.virtual_size == 1 << 30
    assert trailer.uuid == lsmt.NULL_UUID and trailer.parent_uuid == lsmt.NULL_UUID
    assert trailer.user_tag == message and (trailer.version, trailer.sub_version) == (1, 1)
    lsmt.check_trailer(trailer, len(data))
    segments = lsmt.parse_sealed_index(data[index_offset : index_offset + 16 * index_size],
                                       trailer)
    assert len(segments) == valid
    # The slots round-trip byte for byte.
    assert header.pack() == data[:4096]
    assert trailer.pack() == data[-4096:]


def test_l1_records_exact(accel):
    data = sample_bytes("l1.commit")
    trailer = LsmtHeader.unpack(data[-4096:])
    segments = lsmt.parse_sealed_index(data[trailer.index_offset : -4096], trailer)
    assert list(segments.records())[:3] == [
        (0, 256, 8, 0, 0), (1024, 256, 264, 0, 0), (5120, 512, 520, 0, 0)]
    # Re-encoding the valid records and padding gives back the stored index.
    padded = segments.encode() + struct.pack("<QQ", lsmt.INVALID_OFFSET, 0) * (256 - 10)
    assert padded == data[trailer.index_offset : trailer.index_offset + 4096]


@pytest.mark.parametrize("fields,raw", RECORDS)
def test_record_table_both_directions(accel, fields, raw):
    decoded = Segments.from_columns(accel.decode_segments(raw))
    assert list(decoded.records()) == [fields]
    table = Segments()
    table.append(*fields)
    assert table.encode() == raw


def test_padding_records_are_skipped(accel):
    raw = RECORDS[0][1] + struct.pack("<QQ", lsmt.INVALID_OFFSET, 0) + RECORDS[1][1]
    assert len(Segments.from_columns(accel.decode_segments(raw))) == 2


def test_baselayer_index_has_8323_valid_segments(accel):
    # The 64 GiB base layer is a ZFile; its LSMT trailer and index were checked through the
    # engine in the component tests. Here: the record count through the pure codec path.
    from tests.unit.test_zfile import decode_whole

    plain = decode_whole("baselayer-ext4_64.zfile")
    trailer = LsmtHeader.unpack(plain[-4096:], len(plain) - 4096)
    assert trailer.uuid == "C02FB491-B4D4-4904-8684-A014D032AF78"
    assert trailer.virtual_size == 64 << 30 and trailer.index_size == 8448
    segments = lsmt.parse_sealed_index(
        plain[trailer.index_offset : trailer.index_offset + 16 * trailer.index_size], trailer)
    assert len(segments) == 8323


def test_turbo_oci_layer_is_refused(accel):
    data = sample_bytes("t1.commit")
    trailer = LsmtHeader.unpack(data[-4096:])
    assert trailer.index_size == 15  # not padded: a turboOCI commit
    with pytest.raises(UnsupportedFormatError, match="turboOCI"):
        lsmt.parse_sealed_index(data[trailer.index_offset : -4096], trailer)


def _corrupt(slot: bytes, offset: int, value: bytes) -> bytes:
    return slot[:offset] + value + slot[offset + len(value):]


@pytest.mark.parametrize("offset,value,field", [
    (0, b"XSMT", "magic0"),
    (8, b"\x00" * 4, "magic1"),
    (24, struct.pack("<I", 391), "size"),
    (48, struct.pack("<Q", 1000), "virtual_size"),
    (32, struct.pack("<Q", 4097), "index_offset"),
    (56, b"not-a-uuid", "uuid"),
    (93, b"\xff\xfe", "parent_uuid"),
])
def test_corrupt_header_fields_name_the_field(offset, value, field):
    slot = sample_bytes("l1.commit")[-4096:]
    with pytest.raises(CorruptLayerError) as info:
        LsmtHeader.unpack(_corrupt(slot, offset, value), 1000)
    assert info.value.field == field
    assert info.value.offset is not None and info.value.offset >= 1000


@pytest.mark.parametrize("changes,message", [
    (dict(flags=0x7), "flags"),
    (dict(flags=0x2), "flags"),
    (dict(index_size=2_000_000), "limit"),
    (dict(index_offset=0), "outside"),
    (dict(index_size=300), "runs into the trailer"),
])
def test_trailer_checks(changes, message):
    data = sample_bytes("l1.commit")
    trailer = LsmtHeader.unpack(data[-4096:])
    from dataclasses import replace

    with pytest.raises(CorruptLayerError, match=message):
        lsmt.check_trailer(replace(trailer, **changes), len(data))


def test_index_validation(accel):
    data = sample_bytes("l1.commit")
    trailer = LsmtHeader.unpack(data[-4096:])
    index = bytearray(data[trailer.index_offset : trailer.index_offset + 4096])
    # swap the first two records: disordered
    swapped = index[16:32] + index[0:16] + index[32:]
    with pytest.raises(CorruptLayerError, match=r"record #1.*overlaps or precedes"):
        lsmt.parse_sealed_index(bytes(swapped), trailer)
    # a record pointing past the data area
    bad = Segments()
    bad.append(0, 8, trailer.index_offset // 512)
    raw = bad.encode() + bytes(index[16:])
    with pytest.raises(CorruptLayerError, match="outside the data area"):
        lsmt.parse_sealed_index(raw, trailer)
    # a record pointing into the header
    bad = Segments()
    bad.append(0, 8, 2)
    with pytest.raises(CorruptLayerError, match="outside the data area"):
        lsmt.parse_sealed_index(bad.encode() + bytes(index[16:]), trailer)
    # wrong length
    with pytest.raises(FormatError, match="wrong length"):
        lsmt.parse_sealed_index(bytes(index[:-16]), trailer)


def test_writable_log_of_l1(accel):
    data, index = sample_bytes("l1.data"), sample_bytes("l1.index")
    header = LsmtHeader.unpack(index[:4096])
    assert header.flags == 0x1 and header.index_offset == 4096
    assert header.uuid == "CF94EAAE-EC1F-485E-A241-08CD1EB86BD9"
    log = lsmt.parse_writable_log(index[4096:], len(data))
    assert len(log) == 12
    assert set(log.tag) == {0}  # on-disk tag 1 is ignored
    with pytest.raises(CorruptLayerError, match="torn"):
        lsmt.parse_writable_log(index[4096:-3], len(data))
    with pytest.raises(CorruptLayerError, match="outside the data file"):
        lsmt.parse_writable_log(index[4096:], 8192)


def test_pack_rejects_long_user_tag():
    with pytest.raises(ValueError, match="256"):
        LsmtHeader(flags=7, user_tag=b"x" * 257).pack()


def test_commit_refuses_more_records_than_a_sealed_layer_may_hold():
    from overlaybd_py.errors import UsageError
    from overlaybd_py.formats.lsmt_commit import plan_commit

    table = Segments()
    for i in range(1_000_001):
        table.append(2 * i, 1, 8 + i)
    with pytest.raises(UsageError, match="at most 1000000 index records"):
        plan_commit(table, virtual_size=1 << 40)


def _plan_records(mappings, merge_runs):
    """The sealed index of ``mappings`` and, per sector of the sealed data, the layer sector
    whose bytes land there (data copied in the plan's order); checks that every data record
    points at its own sectors."""
    from overlaybd_py.formats.lsmt import SECTOR, LsmtHeader, parse_sealed_index
    from overlaybd_py.formats.lsmt_commit import plan_commit

    table = Segments()
    source = {}  # writable data file sector -> layer sector it holds
    for offset, length, moffset, zeroed in mappings:
        table.append(offset, length, moffset, zeroed)
        if not zeroed:
            source.update({moffset + i: offset + i for i in range(length)})
    plan = plan_commit(table, virtual_size=1 << 40, merge_runs=merge_runs)
    sealed = [source[start // SECTOR + i] for start, n in plan.copies for i in range(n // SECTOR)]
    base = lsmt.HT_SPACE // SECTOR
    for offset, length, moffset, zeroed, _ in parse_sealed_index(
            plan.index, LsmtHeader.unpack(plan.trailer)).records():
        if not zeroed:
            assert sealed[moffset - base : moffset - base + length] == \
                list(range(offset, offset + length))
    return plan.index, sealed


@pytest.mark.parametrize("seed", range(20))
def test_commit_with_merge_runs_does_not_depend_on_how_the_writes_were_split(seed):
    """The converter's seal: the same bytes written in other splits and another order
    (data file positions differ), and zeroed ranges split differently, seal into the same
    records and the same data; the original's cut does not."""
    import random

    rnd = random.Random(seed)
    # (start, length, zeroed) in sectors: runs past the merge limit, a gap, touching kinds
    runs = [(0, 20_000, 0), (20_000, 17_000, 1), (37_000, 300, 0), (40_000, 17_000, 0),
            (57_000, 100, 1)]
    whole, split, writes = [], [], []  # whole: cut at 16,000 sectors; split: at random
    moffset = 8
    for start, length, zeroed in runs:
        for a in range(0, length, 16_000):  # a writable mapping holds at most 16383 sectors
            n = min(16_000, length - a)
            whole.append((start + a, n, 0 if zeroed else moffset, zeroed))
            moffset += 0 if zeroed else n
        cuts = sorted(rnd.sample(range(1, length), 3))
        pieces = [(start + a, b - a) for a, b in zip([0, *cuts], [*cuts, length], strict=True)]
        if zeroed:
            split.extend((offset, n, 0, 1) for offset, n in pieces)
        else:
            writes.extend(pieces)
    rnd.shuffle(writes)  # written in another order: data file positions differ
    position = 8
    for offset, length in writes:
        split.append((offset, length, position, 0))
        position += length
    split.sort()
    assert _plan_records(split, merge_runs=True) == _plan_records(whole, merge_runs=True)
    assert _plan_records(split, merge_runs=False)[0] != _plan_records(whole, merge_runs=False)[0]


def test_commit_merge_runs_keeps_gaps_and_kinds_apart():
    mappings = [(0, 100, 8, 0), (100, 50, 0, 1), (150, 100, 108, 0), (300, 64, 208, 0)]
    assert _plan_records(mappings, merge_runs=True) == _plan_records(mappings, merge_runs=False)

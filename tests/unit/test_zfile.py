"""ZFile header/trailer, jump table, chunk checks and the builder, against the samples."""

from __future__ import annotations

import struct

import pytest

from overlaybd_py import _accel
from overlaybd_py.errors import CorruptLayerError, FormatError, UnsupportedFormatError
from overlaybd_py.formats import zfile
from overlaybd_py.formats.zfile import ZFileHeader, ZFileIndex
from tests.fixtures.testdata import sample_bytes

# file, header flags, algorithm, chunk size, header overwrite
VARIANTS = [
    ("l1.lz4.hdrov.zfile", 0x1B, zfile.ALGO_LZ4, 4096, True),
    ("l1.zstd64k.zfile", 0x1B, zfile.ALGO_ZSTD, 65536, True),
    ("l1.commit.lz4.zfile", 0x13, zfile.ALGO_LZ4, 4096, False),
    ("l1.commit.zstd.zfile", 0x13, zfile.ALGO_ZSTD, 4096, False),
]


def open_index(data: bytes) -> ZFileIndex:
    header = zfile.parse_header(data[:512])
    ht = zfile.index_header(header, data[-512:], len(data))
    return ZFileIndex.parse(ht, data[ht.index_offset : ht.index_offset + 4 * ht.index_size])


def decode_whole(name: str) -> bytes:
    data = sample_bytes(name)
    index = open_index(data)
    out = []
    step = 4096
    for first in range(0, index.chunks, step):
        last = min(first + step, index.chunks) - 1
        offset, length = index.compressed_span(first, last)
        out.append(zfile.decode_chunks(index, first, data[offset : offset + length],
                                       last - first + 1))
    return b"".join(out)


@pytest.mark.parametrize("name,flags,algorithm,chunk_size,overwrite", VARIANTS)
def test_variants_decode_to_l1_commit(accel, name, flags, algorithm, chunk_size, overwrite):
    data = sample_bytes(name)
    header = zfile.parse_header(data[:512])
    assert header.flags == flags
    assert header.flag(zfile.FLAG_OVERWRITE) == overwrite
    trailer = ZFileHeader.unpack(data[-512:], len(data) - 512)
    assert trailer.flags == 0x16
    index = open_index(data)
    assert index.header.algorithm == algorithm and index.chunk_size == chunk_size
    assert index.original_size == len(sample_bytes("l1.commit"))
    assert decode_whole(name) == sample_bytes("l1.commit")
    # Slots round-trip (digest recomputed by pack).
    assert trailer.pack() == data[-512:]
    assert header.pack() == data[:512]


def test_old_style_base_layer(accel):
    data = sample_bytes("baselayer-ext4_64.zfile")
    header = zfile.parse_header(data[:512])
    assert header.flags >> 32  # garbage in the upper bits...
    assert not header.flag(zfile.FLAG_DIGEST) and not header.flag(zfile.FLAG_OVERWRITE)
    index = open_index(data)  # ...yet it reads: only single bits are tested
    assert index.chunks == 132309 and index.header.verify
    plain = decode_whole("baselayer-ext4_64.zfile")
    assert len(plain) == index.original_size
    assert plain[:8] == b"LSMT\x00\x01\x02\x00"


def test_compressed_range_maps_through_the_jump_table():
    data = sample_bytes("l1.lz4.hdrov.zfile")
    index = open_index(data)
    assert index.chunk_range(0, 1) == (0, 0)
    assert index.chunk_range(4095, 2) == (0, 1)
    assert index.chunk_range(4096 * 10, 4096 * 3) == (10, 12)
    offset, length = index.compressed_range(4096 * 10, 4096 * 3)
    assert offset == index.starts[10] and length == index.starts[13] - index.starts[10]
    assert index.compressed_range(0, 4096)[0] == 512  # chunks start right after the header
    # past the end: clamped, nothing to fetch
    assert index.compressed_range(index.original_size, 100)[1] == 0
    last = index.chunks - 1
    assert index.chunk_length(last) == index.original_size - last * 4096


def test_builder_reproduces_the_structure(accel):
    """Our ZFiles differ from the original's only where the compressor output differs."""
    source = sample_bytes("l1.commit")
    for name, _flags, algorithm, chunk_size, overwrite in VARIANTS:
        ref = sample_bytes(name)
        builder = zfile.ZFileBuilder(algorithm, chunk_size)
        out = bytearray(builder.head())
        for pos in range(0, len(source), 100_000):
            out += builder.add(source[pos : pos + 100_000])
        out += builder.finish()
        if overwrite:
            out[:512] = builder.overwrite_header()
        ours, theirs = open_index(bytes(out)), open_index(ref)
        assert ours.chunks == theirs.chunks and ours.original_size == theirs.original_size
        for field in ("flags", "block_size", "algorithm", "level", "verify", "dict_size"):
            assert getattr(ours.header, field) == getattr(theirs.header, field), field
        if not overwrite:
            assert out[:512] == ref[:512]  # the trailer-only header has no payload fields
        whole = zfile.decode_chunks(ours, 0, out[ours.starts[0] : ours.starts[-1]], ours.chunks)
        assert whole == source
        if out == ref:
            continue
        # Only payload-dependent bytes may differ: chunk payloads, CRCs, table, checksums.
        assert algorithm == zfile.ALGO_LZ4 or accel.__name__.endswith("_pure"), name


def test_native_zstd_is_byte_identical_to_the_original(accel):
    if accel.__name__.endswith("_pure"):
        pytest.skip("python-zstandard bundles zstd 1.5.7; the original used Debian's 1.5.4")
    source = sample_bytes("l1.commit")
    builder = zfile.ZFileBuilder(zfile.ALGO_ZSTD, 4096)
    out = builder.head() + builder.add(source) + builder.finish()
    assert out == sample_bytes("l1.commit.zstd.zfile")


@pytest.mark.parametrize("algorithm, level", [(zfile.ALGO_LZ4, 9), (zfile.ALGO_ZSTD, 19)])
def test_a_higher_level_is_smaller_and_decodes_the_same(accel, algorithm, level):
    """LZ4 HC and high zstd levels write chunks any reader decodes (same block format)."""
    source = sample_bytes("l1.commit")

    def build(level: int) -> bytes:
        builder = zfile.ZFileBuilder(algorithm, 16384, level=level)
        return builder.head() + builder.add(source) + builder.finish()

    default, higher = build(0), build(level)
    assert len(higher) < len(default)
    index = open_index(higher)
    assert index.header.level == level and open_index(default).header.level == 0
    body = higher[index.starts[0] : index.starts[-1]]
    assert zfile.decode_chunks(index, 0, body, index.chunks) == source


@pytest.mark.parametrize("algorithm, level", [
    (zfile.ALGO_LZ4, 13), (zfile.ALGO_ZSTD, 23), (zfile.ALGO_LZ4, -1)])
def test_levels_out_of_range_are_refused(accel, algorithm, level):
    name = zfile.ALGORITHM_NAMES[algorithm]
    with pytest.raises(ValueError, match=f"{name} compression level must be 0-"):
        zfile.ZFileBuilder(algorithm, 4096, level=level)
    with pytest.raises(ValueError, match=f"{name} compression level must be 0-"):
        accel.zfile_encode(b"x" * 5000, algorithm, True, 4096, level)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x40]) + data[offset + 1 :]


def test_header_digest_detects_any_flipped_byte():
    data = sample_bytes("l1.lz4.hdrov.zfile")
    for offset in (33, 40, 64, 72, 100, 511):
        with pytest.raises(CorruptLayerError) as info:
            zfile.parse_header(_flip(data, offset)[:512])
        assert info.value.field in ("digest", "flags")


def test_corrupt_chunk_is_named(accel):
    data = sample_bytes("l1.commit.lz4.zfile")
    index = open_index(data)
    offset, length = index.compressed_span(0, index.chunks - 1)
    bad = _flip(data, index.starts[7] + 3)
    with pytest.raises(CorruptLayerError, match="chunk 7: checksum mismatch") as info:
        zfile.decode_chunks(index, 0, bad[offset : offset + length], index.chunks)
    assert info.value.offset == index.starts[7]


def test_corrupt_jump_table_and_trailer():
    data = sample_bytes("l1.commit.lz4.zfile")
    ht = zfile.index_header(zfile.parse_header(data[:512]), data[-512:], len(data))
    table = bytearray(data[ht.index_offset : ht.index_offset + 4 * ht.index_size])
    table[5] ^= 1
    with pytest.raises(CorruptLayerError, match="jump table: checksum"):
        ZFileIndex.parse(ht, bytes(table))
    with pytest.raises(CorruptLayerError, match="wrong length"):
        ZFileIndex.parse(ht, bytes(table[:-4]))
    with pytest.raises(CorruptLayerError):
        zfile.index_header(zfile.parse_header(data[:512]), _flip(data, len(data) - 512 + 44)[-512:],
                           len(data))
    with pytest.raises(CorruptLayerError, match="too small"):
        zfile.index_header(zfile.parse_header(data[:512]), data[-512:], 600)


def _slot(**fields) -> bytes:
    base = dict(flags=zfile.FLAG_DATA | zfile.FLAG_SEALED | zfile.FLAG_DIGEST,
                index_offset=1024, index_size=1, original_size=4096, block_size=4096)
    base.update(fields)
    return ZFileHeader(**base).pack()


@pytest.mark.parametrize("fields,error,match", [
    (dict(algorithm=0), UnsupportedFormatError, "algorithm"),
    (dict(algorithm=9), UnsupportedFormatError, "algorithm"),
    (dict(block_size=3000), CorruptLayerError, "block_size"),
    (dict(block_size=131072, original_size=131072), CorruptLayerError, "block_size"),
    (dict(dict_size=16), UnsupportedFormatError, "dictionaries"),
    (dict(index_size=5), CorruptLayerError, "original_size"),
    (dict(index_offset=100), CorruptLayerError, "inside the header"),
    (dict(flags=zfile.FLAG_DATA | zfile.FLAG_SEALED | zfile.FLAG_DIGEST | zfile.FLAG_IDX_COMP),
     UnsupportedFormatError, "compressed jump table"),
    (dict(flags=zfile.FLAG_DATA | zfile.FLAG_DIGEST), CorruptLayerError, "sealed"),
])
def test_trailer_field_checks(fields, error, match):
    head = ZFileHeader(flags=zfile.FLAG_HEADER | zfile.FLAG_DATA).pack()
    with pytest.raises(error, match=match):
        zfile.index_header(zfile.parse_header(head), _slot(**fields), 4096)


def test_decode_rejects_wrong_buffer_length():
    data = sample_bytes("l1.commit.lz4.zfile")
    index = open_index(data)
    with pytest.raises(FormatError, match="wrong number of bytes"):
        zfile.decode_chunks(index, 0, data[512:600], 1)


def test_salted_crc_of_a_sample_chunk():
    # The CRC stored after chunk 0's payload is the raw CRC32C seeded with 100007.
    data = sample_bytes("l1.commit.lz4.zfile")
    index = open_index(data)
    start, end = index.starts[0], index.starts[1]
    (stored,) = struct.unpack("<I", data[end - 4 : end])
    assert _accel.crc32c(data[start : end - 4], zfile.CHUNK_CRC_SEED) == stored

"""Parity of the accelerator backends: the C extension ``_native`` against ``_pure``.

For every function, on random inputs, the native twin must return bit-identical results
(same values, same container and array types) or raise the same exception as the
reference. The one allowed difference: compressed payloads from ``zfile_encode``, since
the backends link different builds of lz4/zstd; there each backend's output must decode
(with either backend) to the input and be self-consistent.
"""

from __future__ import annotations

import inspect
import random
import struct
import threading
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlaybd_py import _accel, _pure
from overlaybd_py.formats import zfile
from tests.fixtures.system import need
from tests.fixtures.testdata import sample_bytes

try:
    NATIVE = _accel.backend_module("native")
except ImportError:
    NATIVE = None

FUNCTIONS = [name for name in _pure.__all__ if name != "INVALID_OFFSET"]
INVALID = _pure.INVALID_OFFSET
SEED = zfile.CHUNK_CRC_SEED
ALGORITHMS = (zfile.ALGO_LZ4, zfile.ALGO_ZSTD)
CHUNK_SIZES = zfile.CHUNK_SIZES
MAX_LENGTH = 16383
TYPECODES = ("Q", "I", "Q", "B", "B")

FAST = settings(max_examples=100, deadline=None)
TABLES = settings(max_examples=60, deadline=None)  # merge/lookup: drawing tables costs
SLOW = settings(max_examples=40, deadline=None)  # zfile: up to 128 KiB per example


@pytest.fixture(scope="module")
def native():
    need(NATIVE is not None, "native extension not built (needs gcc, liblz4-dev, libzstd-dev)")
    return NATIVE


# ---------------------------------------------------------------- comparing outcomes


def plain(value):
    """A value with its exact types spelled out, so == also compares array typecodes."""
    if isinstance(value, array):
        return ("array", value.typecode, value.tolist())
    if isinstance(value, tuple | list):
        return (type(value).__name__, [plain(v) for v in value])
    return (type(value).__name__, value)


def outcome(module, name, args, exact_error=False):
    try:
        return "returns", plain(getattr(module, name)(*args))
    except Exception as exc:
        return "raises", type(exc), exc.args if exact_error else None


def same(native, name, *args, exact_error=False):
    """Run both backends; they must return the same value or raise the same exception."""
    want = outcome(_pure, name, args, exact_error)
    got = outcome(native, name, args, exact_error)
    assert got == want, f"{name}: native {got!r} != pure {want!r}"
    return want


# ---------------------------------------------------------------- strategies


@st.composite
def tables(draw, max_records=20, near_limit=True):
    """A sorted, non-overlapping layer table with gaps and zeroed records; sometimes it
    sits just below 2^50 sectors (where INVALID_OFFSET lives)."""
    bases = [0, 0, 0, (1 << 50) - 40_000] if near_limit else [0]
    offset = draw(st.sampled_from(bases)) + draw(st.integers(0, 64))
    columns = [array(t) for t in TYPECODES]
    for _ in range(draw(st.integers(0, max_records))):
        length = draw(st.one_of(st.integers(1, 40), st.sampled_from([1, 8, 128, MAX_LENGTH])))
        record = (
            offset,
            length,
            draw(st.one_of(st.integers(0, 5000), st.integers(0, (1 << 55) - 1))),
            int(draw(st.integers(0, 3)) == 0),
            draw(st.integers(0, 255)),
        )
        for column, value in zip(columns, record, strict=True):
            column.append(value)
        offset += length + draw(st.sampled_from([0, 0, 0, 1, 7, 300]))
    return tuple(columns)


def as_buffer(draw, column: array):
    """The same column as another accepted object: memoryview, bytes, list, other arrays."""
    choices = ["array", "memoryview", "list"]
    if column.itemsize == 1:
        choices += ["bytes", "bytearray"]
    if column.typecode == "Q":
        choices += ["array-L", "cast"]
    kind = draw(st.sampled_from(choices))
    if kind == "memoryview":
        return memoryview(column)
    if kind == "list":
        return column.tolist()
    if kind == "bytes":
        return column.tobytes()
    if kind == "bytearray":
        return bytearray(column.tobytes())
    if kind == "array-L":
        return array("L", column)
    if kind == "cast":
        return memoryview(column.tobytes()).cast("Q")
    return column


@st.composite
def hostile_columns(draw):
    """Unsorted, overlapping, ragged columns with values up to the type limits."""

    def column(bits):
        limit = (1 << bits) - 1
        return draw(st.lists(st.one_of(st.integers(0, min(300, limit)), st.integers(0, limit)),
                             max_size=10))

    return (array("Q", column(64)), array("I", column(32)), array("Q", column(64)),
            array("B", column(8)), array("B", column(8)))


def chunk_data(seed: int, size: int) -> bytes:
    """Bytes that compress unevenly: zero runs, random runs and repeated text."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.randrange(3)
        run = rng.randrange(1, 6000)
        if kind == 0:
            out += bytes(run)
        elif kind == 1:
            out += rng.randbytes(min(run, 1500))
        else:
            out += (b"overlaybd %d " % rng.randrange(1000)) * (run // 12 + 1)
    return bytes(out[:size])


@st.composite
def chunk_inputs(draw):
    chunk = draw(st.sampled_from(CHUNK_SIZES))
    size = draw(st.one_of(st.integers(0, 2 * chunk + 100), st.sampled_from([1, chunk])))
    data = chunk_data(draw(st.integers(0, 2**32)), size)
    return data, draw(st.sampled_from(ALGORITHMS)), draw(st.booleans()), chunk


def last_length(data: bytes, chunk: int) -> int:
    return len(data) - (len(data) - 1) // chunk * chunk if data else 0


# ---------------------------------------------------------------- API shape


def test_same_api(native):
    for name in FUNCTIONS:
        ours = inspect.signature(getattr(native, name)).parameters
        theirs = inspect.signature(getattr(_pure, name)).parameters
        assert [(p.name, p.kind, p.default) for p in ours.values()] == [
            (p.name, p.kind, p.default) for p in theirs.values()
        ], name
    assert native.INVALID_OFFSET == INVALID
    assert isinstance(native.FEATURES, tuple)
    assert all(isinstance(f, str) for f in native.FEATURES)
    assert {"lz4", "zstd"} <= set(native.FEATURES)
    assert any(f.startswith("crc32c-") for f in native.FEATURES)


def test_keyword_arguments(native):
    assert native.crc32c(data=b"abc", seed=7) == _pure.crc32c(b"abc", 7)
    assert native.first_unsorted(lengths=array("I", [1]), offsets=array("Q", [0])) == -1
    with pytest.raises(TypeError):
        native.crc32c(b"abc", 1, 2)
    with pytest.raises(TypeError):
        native.crc32c(b"abc", bogus=1)
    with pytest.raises(TypeError):
        native.crc32c(b"abc", 1, seed=1)
    with pytest.raises(TypeError):
        native.lookup(array("Q"), array("I"), array("Q"), array("B"), 0)


# ---------------------------------------------------------------- crc32c


@FAST
@given(data=st.binary(max_size=2500), seed=st.integers(-(2**40), 2**40))
def test_crc32c(native, data, seed):
    same(native, "crc32c", data, seed)
    same(native, "crc32c", memoryview(bytearray(data)), seed)
    assert native._crc32c_portable(data, seed) == _pure.crc32c(data, seed)


@FAST
@given(data=st.binary(max_size=3000), block=st.integers(1, 700))
def test_crc32c_blocks(native, data, block):
    got = same(native, "crc32c_blocks", data, block)
    assert got == same(native, "crc32c_blocks", memoryview(bytearray(data)), block)
    pieces = [data[i : i + block] for i in range(0, len(data), block)]
    want = array("I", [_pure.crc32c(p) for p in pieces]).tobytes()
    assert native.crc32c_blocks(data, block) == want


def test_crc32c_blocks_rejects_bad_block_size(native):
    for block in (0, -4):
        same(native, "crc32c_blocks", b"abc", block)
    same(native, "crc32c_blocks", b"abc", "4")


def test_crc32c_known_values(native):
    # Standard CRC32C("123456789") is 0xE3069283: raw with seed ~0, inverted at the end.
    for crc in (native.crc32c, native._crc32c_portable, _pure.crc32c):
        assert crc(b"123456789", 0xFFFFFFFF) ^ 0xFFFFFFFF == 0xE3069283
        assert crc(b"") == 0 and crc(b"", 12345) == 12345
    big = random.Random(5).randbytes(3 << 20)  # the GIL-free path, every block size
    for size in (len(big), 1536 * 7 + 191, 192 * 3 + 5):
        assert native.crc32c(big[:size], SEED) == _pure.crc32c(big[:size], SEED)
        assert native._crc32c_portable(big[:size], SEED) == _pure.crc32c(big[:size], SEED)


# ---------------------------------------------------------------- segment records


@FAST
@given(table=tables(), data=st.data())
def test_encode_decode_segments(native, table, data):
    columns = [as_buffer(data.draw, c) for c in table]
    buf = same(native, "encode_segments", *columns)[1][1]
    same(native, "decode_segments", buf)
    same(native, "decode_segments", memoryview(bytearray(buf)))


@FAST
@given(records=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
                        max_size=12),
       padding=st.lists(st.integers(0, 12), max_size=4), tail=st.integers(0, 15))
def test_decode_segments_any_bytes(native, records, padding, tail):
    raw = [struct.pack("<QQ", lo, hi) for lo, hi in records]
    for at in padding:  # padding records, as sealed indexes carry them
        raw.insert(min(at, len(raw)), struct.pack("<QQ", INVALID | (5 << 50), 1 << 60))
    buf = b"".join(raw)
    same(native, "decode_segments", buf)
    same(native, "decode_segments", buf + bytes(tail))  # ValueError unless tail == 0


@FAST
@given(columns=hostile_columns())
def test_hostile_columns(native, columns):
    offsets, lengths, moffsets, zeroed, tags = columns
    same(native, "encode_segments", *columns)  # IndexError, struct.error or bytes
    same(native, "first_unsorted", offsets, lengths)
    same(native, "first_out_of_bounds", moffsets, lengths, zeroed, 8, 1 << 40)
    same(native, "merge", [columns])
    same(native, "merge", [columns, columns])
    same(native, "lookup", offsets, lengths, moffsets, tags, 4096, 1 << 20)
    same(native, "lookup", offsets, lengths, moffsets, tags, (1 << 73) - 1, 1 << 20)


# ---------------------------------------------------------------- sanity scans


@FAST
@given(table=tables(), low=st.integers(-5, 6000), span=st.integers(0, 1 << 56),
       data=st.data())
def test_scans(native, table, low, span, data):
    offsets, lengths, moffsets, zeroed, _ = (as_buffer(data.draw, c) for c in table)
    same(native, "first_unsorted", offsets, lengths)
    same(native, "first_out_of_bounds", moffsets, lengths, zeroed, low, low + span)
    same(native, "first_out_of_bounds", moffsets, lengths, zeroed, -(2**200), 2**200)
    if len(table[0]) > 1:  # swap two records: now unsorted
        swapped = [array(c.typecode, c) for c in table]
        for c in swapped:
            c[0], c[-1] = c[-1], c[0]
        same(native, "first_unsorted", swapped[0], swapped[1])


# ---------------------------------------------------------------- merge and lookup


@TABLES
@given(layers=st.lists(tables(max_records=12), max_size=6), data=st.data())
def test_merge(native, layers, data):
    same(native, "merge", layers)
    same(native, "merge", [tuple(as_buffer(data.draw, c) for c in layer) for layer in layers])


@st.composite
def lookups(draw, merged):
    offsets, lengths = merged[0], merged[1]
    first = offsets[0] * 512 if offsets else 0
    end = (offsets[-1] + lengths[-1]) * 512 if offsets else 1 << 20
    at = draw(st.one_of(
        st.integers(first - 8192, end + 65536),  # includes ranges past the last record
        st.tuples(st.sampled_from([first, end, end - 512, 0]), st.integers(-3, 3)).map(sum),
        st.integers(-(2**70), 2**70),
    ))
    length = draw(st.one_of(st.integers(-2, 20_000), st.sampled_from([0, 512, 4096, 1 << 30])))
    return at, length


@TABLES
@given(layers=st.lists(tables(max_records=12), min_size=0, max_size=5), data=st.data())
def test_lookup(native, layers, data):
    merged = _pure.merge(layers)
    offsets, lengths, moffsets, _, tags = merged
    for _ in range(8):
        at, length = data.draw(lookups(merged))
        pieces = same(native, "lookup", offsets, lengths, moffsets, tags, at, length)
        if length > 0:  # the pieces cover the range exactly
            assert sum(p[1][2][1] for p in pieces[1][1]) == length
    at, length = data.draw(lookups(merged))
    columns = [as_buffer(data.draw, c) for c in (offsets, lengths, moffsets, tags)]
    same(native, "lookup", *columns, at, length)


def test_lookup_rejects_absurd_ranges(native):
    columns = (array("Q", [0]), array("I", [8]), array("Q", [8]), array("B", [1]))
    assert native.lookup(*columns, 2**99, 2**99) == _pure.lookup(*columns, 2**99, 2**99)
    with pytest.raises(OverflowError):  # documented limit: |offset|, |length| < 2**100
        native.lookup(*columns, 0, 2**100)
    with pytest.raises(TypeError):
        native.lookup(*columns, 0.0, 512)


# ---------------------------------------------------------------- edge cases


def test_empty_inputs(native):
    empty = tuple(array(t) for t in TYPECODES)
    same(native, "crc32c", b"", 100007)
    same(native, "crc32c", bytearray())
    same(native, "decode_segments", b"")
    same(native, "decode_segments", memoryview(b""))
    same(native, "encode_segments", *empty)
    same(native, "first_unsorted", empty[0], empty[1])
    same(native, "first_out_of_bounds", empty[2], empty[1], empty[3], 0, 0)
    same(native, "merge", [])
    same(native, "merge", ())
    same(native, "merge", [empty])
    same(native, "merge", [empty, empty, empty])
    same(native, "lookup", empty[0], empty[1], empty[2], empty[4], 0, 0)
    same(native, "lookup", empty[0], empty[1], empty[2], empty[4], 123, 4096)
    for algorithm in (*ALGORITHMS, 7):
        for verify in (False, True):
            same(native, "zfile_decode", b"", array("I"), algorithm, verify, 4096, 0)
    for algorithm in ALGORITHMS:
        same(native, "zfile_encode", b"", algorithm, True, 4096)
        same(native, "zfile_encode", bytearray(), algorithm, False, 65536)


def test_malformed_arguments(native):
    same(native, "decode_segments", b"\0" * 17)
    same(native, "decode_segments", bytearray(31))
    with pytest.raises(ValueError, match="multiple of 16"):
        native.decode_segments(b"\0" * 15)
    table = (array("Q", [1]), array("I", [2]), array("Q", [3]), array("B", [0]), array("B", [0]))
    same(native, "merge", [table[:4]])  # ValueError: not enough values to unpack
    same(native, "merge", [(*table, table[0])])  # too many values
    same(native, "merge", [table] * 257)  # the tag is 8 bits
    assert plain(native.merge(iter([table, table]))) == plain(_pure.merge(iter([table, table])))
    same(native, "zfile_encode", b"abc", 1, True, 0)  # ValueError from range()
    same(native, "zfile_encode", b"abc", 1, True, -4096)  # no chunks
    # Compression levels: refused (same message) only when there is something to compress.
    for algorithm, level in ((1, 13), (2, 23), (1, -1), (2, 2**64)):
        same(native, "zfile_encode", b"abc", algorithm, True, 4096, level, exact_error=True)
        same(native, "zfile_encode", b"", algorithm, True, 4096, level)
    same(native, "zfile_encode", b"abc", 1, True, -4096, 99)  # no chunks: nothing to refuse
    same(native, "zfile_encode", b"abc", 1, True, 0, 99)  # range() speaks first
    same(native, "zfile_encode", b"abc", 1, True, 4096, 5.0)  # TypeError
    same(native, "zfile_encode", b"", 1, True, 4096, "9")  # TypeError
    same(native, "crc32c", "text")
    same(native, "zfile_decode", "text", array("I"), 1, True, 4096, 0)


def test_maximum_length_field(native):
    longest = (array("Q", [5]), array("I", [MAX_LENGTH]), array("Q", [9]), array("B", [0]),
               array("B", [3]))
    buf = same(native, "encode_segments", *longest)[1][1]
    assert struct.unpack("<QQ", buf) == (5 | MAX_LENGTH << 50, 9 | 3 << 56)
    same(native, "decode_segments", buf)
    too_long = (longest[0], array("I", [MAX_LENGTH + 1]), *longest[2:])
    with pytest.raises(struct.error):
        native.encode_segments(*too_long)
    same(native, "encode_segments", *too_long)
    merged = same(native, "merge", [longest, longest])
    assert merged[1][1][1] == ("array", "I", [MAX_LENGTH])


def test_offsets_near_2_to_the_50(native):
    top = INVALID - 1  # the last valid sector; INVALID_OFFSET itself marks padding
    records = [(top - 100, 100, 7, 0, 0), (top, 1, 9, 0, 0), (INVALID, 0, 0, 0, 0),
               (INVALID, 3, 5, 1, 2)]
    buf = b"".join(struct.pack("<QQ", o | n << 50, m | z << 55 | t << 56)
                   for o, n, m, z, t in records)
    decoded = same(native, "decode_segments", buf)
    assert decoded[1][1][0] == ("array", "Q", [top - 100, top])
    layer = native.decode_segments(buf)
    under = (array("Q", [top - 200]), array("I", [MAX_LENGTH]), array("Q", [1]),
             array("B", [0]), array("B", [0]))
    merged = same(native, "merge", [under, layer])
    offsets, lengths, moffsets, _, tags = native.merge([under, layer])
    for at in (top * 512 - 1000, top * 512, INVALID * 512 - 1, INVALID * 512, (top - 300) * 512):
        for length in (1, 512, 4096, 1 << 20):
            same(native, "lookup", offsets, lengths, moffsets, tags, at, length)
    assert merged[0] == "returns"


# ---------------------------------------------------------------- zfile


@SLOW
@given(case=chunk_inputs(), kind=st.sampled_from(["bytes", "bytearray", "memoryview"]))
def test_zfile_encode_decodes_with_either_backend(native, case, kind):
    data, algorithm, verify, chunk = case
    source = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}[kind](data)
    chunks = -(-len(data) // chunk)
    for encoder in (_pure, native):
        out, lengths = encoder.zfile_encode(source, algorithm, verify, chunk)
        assert type(out) is bytes and type(lengths) is array and lengths.typecode == "I"
        assert len(lengths) == chunks and sum(lengths) == len(out)
        pos = 0
        for stored in lengths:
            if verify:  # every payload is followed by its salted CRC
                payload = out[pos : pos + stored - 4]
                (crc,) = struct.unpack_from("<I", out, pos + stored - 4)
                assert crc == _pure.crc32c(payload, SEED)
            pos += stored
        for decoder in (_pure, native):
            decoded = decoder.zfile_decode(out, lengths, algorithm, verify, chunk,
                                           last_length(data, chunk))
            assert decoded == data


@st.composite
def corruptions(draw, out: bytes, lengths: array, verify: bool):
    """A damaged (buf, lengths, verify) whose chunks still lie inside buf."""
    buf, lengths = bytearray(out), array("I", lengths)
    kind = draw(st.sampled_from(["flip", "boundary", "verify", "drop", "none"]))
    if kind == "flip" and buf:
        at = draw(st.integers(0, len(buf) - 1))
        buf[at] ^= draw(st.integers(1, 255))
    elif kind == "boundary" and len(lengths) > 1:
        i = draw(st.integers(0, len(lengths) - 2))
        least = 5 if verify else 1
        shift = draw(st.integers(least - lengths[i], lengths[i + 1] - least))
        lengths[i] += shift
        lengths[i + 1] -= shift
    elif kind == "verify" and not verify:
        verify = all(n >= 4 for n in lengths)  # checks CRCs that are not there
    elif kind == "verify":
        verify = False  # the CRC is read as part of the payload
    elif kind == "drop" and lengths:
        lengths.pop()
    return bytes(buf), lengths, verify


@SLOW
@given(case=chunk_inputs(), data=st.data())
def test_zfile_decode_same_result_or_same_error(native, case, data):
    source, algorithm, verify, chunk = case
    encoder = data.draw(st.sampled_from([_pure, native]))
    out, lengths = encoder.zfile_encode(source, algorithm, verify, chunk)
    buf, lengths, verify = data.draw(corruptions(out, lengths, verify))
    last = last_length(source, chunk)
    decoding = data.draw(st.sampled_from([algorithm, 3 - algorithm, 0]))
    chunk_size, last = data.draw(st.sampled_from([(chunk, last), (chunk, last - 1),
                                                  (chunk - 1, last), (chunk, last + 1)]))
    result = same(native, "zfile_decode", buf, lengths, decoding, verify, chunk_size, last,
                  exact_error=True)
    if result[0] == "raises":
        assert result[1] is ValueError


def test_corrupt_chunks_raise_the_same_error(native):
    data = chunk_data(11, 10 * 4096 + 100)
    for algorithm in ALGORITHMS:
        out, lengths = native.zfile_encode(data, algorithm, True, 4096)
        starts = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
        for chunk in (0, 6, 10):
            for at, reason in ((starts[chunk] + 2, "crc"), (starts[chunk + 1] - 1, "crc")):
                bad = bytearray(out)
                bad[at] ^= 0x40
                for module in (_pure, native):
                    with pytest.raises(ValueError) as info:
                        module.zfile_decode(bad, lengths, algorithm, True, 4096, 100)
                    assert info.value.args == ((chunk, reason),)
        # without CRCs, a wrong size shows as a decompression failure of the last chunk
        plain_out, plain_lengths = native.zfile_encode(data, algorithm, False, 4096)
        assert same(native, "zfile_decode", plain_out, plain_lengths, algorithm, False, 4096,
                    99, exact_error=True) == ("raises", ValueError, ((10, "decompress"),))


@FAST
@given(lengths=st.lists(st.one_of(st.integers(0, 40), st.sampled_from([2**32 - 1, 2**31])),
                        max_size=6),
       size=st.integers(0, 200), verify=st.booleans(), algorithm=st.sampled_from([1, 2, 0]))
def test_zfile_decode_hostile_lengths(native, lengths, size, verify, algorithm):
    """Whatever the jump table says, native never reads outside buf: it fails the first
    check that would (documented; the reference's behaviour there is accidental)."""
    buf = random.Random(size).randbytes(size)
    try:
        native.zfile_decode(buf, array("I", lengths), algorithm, verify, 4096, 10)
    except ValueError as exc:
        (index, reason), = exc.args
        pos = sum(lengths[:index])
        if pos + lengths[index] > size or (verify and lengths[index] < 4):
            assert reason == ("crc" if verify else "decompress")


def test_zfile_threads(native):
    """Decoding runs without the GIL: concurrent calls must not disturb each other."""
    inputs = [chunk_data(seed, 64 * 4096 + seed) for seed in range(4)]
    encoded = [native.zfile_encode(d, ALGORITHMS[i % 2], True, 4096)
               for i, d in enumerate(inputs)]
    failures = []

    def work(i):
        out, lengths = encoded[i]
        for _ in range(20):
            got = native.zfile_decode(out, lengths, ALGORITHMS[i % 2], True, 4096,
                                      last_length(inputs[i], 4096))
            if got != inputs[i]:
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_native_reproduces_the_original_chunks(native):
    """Debian's liblz4/libzstd compress l1.commit chunk for chunk as the original tools
    did (4 KiB chunks; zstd at level 3), so the stored payloads are byte-identical."""
    source = sample_bytes("l1.commit")
    for name, algorithm in (("l1.commit.zstd.zfile", zfile.ALGO_ZSTD),
                            ("l1.commit.lz4.zfile", zfile.ALGO_LZ4)):
        ref = sample_bytes(name)  # checked against SHA256SUMS
        trailer = zfile.index_header(zfile.parse_header(ref[:512]), ref[-512:], len(ref))
        table = ref[trailer.index_offset : trailer.index_offset + 4 * trailer.index_size]
        index = zfile.ZFileIndex.parse(trailer, table)
        out, lengths = native.zfile_encode(source, algorithm, True, 4096)
        assert lengths.tobytes() == table, name
        for i in range(index.chunks):
            start, end = index.starts[i], index.starts[i + 1]
            assert out[start - 512 : end - 512] == ref[start:end], f"{name} chunk {i}"

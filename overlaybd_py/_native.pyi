"""Typed API of the C extension ``overlaybd_py._native`` (sources in native/).

The same functions, signatures and results as ``overlaybd_py._pure`` (the reference);
see there for what each one does. Column arguments accept an ``array.array`` of the
reference's type or any buffer of unsigned items of the same size (memoryview, bytes for
1-byte columns...); other sequences of ints are copied first. Data arguments accept any
C-contiguous buffer, read as raw bytes.
"""

from array import array
from collections.abc import Sequence

from ._pure import Columns

INVALID_OFFSET: int
FEATURES: tuple[str, ...]  # e.g. ("crc32c-sse42", "lz4", "zstd")
LIBRARY_VERSIONS: dict[str, str]  # {"lz4": "1.9.4", "zstd": "1.5.4"}: the loaded codecs

def crc32c(data: bytes | bytearray | memoryview, seed: int = 0) -> int: ...
def crc32c_blocks(data: bytes | bytearray | memoryview, block_size: int) -> bytes: ...
def decode_segments(buf: bytes | bytearray | memoryview) -> Columns: ...
def encode_segments(
    offsets: array, lengths: array, moffsets: array, zeroed: array, tags: array
) -> bytes: ...
def first_unsorted(offsets: array, lengths: array) -> int: ...
def first_out_of_bounds(
    moffsets: array, lengths: array, zeroed: array, low: int, high: int
) -> int: ...
def merge(layers: Sequence[Columns]) -> Columns: ...
def lookup(
    offsets: array,
    lengths: array,
    moffsets: array,
    tags: array,
    offset: int,
    length: int,
) -> list[tuple[int, int, int]]: ...
def zfile_decode(
    buf: bytes | bytearray | memoryview,
    stored_lengths: Sequence[int],
    algorithm: int,
    verify: bool,
    chunk_size: int,
    last_length: int,
) -> bytes: ...
def zfile_encode(
    data: bytes | bytearray | memoryview, algorithm: int, verify: bool, chunk_size: int,
    level: int = 0,
) -> tuple[bytes, array]: ...

# Test hook: CRC32C with the portable table code, whatever the CPU supports.
def _crc32c_portable(data: bytes | bytearray | memoryview, seed: int = 0) -> int: ...

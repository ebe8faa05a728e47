"""Choose the accelerated or the pure implementation of the hot loops, once, at import.

``OVERLAYBD_PY_ACCEL`` selects: ``auto`` (default: native when it imports, else pure),
``native`` (fail loudly when the extension is missing) or ``pure``. Both backends expose the
same functions (``_pure.py`` is the reference, ``native/`` the C twin); ``BACKEND`` says which
one is active and ``FEATURES`` lists what the native build supports.
"""

from __future__ import annotations

import os

from . import _pure
from .errors import UsageError

__all__ = [
    "BACKEND",
    "FEATURES",
    "INVALID_OFFSET",
    "backend_module",
    "crc32c",
    "crc32c_blocks",
    "decode_segments",
    "encode_segments",
    "first_out_of_bounds",
    "first_unsorted",
    "lookup",
    "merge",
    "zfile_decode",
    "zfile_encode",
]

INVALID_OFFSET = _pure.INVALID_OFFSET


def backend_module(name: str):
    """Return the module implementing backend ``name`` ('pure' or 'native')."""
    if name == "pure":
        return _pure
    if name == "native":
        from . import _native  # type: ignore[attr-defined]

        return _native
    raise UsageError(f"OVERLAYBD_PY_ACCEL={name!r}: expected auto, native or pure")


def _choose() -> tuple[str, object]:
    wanted = os.environ.get("OVERLAYBD_PY_ACCEL", "auto").strip().lower() or "auto"
    if wanted == "auto":
        try:
            return "native", backend_module("native")
        except ImportError:
            return "pure", _pure
    try:
        return wanted, backend_module(wanted)
    except ImportError as exc:
        raise UsageError(
            f"OVERLAYBD_PY_ACCEL=native but the C extension is not built ({exc}); "
            "reinstall with gcc, liblz4-dev and libzstd-dev present, or use OVERLAYBD_PY_ACCEL=pure"
        ) from exc


BACKEND, _impl = _choose()
FEATURES: frozenset[str] = frozenset(getattr(_impl, "FEATURES", ()))

crc32c = _impl.crc32c
crc32c_blocks = _impl.crc32c_blocks
decode_segments = _impl.decode_segments
encode_segments = _impl.encode_segments
first_unsorted = _impl.first_unsorted
first_out_of_bounds = _impl.first_out_of_bounds
merge = _impl.merge
lookup = _impl.lookup
zfile_decode = _impl.zfile_decode
zfile_encode = _impl.zfile_encode

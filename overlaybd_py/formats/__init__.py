"""Pure codecs of the overlaybd formats: bytes in, values out, no I/O.

Only the standard library, ``_accel`` and ``errors`` may be imported here (a test checks).
"""

from .lsmt import LsmtHeader, Segments
from .lsmt_commit import CommitPlan, plan_commit
from .merged_index import MergedIndex
from .tar_wrapper import TarPayload, find_payload, wrap_head, wrap_tail
from .writable_index import WritableIndex
from .zfile import ZFileBuilder, ZFileHeader, ZFileIndex, decode_chunks

__all__ = [
    "CommitPlan",
    "LsmtHeader",
    "MergedIndex",
    "Segments",
    "TarPayload",
    "WritableIndex",
    "ZFileBuilder",
    "ZFileHeader",
    "ZFileIndex",
    "decode_chunks",
    "find_payload",
    "plan_commit",
    "wrap_head",
    "wrap_tail",
]

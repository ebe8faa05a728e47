"""The converted-layer cache: skip layers converted before, reuse blobs across repositories.

An entry is keyed by the source layer's chainID plus every option that changes the output
(algorithm, chunk size, compression level when not the default, file layout when not tar
order, virtual size, our format version). It is valid only on top of the
exact converted layer it was built on (``lower``), because the ext4 it extends must be the
same bytes; the converter therefore uses hits only for a prefix of the image's layers.
Entries are published atomically (blob, then its JSON record, both renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__

__all__ = ["CachedLayer", "LayerCache", "cache_key"]

log = logging.getLogger(__name__)

FORMAT = 1


def cache_key(chain_id: str, *, algorithm: str, chunk_size: int, vsize: int,
              level: int = 0, layout: str = "tar") -> str:
    fields = {"format": FORMAT, "chain_id": chain_id, "algorithm": algorithm,
              "chunk_size": chunk_size, "vsize": vsize}
    if level:  # absent at the default level: keys made before levels existed still match
        fields["level"] = level
    if layout != "tar":  # absent for tar order: what every layer had before layouts
        fields["layout"] = layout
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass
class CachedLayer:
    key: str
    chain_id: str
    lower: str | None  # digest of the converted layer this one was built on
    digest: str
    size: int
    uuid: str
    creator: str = f"overlaybd-py {__version__}"
    pushed_to: list[str] = field(default_factory=list)  # "host/repository" holding the blob


class LayerCache:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "keys").mkdir(parents=True, exist_ok=True)

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / digest.partition(":")[2]

    def get(self, key: str, lower: str | None) -> CachedLayer | None:
        record = self.root / "keys" / f"{key}.json"
        try:
            entry = CachedLayer(**json.loads(record.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, OSError):
            log.warning("ignoring unreadable converted-layer cache record %s", record)
            return None
        path = self.blob_path(entry.digest)
        if entry.lower != lower or not path.is_file() or path.stat().st_size != entry.size:
            return None
        return entry

    def put(self, entry: CachedLayer, blob: Path) -> None:
        target = self.blob_path(entry.digest)
        if not target.exists():
            tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
            shutil.copyfile(blob, tmp)
            os.replace(tmp, target)
        self.save(entry)

    def save(self, entry: CachedLayer) -> None:
        record = self.root / "keys" / f"{entry.key}.json"
        tmp = record.with_name(record.name + f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(entry)))
        os.replace(tmp, record)

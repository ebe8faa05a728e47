"""Whole-file layer operations behind ``overlaybd-py layer``: commit, compress, decompress,
extract, inspect and verify. Local files only; results are written to a temporary file and
renamed into place, so a failure never leaves a half-written output under the final name.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import FormatError, UsageError
from ..formats import lsmt, tar_wrapper, zfile
from ..formats.lsmt_commit import plan_commit
from ..formats.merged_index import MergedIndex
from .layer import Layer, open_layer, unwrap_tar
from .layered import device_size
from .source import BlobSource, FileSource
from .writable import WritableLayer
from .zfile_source import ZFileSource

__all__ = [
    "commit_layer",
    "compress_file",
    "decompress_file",
    "extract_image",
    "inspect_file",
    "verify_file",
]

log = logging.getLogger(__name__)

COPY_BLOCK = 4 * 1024 * 1024


class _Output:
    """A file written sequentially to ``PATH.tmp-PID``, renamed to PATH on success."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tmp = f"{path}.tmp-{os.getpid()}"
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.pos = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.pos += len(data)

    def pwrite(self, data: bytes, offset: int) -> None:
        os.pwrite(self.fd, data, offset)

    def commit(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        os.rename(self.tmp, self.path)

    def abort(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


@contextlib.contextmanager
def _output(path: str) -> Iterator[_Output]:
    out = _Output(path)
    try:
        yield out
    except BaseException:
        out.abort()
        raise
    out.commit()


class _Wrapper:
    """Routes plaintext through an optional ZFile builder and an optional tar wrapper."""

    def __init__(self, out: _Output, algorithm: int | None, chunk_size: int, tar: bool,
                 overwrite_header: bool, level: int = 0) -> None:
        self.out = out
        self.tar = tar
        self.overwrite_header = overwrite_header
        self.builder = zfile.ZFileBuilder(algorithm, chunk_size, level=level) \
            if algorithm else None
        if tar:
            out.write(bytes(1536))  # the real wrapper head is written once the size is known
        self.payload_start = out.pos
        if self.builder:
            out.write(self.builder.head())

    def write(self, data: bytes | memoryview) -> None:
        self.out.write(self.builder.add(data) if self.builder else data)

    def finish(self) -> int:
        if self.builder:
            self.out.write(self.builder.finish())
            if self.overwrite_header:
                self.out.pwrite(self.builder.overwrite_header(), self.payload_start)
        payload = self.out.pos - self.payload_start
        if self.tar:
            self.out.write(tar_wrapper.wrap_tail(payload))
            self.out.pwrite(tar_wrapper.wrap_head(payload), 0)
        return payload


@dataclass(frozen=True)
class CommitResult:
    path: str
    size: int
    segments: int
    data_bytes: int


def commit_layer(data_path: str, index_path: str, out_path: str, *, algorithm: str | None = None,
                 chunk_size: int = 4096, tar: bool = False, layer_uuid: str | None = None,
                 parent_uuid: str | None = None, message: str = "",
                 level: int = 0, merge_runs: bool = False) -> CommitResult:
    """Seal a writable pair into ``out_path`` (``overlaybd-commit``): a plain sealed LSMT, or
    with ``algorithm`` a header-overwrite ZFile (at compression ``level``; 0: the original's),
    optionally tar-wrapped. ``merge_runs``: records independent of how the writes were split
    (``formats/lsmt_commit.py``)."""
    if level and not algorithm:
        raise UsageError("a compression level needs a compression algorithm (lz4 or zstd)")
    tag = message.encode()
    if len(tag) > lsmt.USER_TAG_SIZE:
        raise UsageError(f"commit message is {len(tag)} bytes; at most 256 are allowed")
    layer = WritableLayer.open(data_path, index_path, readonly=True)
    try:
        segments = layer.index.segments()
        plan = plan_commit(
            segments, virtual_size=layer.virtual_size, uuid=layer_uuid or lsmt.NULL_UUID,
            parent_uuid=parent_uuid or layer.header.parent_uuid or lsmt.NULL_UUID, user_tag=tag,
            merge_runs=merge_runs,
        )
        algo = zfile.ALGORITHMS[algorithm] if algorithm else None
        with _output(out_path) as out:
            sink = _Wrapper(out, algo, chunk_size, tar, overwrite_header=True, level=level)
            sink.write(plan.header)
            for offset, length in plan.copies:
                for pos in range(0, length, COPY_BLOCK):
                    sink.write(layer.read_data(offset + pos, min(COPY_BLOCK, length - pos)))
            sink.write(plan.index)
            sink.write(plan.trailer)
            sink.finish()
            size = out.pos
    finally:
        layer.close()
    return CommitResult(out_path, size, len(segments), plan.index_offset - lsmt.HT_SPACE)


def compress_file(in_path: str, out_path: str, *, algorithm: str = "lz4",
                  chunk_size: int = 4096, tar: bool = False, level: int = 0) -> int:
    """ZFile-compress any file, trailer-only (``overlaybd-zfile``). Returns the output size."""
    with open(in_path, "rb") as src, _output(out_path) as out:
        sink = _Wrapper(out, zfile.ALGORITHMS[algorithm], chunk_size, tar,
                        overwrite_header=False, level=level)
        while block := src.read(COPY_BLOCK):
            sink.write(block)
        sink.finish()
        return out.pos


async def _open_blob(path: str) -> tuple[FileSource, BlobSource]:
    """The file and its (tar-unwrapped) payload."""
    blob = await FileSource.open(path)
    head = await blob.read_at(0, min(tar_wrapper.HEAD_PROBE, blob.size))
    try:
        inner, _ = await unwrap_tar(blob, head)
    except FormatError as exc:
        raise exc.with_digest(path) from None
    return blob, inner


async def decompress_file(in_path: str, out_path: str) -> int:
    """Decode a ZFile (bare or tar-wrapped) to the original bytes, checking every chunk."""
    blob, inner = await _open_blob(in_path)
    async with blob:
        head = await inner.read_at(0, min(zfile.SLOT, inner.size))
        if not zfile.is_zfile(head):
            raise UsageError(f"{in_path} is not a ZFile (no ZFile magic)")
        source = await ZFileSource.open(inner, key=in_path)
        with _output(out_path) as out:
            for pos in range(0, source.size, COPY_BLOCK):
                out.write(await source.read_at(pos, min(COPY_BLOCK, source.size - pos)))
            return out.pos


async def _open_layers(paths: list[str]) -> list[Layer]:
    layers = []
    for path in paths:
        blob = await FileSource.open(path)
        layers.append(await open_layer(blob, key=path))
    return layers


async def _close_layers(layers: list[Layer]) -> None:
    for layer in layers:
        await layer.blob.aclose()


async def extract_image(paths: list[str], out_path: str) -> dict:
    """Merge sealed layers (lowest first) into a raw image file (sparse where unmapped)."""
    layers = await _open_layers(paths)
    try:
        merged = MergedIndex.build([layer.segments for layer in layers])
        size = device_size(layers, None)
        written = 0
        with _output(out_path) as out:
            os.ftruncate(out.fd, size)
            s = merged.segments
            for offset, length, moffset, _zeroed, tag in s.records():
                source = layers[tag].lsmt
                for pos in range(0, length * lsmt.SECTOR, COPY_BLOCK):
                    n = min(COPY_BLOCK, length * lsmt.SECTOR - pos)
                    data = await source.read_at(moffset * lsmt.SECTOR + pos, n)
                    out.pwrite(data, offset * lsmt.SECTOR + pos)
                    written += n
        return {"output": out_path, "virtual_size": size, "layers": len(layers),
                "merged_segments": len(merged), "data_bytes": written}
    finally:
        await _close_layers(layers)


def _header_info(h: lsmt.LsmtHeader) -> dict:
    return {"uuid": h.uuid, "parent_uuid": h.parent_uuid, "virtual_size": h.virtual_size,
            "message": h.message, "version": f"{h.version}.{h.sub_version}"}


async def inspect_file(path: str) -> dict:
    """Describe a layer file: sealed (plain, ZFile, tar-wrapped) or one half of a writable
    pair. The keys follow DESIGN.md section 5."""
    blob, inner = await _open_blob(path)
    async with blob:
        head = await inner.read_at(0, min(lsmt.HT_SPACE, inner.size))
        if lsmt.is_lsmt(head):
            try:
                header = lsmt.LsmtHeader.unpack(head)
            except FormatError as exc:
                raise exc.with_digest(path) from None
            if not header.is_sealed:
                kind = "data" if header.is_data_file else "index"
                info = {"kind": "lsmt", "sealed": False, "file_type": kind,
                        "tar_wrapped": inner is not blob, "size": blob.size}
                info.update(_header_info(header))
                if kind == "index":
                    info["segments"] = (blob.size - lsmt.HT_SPACE) // 16
                return info
        layer = await open_layer(blob, key=path)
    segments = layer.segments
    info = {
        "kind": layer.kind,
        "sealed": True,
        "tar_wrapped": layer.tar_offset is not None,
        "size": blob.size,
        "lsmt_size": layer.lsmt.size,
        "segments": len(segments),
        "index_slots": layer.trailer.index_size,
        "zeroed_segments": sum(segments.zeroed),
        "data_bytes": segments.data_sectors() * lsmt.SECTOR,
    }
    info.update(_header_info(layer.trailer))
    if layer.zfile is not None:
        ht = layer.zfile.index.header
        info.update({
            "algorithm": ht.algorithm_name,
            "level": ht.level,  # as the writer recorded it; 0: the codec's default
            "chunk_size": ht.block_size,
            "chunks": layer.zfile.index.chunks,
            "checksummed": ht.verify,
            "header_overwrite": ht.flag(zfile.FLAG_OVERWRITE),
            "digest_enabled": ht.flag(zfile.FLAG_DIGEST),
        })
    return info


async def verify_file(path: str) -> dict:
    """Check everything checkable in a sealed layer: structure, index, and (ZFile) every
    chunk's CRC and decompression. Raises FormatError on the first problem."""
    blob = await FileSource.open(path)
    async with blob:
        layer = await open_layer(blob, key=path)
        report = {"path": path, "kind": layer.kind, "segments": len(layer.segments)}
        if layer.zfile is not None:
            source: ZFileSource = layer.zfile
            index = source.index
            checked = 0
            step = max(1, COPY_BLOCK // index.chunk_size)
            for first in range(0, index.chunks, step):
                last = min(first + step, index.chunks) - 1
                await source.check_chunks(first, last)
                checked += last - first + 1
            report["chunks_checked"] = checked
            report["payload_checksummed"] = bool(index.header.verify)
        else:
            report["chunks_checked"] = 0
            report["payload_checksummed"] = False
        if not report["payload_checksummed"]:
            report["note"] = ("payload bytes of this layer carry no checksum: only its "
                              "structure (header, trailer, index) was verified")
        return report


"""containerd's snapshots service over local directories and overlaybd images.

Theory of operation
-------------------
Ordinary layers behave exactly like containerd's overlayfs snapshotter: each snapshot owns
``<root>/snapshots/<id>/fs`` (and ``work`` when active); an active snapshot without parent
is a read-write bind of ``fs``, with parents an overlay (``lowerdir`` = the parents' ``fs``,
nearest first; ``upperdir``/``workdir`` its own); a view is a read-only bind of its single
lower, or a read-only overlay of several. containerd unpacks a layer into an active
snapshot and commits it.

overlaybd layers come in two ways (DESIGN.md section 4):

* *Remote*: a Prepare carrying ``containerd.io/snapshot.ref``, the overlaybd blob-digest and
  blob-size labels and an image reference (``containerd.io/snapshot/image-ref`` or
  ``.../cri.image-ref``) commits a snapshot named after the ref at once, labelled
  ``containerd.io/snapshot/remote``, and answers AlreadyExists: containerd downloads nothing.
* *Local*: plain ``ctr image pull`` sets no image reference and unpacks the layer blob (a
  tar holding one ``overlaybd.commit`` file). An *extract* is a Prepare that unpacks such a
  blob: one with the blob-digest label (containerd's unpacker passes layer annotations), or,
  when no labels came at all (``ctr image pull`` unpacks without any), one with containerd's
  unpack key (``extract-...``) on an overlaybd parent; it is a bind of its own empty ``fs``,
  whatever its parents. At Commit a ``fs`` holding exactly ``overlaybd.commit`` (an LSMT or
  ZFile) makes the snapshot a local overlaybd layer; an extract that unpacked anything else
  is refused (without labels, an ordinary layer on an overlaybd image cannot be told apart
  before it is unpacked, and unpacked without its lowers it would lose its whiteouts).

An *acceleration layer* (``trace push``; the acceleration-layer label, or an extract that
unpacked to a single ``trace`` file holding a trace or priority list) is committed the same
ways but is not part of the filesystem: the daemon prefetches what it carries when it mounts
the image of the layers under it.

overlaybd layers must form the bottom of a chain (each is a whole filesystem, not a diff);
ordinary layers may sit on top ("mixed" images). An active snapshot or view whose chain has
overlaybd layers stacks on their merged device, which the node daemon mounts read-only at
``snapshots/<top overlaybd id>/image`` (``images.ImageMounts``); ``lowerdir`` is then the
ordinary layers above it, then that mount. Views of an overlaybd image are a read-only bind.

Locking: one lock guards the database and directory layout; images are mounted outside it
(under a per-image lock), after the snapshot's row exists, so a concurrent Remove that sees
no user never unmounts an image a Prepare is about to use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import OverlaybdError
from ..formats import lsmt, oci, zfile
from ..formats import trace as tracefmt
from .filters import parse_filters
from .images import ImageMounts
from .store import Kind, Snapshot, Store

__all__ = [
    "LABEL_CRI_IMAGE_REF",
    "LABEL_IMAGE_REF",
    "LABEL_RECORD_TRACE",
    "LABEL_RECORD_TRACE_PATH",
    "LABEL_REMOTE",
    "LABEL_SNAPSHOT_REF",
    "Mount",
    "SnapshotError",
    "SnapshotService",
]

log = logging.getLogger(__name__)

LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
LABEL_IMAGE_REF = "containerd.io/snapshot/image-ref"
LABEL_CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_REMOTE = "containerd.io/snapshot/remote"
# The original's labels on a container's snapshot (`ctr run --snapshotter-label`): record a
# trace of the image's reads into the path (the original trace format, plus PATH.jsonl).
LABEL_RECORD_TRACE = "containerd.io/snapshot/overlaybd/record-trace"
LABEL_RECORD_TRACE_PATH = "containerd.io/snapshot/overlaybd/record-trace-path"
COMMIT_FILE = "overlaybd.commit"
ACCELERATION_FILE = tracefmt.ACCELERATION_MEMBER  # what an acceleration layer unpacks to
_OVERLAY_INDEX = Path("/sys/module/overlay/parameters/index")


class SnapshotError(OverlaybdError):
    """containerd's rules refuse a snapshot operation. ``code`` is the errdefs class the gRPC
    edge answers with: not_found, already_exists, failed_precondition, invalid_argument."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


def _record_trace(labels: dict[str, str]) -> str | None:
    """The trace path a container's labels ask to record into, if they do."""
    if labels.get(LABEL_RECORD_TRACE) != "yes":
        return None
    path = labels.get(LABEL_RECORD_TRACE_PATH, "")
    if not os.path.isabs(path):
        raise SnapshotError("invalid_argument",
                            f"{LABEL_RECORD_TRACE}=yes needs {LABEL_RECORD_TRACE_PATH} set to "
                            f"an absolute path (got {path!r})")
    return path


def _remote_layer(labels: dict[str, str]) -> dict[str, object] | None:
    """The registry layer a Prepare's labels describe, or None if it is not remote."""
    image_ref = labels.get(LABEL_IMAGE_REF) or labels.get(LABEL_CRI_IMAGE_REF)
    digest = labels.get(oci.ANNOTATION_BLOB_DIGEST)
    size = labels.get(oci.ANNOTATION_BLOB_SIZE, "")
    if not (labels.get(LABEL_SNAPSHOT_REF) and image_ref and digest):
        return None
    if not size.isdigit():
        raise SnapshotError("invalid_argument",
                            f"label {oci.ANNOTATION_BLOB_SIZE} is {size!r}, not a byte count")
    try:
        oci.validate_digest(digest)
    except OverlaybdError:
        raise SnapshotError("invalid_argument",
                            f"label {oci.ANNOTATION_BLOB_DIGEST} is not a digest: {digest!r}"
                            ) from None
    layer: dict[str, object] = {"digest": digest, "size": int(size), "ref": image_ref}
    if labels.get(oci.ANNOTATION_ACCELERATION_LAYER) == "yes":
        layer["acceleration"] = True  # carries a trace to prefetch, not a filesystem
    return layer


def _is_unpack_key(key: str) -> bool:
    """containerd's unpack keys: ``extract-<unique> <chain id>``, which its metadata layer
    passes on as ``<namespace>/<sequence>/extract-...``."""
    return key.split("/", 2)[-1].startswith("extract-")


def _usage(path: Path) -> tuple[int, int]:
    """(bytes, inodes) a directory tree uses, counting hard links once (like du)."""
    seen: set[tuple[int, int]] = set()
    size = inodes = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [".", *dirnames, *filenames]:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            inodes += 1
            size += st.st_blocks * 512
    return size, inodes


def _is_prefetch_input(path: Path) -> bool:
    """Whether ``path`` (an unpacked acceleration layer's one file) is a trace or a priority
    list; anything else in that place is refused at commit."""
    if not stat.S_ISREG(os.lstat(path).st_mode):
        return False
    try:
        tracefmt.decode_prefetch_input(path.read_bytes())
    except OverlaybdError:
        return False
    return True


def _file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return f"sha256:{hashlib.file_digest(f, 'sha256').hexdigest()}"


class SnapshotService:
    """The snapshotter of one root directory. Build with :meth:`open`."""

    def __init__(self, root: Path, store: Store, images: ImageMounts) -> None:
        self.root = root
        self.store = store
        self.images = images
        self._lock = threading.RLock()
        self._index_off = _OVERLAY_INDEX.exists()

    @classmethod
    def open(cls, root: Path, images: ImageMounts) -> SnapshotService:
        root.mkdir(parents=True, mode=0o700, exist_ok=True)
        (root / "snapshots").mkdir(mode=0o700, exist_ok=True)
        return cls(root, Store.open(root / "metadata.db"), images)

    def close(self) -> None:
        self.store.close()

    def _dir(self, snapshot_id: int) -> Path:
        return self.root / "snapshots" / str(snapshot_id)

    def _get(self, key: str) -> Snapshot:
        snapshot = self.store.get(key)
        if snapshot is None:
            raise SnapshotError("not_found", f"snapshot {key!r} does not exist")
        return snapshot

    # -- chains and mounts ----------------------------------------------------------------------

    @staticmethod
    def _run_top(chain: list[Snapshot]) -> Snapshot | None:
        """The top of the overlaybd layers at the bottom of ``chain`` (nearest first)."""
        first = next((i for i, s in enumerate(chain) if s.layer is not None), None)
        if first is None:
            return None
        ordinary = next((s for s in chain[first:] if s.layer is None), None)
        if ordinary is not None:
            raise SnapshotError(
                "failed_precondition",
                f"overlaybd layer {chain[first].name!r} sits on top of ordinary layer "
                f"{ordinary.name!r}: overlaybd layers must be the bottom of an image")
        return chain[first]

    def _layers(self, run_top: Snapshot) -> tuple[list[dict[str, object]],
                                                  dict[str, object] | None]:
        """The overlaybd filesystem layers from ``run_top`` down, bottom first (the daemon's
        order), and the acceleration layer above them, if the image has one."""
        layers = [s.layer for s in reversed(self.store.chain(run_top)) if s.layer is not None]
        if any(layer.get("acceleration") for layer in layers[:-1]):
            raise SnapshotError("failed_precondition",
                                f"snapshot {run_top.name!r}: an acceleration layer is not the "
                                "top of its image's overlaybd layers")
        if layers and layers[-1].get("acceleration"):
            return layers[:-1], layers[-1]
        return layers, None

    def _lowerdirs(self, snapshot: Snapshot) -> list[str]:
        parents = self.store.chain(self.store.by_id(snapshot.parent_id)) \
            if snapshot.parent_id is not None else []
        dirs = []
        for parent in parents:
            if parent.layer is not None:
                dirs.append(str(self.images.target(parent.id)))
                break
            dirs.append(str(self._dir(parent.id) / "fs"))
        return dirs

    def _mounts(self, snapshot: Snapshot) -> list[Mount]:
        fs = str(self._dir(snapshot.id) / "fs")
        lowers = [] if snapshot.extract else self._lowerdirs(snapshot)
        if snapshot.kind == Kind.ACTIVE:
            if not lowers:
                return [Mount("bind", fs, ("rw", "rbind"))]
            options = ["index=off"] if self._index_off else []
            options += [f"workdir={self._dir(snapshot.id) / 'work'}", f"upperdir={fs}",
                        f"lowerdir={':'.join(lowers)}"]
            return [Mount("overlay", "overlay", tuple(options))]
        if not lowers:
            return [Mount("bind", fs, ("ro", "rbind"))]
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ("ro", "rbind"))]
        options = ["index=off"] if self._index_off else []
        return [Mount("overlay", "overlay", (*options, f"lowerdir={':'.join(lowers)}"))]

    def _ensure_image(self, snapshot: Snapshot, record_trace: str | None = None) -> None:
        if snapshot.lower_id is None:
            if record_trace:
                log.warning("%s: record-trace asked for a snapshot with no overlaybd image; "
                            "no trace is recorded", snapshot.name)
            return
        run_top = self.store.by_id(snapshot.lower_id)
        assert run_top is not None and run_top.layer is not None  # a child keeps it alive
        self._mount_image(run_top, record_trace)

    def _mount_image(self, run_top: Snapshot, record_trace: str | None = None) -> None:
        layers, accel = self._layers(run_top)
        if not layers:
            raise SnapshotError("failed_precondition",
                                f"snapshot {run_top.name!r}: an acceleration layer with no "
                                "overlaybd layers under it")
        name = str(layers[-1].get("ref") or layers[-1].get("path"))
        if accel is not None and accel.get("path") and not _is_prefetch_input(
                Path(str(accel["path"]))):
            log.warning("%s: its acceleration layer holds no usable trace; mounting without "
                        "prefetch", name)
            accel = None
        self.images.ensure(run_top.id, layers, name, record_trace=record_trace,
                           acceleration=accel)

    def _release_image(self, lower_id: int | None) -> None:
        if lower_id is not None:
            self.images.release(lower_id, lambda: self.store.users_of(lower_id))

    # -- operations -----------------------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        if not key:
            raise SnapshotError("invalid_argument", "a snapshot key must not be empty")
        with self._lock:
            if self.store.get(key) is not None:
                raise SnapshotError("already_exists", f"snapshot {key!r} already exists")
            base = None
            if parent:
                base = self._get(parent)
                if base.kind != Kind.COMMITTED:
                    raise SnapshotError("invalid_argument",
                                        f"parent {parent!r} is not a committed snapshot")
            chain = self.store.chain(base)
            record_trace = _record_trace(labels) if kind == Kind.ACTIVE else None
            remote = _remote_layer(labels) if kind == Kind.ACTIVE else None
            if remote is not None:
                self._commit_remote(labels, base, chain, remote)  # raises AlreadyExists
            extract = kind == Kind.ACTIVE and (
                oci.ANNOTATION_BLOB_DIGEST in labels
                or (not labels and _is_unpack_key(key) and base is not None
                    and base.layer is not None))
            run_top = None if extract else self._run_top(chain)
            with self.store.transaction():
                snapshot_id = self.store.insert(
                    name=key, kind=kind, parent_id=base.id if base else None, labels=labels,
                    extract=extract, lower_id=run_top.id if run_top else None)
                self._make_dirs(snapshot_id, work=kind == Kind.ACTIVE)
            snapshot = self.store.by_id(snapshot_id)
            assert snapshot is not None
        try:
            self._ensure_image(snapshot, record_trace)
        except BaseException:
            self._discard(snapshot)
            raise
        return self._mounts(snapshot)

    def _make_dirs(self, snapshot_id: int, *, work: bool) -> None:
        directory = self._dir(snapshot_id)
        if directory.exists():  # an orphan of a crash whose id sqlite handed out again
            self.images.unmount_under(directory)
            shutil.rmtree(directory)
        directory.mkdir(mode=0o700)
        (directory / "fs").mkdir(mode=0o755)
        if work:
            (directory / "work").mkdir(mode=0o700)

    def _commit_remote(self, labels: dict[str, str], base: Snapshot | None,
                       chain: list[Snapshot], remote: dict[str, object]) -> None:
        target = labels[LABEL_SNAPSHOT_REF]
        if self.store.get(target) is not None:
            raise SnapshotError("already_exists", f"target snapshot {target!r} already exists")
        if chain and any(s.layer is None for s in chain):
            raise SnapshotError("failed_precondition",
                                f"remote overlaybd layer {target!r} on top of ordinary layers")
        if chain and any(s.layer.get("acceleration") for s in chain if s.layer is not None):
            raise SnapshotError("failed_precondition",
                                f"remote layer {target!r} on top of an acceleration layer (it "
                                "must be the image's top layer)")
        with self.store.transaction():
            snapshot_id = self.store.insert(
                name=target, kind=Kind.COMMITTED, parent_id=base.id if base else None,
                labels={**labels, LABEL_REMOTE: "remote snapshot"}, layer=remote)
            self._make_dirs(snapshot_id, work=False)
        log.info("remote snapshot %s: %s from %s", target, remote["digest"], remote["ref"])
        raise SnapshotError("already_exists", f"target snapshot {target!r} (remote)")

    def _discard(self, snapshot: Snapshot) -> None:
        """Undo a ``_create`` whose image could not be mounted."""
        with self._lock:
            with self.store.transaction():
                self.store.delete(snapshot.id)
            shutil.rmtree(self._dir(snapshot.id), ignore_errors=True)
        try:
            self._release_image(snapshot.lower_id)
        except OverlaybdError as exc:
            log.warning("releasing the image of %s failed: %s", snapshot.name, exc)

    def mounts(self, key: str) -> list[Mount]:
        snapshot = self._get(key)
        if snapshot.kind == Kind.COMMITTED:
            raise SnapshotError("failed_precondition",
                                f"snapshot {key!r} is committed: it has no mounts")
        self._ensure_image(snapshot)
        return self._mounts(snapshot)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        snapshot = self._get(key)
        if snapshot.kind != Kind.ACTIVE:
            raise SnapshotError("failed_precondition", f"snapshot {key!r} is not active")
        # Measured outside the lock (hashing a layer file takes seconds): containerd has
        # finished writing the directory when it commits.
        fs = self._dir(snapshot.id) / "fs"
        layer = self._local_layer(fs, snapshot)
        size, inodes = _usage(fs)
        with self._lock:
            current = self.store.get(key)
            if current is None or current.id != snapshot.id or current.kind != Kind.ACTIVE:
                raise SnapshotError("failed_precondition",
                                    f"snapshot {key!r} changed while it was committed")
            if self.store.get(name) is not None:
                raise SnapshotError("already_exists", f"snapshot {name!r} already exists")
            with self.store.transaction():
                self.store.commit(snapshot.id, name=name, labels=labels, size=size,
                                  inodes=inodes, layer=layer)
            shutil.rmtree(self._dir(snapshot.id) / "work", ignore_errors=True)
        if layer is not None:
            log.info("committed %s as a local overlaybd layer (%s)", name, layer["path"])
        self._release_image(snapshot.lower_id)

    def _local_layer(self, fs: Path, snapshot: Snapshot) -> dict[str, object] | None:
        """The overlaybd layer a committed ``fs`` holds (plain ``ctr image pull``), or None."""
        entries = os.listdir(fs)
        path = fs / COMMIT_FILE
        if entries == [COMMIT_FILE] and stat.S_ISREG(os.lstat(path).st_mode):
            with open(path, "rb") as f:
                head = f.read(64)
            if snapshot.extract or zfile.is_zfile(head) or lsmt.is_lsmt(head):
                digest = snapshot.labels.get(oci.ANNOTATION_BLOB_DIGEST) or _file_digest(path)
                return {"digest": digest, "size": path.stat().st_size, "path": str(path)}
        trace = fs / ACCELERATION_FILE
        labelled = snapshot.labels.get(oci.ANNOTATION_ACCELERATION_LAYER) == "yes"
        if snapshot.extract and entries == [ACCELERATION_FILE] and stat.S_ISREG(
                os.lstat(trace).st_mode) and (labelled or _is_prefetch_input(trace)):
            digest = snapshot.labels.get(oci.ANNOTATION_BLOB_DIGEST) or _file_digest(trace)
            return {"digest": digest, "size": trace.stat().st_size, "path": str(trace),
                    "acceleration": True}
        if snapshot.extract:
            raise SnapshotError(
                "failed_precondition",
                f"snapshot {snapshot.name!r} is a layer of an overlaybd image but did not "
                f"unpack to a single {COMMIT_FILE} file (found {sorted(entries)[:5]}); an "
                "ordinary layer on top of overlaybd layers needs 'overlaybd-py pull'")
        return None

    def remove(self, key: str) -> None:
        with self._lock:
            snapshot = self._get(key)
            if self.store.has_children(snapshot.id):
                raise SnapshotError("failed_precondition",
                                    f"cannot remove snapshot {key!r}: it has children")
            with self.store.transaction():
                self.store.delete(snapshot.id)
        self._release_image(snapshot.lower_id)
        directory = self._dir(snapshot.id)
        if snapshot.layer is not None:
            self.images.unmount_under(directory)  # its own image, if anything was left
        shutil.rmtree(directory, ignore_errors=True)

    def stat(self, key: str) -> Snapshot:
        return self._get(key)

    def update(self, name: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """Update labels: no paths or ``labels`` replaces them all, ``labels.KEY`` sets (or,
        absent from ``labels``, deletes) one. Nothing else of a snapshot can change."""
        with self._lock:
            snapshot = self._get(name)
            updated = dict(snapshot.labels)
            if not paths or "labels" in paths:
                updated = dict(labels)
            for path in paths:
                if path == "labels":
                    continue
                if not path.startswith("labels."):
                    raise SnapshotError("invalid_argument", f"cannot update {path!r} of a "
                                        "snapshot (only labels)")
                label = path[len("labels."):]
                if label in labels:
                    updated[label] = labels[label]
                else:
                    updated.pop(label, None)
            with self.store.transaction():
                self.store.set_labels(snapshot.id, updated)
            result = self.store.by_id(snapshot.id)
            assert result is not None
            return result

    def walk(self, filters: list[str]) -> Iterator[Snapshot]:
        selected = parse_filters(filters)
        for snapshot in self.store.all():
            if selected.matches(lambda path, s=snapshot: _field(s, path)):
                yield snapshot

    def usage(self, key: str) -> tuple[int, int]:
        """(bytes, inodes): measured now for an active snapshot, at commit otherwise."""
        snapshot = self._get(key)
        if snapshot.kind == Kind.ACTIVE:
            return _usage(self._dir(snapshot.id) / "fs")
        return snapshot.size, snapshot.inodes

    def cleanup(self) -> None:
        """Remove directories no snapshot owns and images nothing stacks on."""
        with self._lock:
            known = {s.id for s in self.store.all()}
            for directory in sorted((self.root / "snapshots").iterdir()):
                if directory.name.isdigit() and int(directory.name) in known:
                    continue
                log.info("removing orphaned snapshot directory %s", directory)
                self.images.unmount_under(directory)
                shutil.rmtree(directory, ignore_errors=True)
            needed = self.store.lowers_in_use()
        self.images.reconcile(needed)

    def recover(self) -> None:
        """At start: drop images nothing uses; mount those used (after a reboot, nothing is)."""
        self.cleanup()
        for lower_id in sorted(self.store.lowers_in_use()):
            run_top = self.store.by_id(lower_id)
            if run_top is None or run_top.layer is None:
                continue
            try:
                self._mount_image(run_top)
            except OverlaybdError as exc:  # Mounts() will try again when containerd asks
                log.warning("could not mount the image of %s yet: %s", run_top.name, exc)


def _field(snapshot: Snapshot, path: tuple[str, ...]) -> str | None:
    """containerd's snapshot filter fields: kind, name, parent, labels.KEY."""
    head = path[0] if path else ""
    if head == "kind":
        return Kind(snapshot.kind).name.lower()
    if head == "name":
        return snapshot.name
    if head == "parent":
        return snapshot.parent
    if head == "labels" and len(path) > 1:
        return snapshot.labels.get(".".join(path[1:]))
    return None

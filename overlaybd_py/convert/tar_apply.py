"""Apply one OCI layer tar onto a directory tree, with the image-spec's layer semantics.

This is what containerd's applier does, reproduced for a tree that holds the layers below:
whiteouts (``.wh.NAME`` removes NAME; ``.wh..wh..opq`` empties a directory of what lower
layers put there), hard links (to entries of this layer or of lower layers; the later
header's mode and owner win, since they share an inode), symlinks, device nodes, FIFOs,
owners, modes (setuid/setgid/sticky survive because chmod follows chown), mtimes (directory
times are set last), xattrs (PAX ``SCHILY.xattr.*``, including ``security.capability``),
sparse files (runs of zeros become holes) and long names.

Directory times are deterministic, so that two conversions give identical trees: a directory
the layer changes without listing it keeps its previous mtime (as umoci does; containerd
leaves the unpack time there), and a parent the layer did not list but needs is created with
the mtime of the entry that needed it.

Safety: entry names are cleaned and an entry that climbs out of the root (``../``) is an
error (containerd clamps it silently; a layer that does this is hostile). Parent directories
are resolved inside the root: a symlink among them is followed as if the root were ``/``, as
containerd scopes them (``/var/run -> /run`` is common), but a relative symlink that climbs
above the root is an error; the entry itself is never followed. Any problem raises
``LayerApplyError`` naming the layer and the entry.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from ..errors import FormatError

__all__ = ["ApplyStatistics", "LayerApplyError", "apply_tar"]

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_XATTR_PREFIX = "SCHILY.xattr."
_MAX_SYMLINK_HOPS = 255
_WRITE_BLOCK = 1 << 20
_ZERO_BLOCK = 4096


class LayerApplyError(FormatError):
    """A layer tar is malformed or hostile, or applying an entry failed."""


@dataclass
class ApplyStatistics:
    entries: int = 0
    files: int = 0
    bytes_written: int = 0
    whiteouts: int = 0
    hardlinks: int = 0
    # real paths created or replaced by this layer (an opaque whiteout keeps them)
    unpacked: set[str] = field(default_factory=set)


def _clean(name: str) -> str | None:
    """The entry name relative to the root, cleaned; None if it escapes the root."""
    parts: list[str] = []
    for part in name.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
            continue
        parts.append(part)
    return "/".join(parts)


@dataclass
class _Deferred:
    path: str
    ino: int
    offset: int  # in the spool
    size: int
    name: str  # the tar entry, for errors
    # xattr values as the entries gave them (a write clears security.capability, and reading
    # it back gives the kernel's translation, not the bytes stored)
    xattrs: dict[str, bytes] = field(default_factory=dict)


class _Applier:
    def __init__(self, root: str, layer: str, vsize_limit: int,
                 defer: Callable[[str], bool] | None = None,
                 spool_dir: str | None = None) -> None:
        self.root = os.path.realpath(root)
        self.layer = layer
        self.limit = vsize_limit
        self.defer = defer
        self.deferred: dict[str, _Deferred] = {}  # by path, in the order they are written
        self.deferred_inodes: dict[int, _Deferred] = {}  # the same, by inode number
        self.spool: IO[bytes] | None = None  # the deferred files' data
        self.spool_dir = spool_dir
        self.stats = ApplyStatistics()
        self.dir_times: list[tuple[str, int]] = []  # directories listed in this layer
        self.kept_times: dict[str, int] = {}  # directories changed but not listed
        self.entry_mtime = 0  # ns, of the entry being applied

    def touch(self, directory: str) -> None:
        """Remember a directory's mtime before this layer changes its entries."""
        if directory not in self.kept_times:
            self.kept_times[directory] = os.lstat(directory).st_mtime_ns

    def error(self, entry: str, message: str) -> LayerApplyError:
        return LayerApplyError(f"layer {self.layer}: entry {entry!r}: {message}")

    # -- path resolution inside the root ---------------------------------------------------

    def resolve_parent(self, rel: str, entry: str, *, create: bool = True) -> str | None:
        """Real absolute path of the directory that holds ``rel``, resolved inside root.

        Missing directories are created (mode 0755, as containerd does) when ``create``;
        otherwise a missing one gives None.
        """
        parent = rel.rpartition("/")[0]
        return self._resolve(parent, entry, create=create)

    def _resolve(self, rel: str, entry: str, *, create: bool) -> str | None:
        """Follow ``rel`` (every component, symlinks included) scoped to the root."""
        todo = [p for p in rel.split("/") if p]
        done: list[str] = []
        hops = 0
        while todo:
            part = todo.pop(0)
            if part == ".":
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            path = os.path.join(self.root, *done, part)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    return None
                self.touch(os.path.dirname(path))
                os.mkdir(path, 0o755)
                self.kept_times[path] = self.entry_mtime
                st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise self.error(entry, "too many levels of symbolic links")
                target = os.readlink(path)
                if target.startswith("/"):
                    done = []
                elif _climbs_out(done, target):
                    raise self.error(entry, f"symlink {'/'.join([*done, part])} -> {target} "
                                            "points outside the image root")
                todo = [p for p in target.split("/") if p] + todo
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise self.error(entry, f"{'/'.join([*done, part])} is not a directory")
            done.append(part)
        return os.path.join(self.root, *done)

    # -- removal ------------------------------------------------------------------------------

    @staticmethod
    def _remove(path: str) -> None:
        """Remove a file, link, node or whole directory tree at ``path`` (not following)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            for name in os.listdir(path):
                _Applier._remove(os.path.join(path, name))
            os.rmdir(path)
        else:
            os.unlink(path)

    def whiteout(self, rel: str, entry: str) -> None:
        self.stats.whiteouts += 1
        base = rel.rpartition("/")[2]
        parent = self.resolve_parent(rel, entry, create=False)
        if parent is None:
            return  # nothing below to hide
        if base == OPAQUE_MARKER:
            # Empty the directory of what lower layers put there; keep this layer's entries.
            for name in os.listdir(parent):
                child = os.path.join(parent, name)
                if child not in self.stats.unpacked:
                    self.touch(parent)
                    self.forget(child, tree=_is_dir(child))
                    self._remove(child)
            return
        name = base[len(WHITEOUT_PREFIX):]
        if not name or name in (".", ".."):
            raise self.error(entry, "whiteout of an empty or dot name")
        hidden = os.path.join(parent, name)
        if os.path.lexists(hidden):
            self.touch(parent)
            self.forget(hidden, tree=_is_dir(hidden))
            self._remove(hidden)

    # -- entries ------------------------------------------------------------------------------

    def apply(self, tar: tarfile.TarFile) -> ApplyStatistics:
        for member in tar:
            self.stats.entries += 1
            rel = _clean(member.name)
            if rel is None:
                raise self.error(member.name, "path escapes the image root")
            if rel == "":
                if member.isdir():  # the root itself: only its metadata
                    self._metadata(self.root, member, is_dir=True)
                continue
            base = rel.rpartition("/")[2]
            self.entry_mtime = int(member.mtime * 1_000_000_000)
            if base.startswith(WHITEOUT_PREFIX):
                self.whiteout(rel, member.name)
                continue
            try:
                self.entry(tar, member, rel)
            except LayerApplyError:
                raise
            except OSError as exc:
                raise self.error(member.name, exc.strerror or str(exc)) from None
        self._write_deferred()
        listed = {path for path, _ in self.dir_times}
        for path, mtime in self.kept_times.items():
            if path not in listed and os.path.isdir(path) and not os.path.islink(path):
                os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        for path, mtime in reversed(self.dir_times):
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        return self.stats

    def entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str) -> None:
        parent = self.resolve_parent(rel, member.name)
        assert parent is not None
        path = os.path.join(parent, rel.rpartition("/")[2])
        try:
            existing = os.lstat(path)
        except FileNotFoundError:
            existing = None
        if existing is None or not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
            self.touch(parent)
        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                self.forget(path)
                os.unlink(path)
                existing = None
            if existing is None:
                os.mkdir(path, 0o700)
            self._metadata(path, member, is_dir=True)
        else:
            if existing is not None:
                # Replacing: a directory becomes a file, or a file is rewritten.
                if stat.S_ISDIR(existing.st_mode):
                    self.forget(path, tree=True)
                    self._remove(path)
                    existing = None
                elif not member.islnk():
                    self.forget(path)
                    os.unlink(path)
            if member.isreg():
                self._regular(tar, member, path)
            elif member.issym():
                os.symlink(member.linkname, path)
            elif member.islnk():
                self._hardlink(member, path, existing)
            elif member.ischr() or member.isblk():
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
            elif member.isfifo():
                os.mkfifo(path, 0o600)
            else:
                raise self.error(member.name, f"unsupported tar entry type {member.type!r}")
            self._metadata(path, member, is_dir=False)
        self.stats.unpacked.add(path)

    def _regular(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        if member.size > self.limit:
            raise self.error(member.name, f"size {member.size} exceeds the image's "
                                          f"{self.limit}-byte device")
        source = tar.extractfile(member)
        assert source is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            if self.defer is not None and member.size and self.defer(path):
                written = self._spool(source, fd, member, path)
            else:
                written = _copy_sparse(source, fd, member.size)
        except (tarfile.TarError, EOFError) as exc:
            raise self.error(member.name, f"truncated or corrupt data ({exc})") from None
        finally:
            os.close(fd)
        if written != member.size:
            raise self.error(member.name, f"stream ended after {written} of {member.size} bytes")
        self.stats.files += 1
        self.stats.bytes_written += member.size

    def _spool(self, source: IO[bytes], fd: int, member: tarfile.TarInfo, path: str) -> int:
        """Keep a deferred file's data aside; the file stays empty until the layer ends."""
        if self.spool is None:
            # closed by apply_tar when the layer is done
            self.spool = tempfile.TemporaryFile(  # noqa: SIM115
                prefix="overlaybd-py-deferred-", dir=self.spool_dir)
        offset = self.spool.seek(0, os.SEEK_END)
        copied = 0
        while copied < member.size:
            data = source.read(min(_WRITE_BLOCK, member.size - copied))
            if not data:
                break
            self.spool.write(data)
            copied += len(data)
        self.spool.flush()  # a full disk shows here, on this entry
        item = _Deferred(path, os.fstat(fd).st_ino, offset, copied, member.name)
        self.deferred[path] = self.deferred_inodes[item.ino] = item
        return copied

    def forget(self, path: str, *, tree: bool = False) -> None:
        """``path`` (with ``tree``, everything below it too) is about to be removed or
        replaced: its deferred data must not land in what takes its place. A file that
        keeps another name (a hard link of this layer) gets its data now instead."""
        if not self.deferred:
            return
        items = [self.deferred.pop(path)] if path in self.deferred else []
        if tree:
            below = path + "/"
            items += [self.deferred.pop(k) for k in list(self.deferred) if k.startswith(below)]
        for item in items:
            if os.lstat(item.path).st_nlink > 1:
                self._write(item)
            else:
                del self.deferred_inodes[item.ino]

    def _write_deferred(self) -> None:
        """Write the deferred files' data, after every other file of the layer, in tar
        order. (Files a later entry removed or replaced were forgotten then: anything else
        here is a bug, refused.)"""
        for item in list(self.deferred.values()):
            self._write(item)
        self.deferred.clear()

    def _write(self, item: _Deferred) -> None:
        """Write one deferred file's data; it keeps the mode, xattrs and times its entries
        gave it (a write clears setuid/setgid and security.capability, whoever writes)."""
        assert self.spool is not None
        del self.deferred_inodes[item.ino]
        try:
            fd = os.open(item.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise self.error(item.name, f"cannot write its deferred data: "
                                        f"{exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if st.st_ino != item.ino or not stat.S_ISREG(st.st_mode):
                raise self.error(item.name, "replaced before its deferred data was written")
            self.spool.seek(item.offset)
            written = _copy_sparse(self.spool, fd, item.size)
            if written != item.size:
                raise self.error(item.name, "deferred data lost: the spool file is short")
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
            for name, raw in item.xattrs.items():
                os.setxattr(fd, name, raw)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError as exc:
            raise self.error(item.name, exc.strerror or str(exc)) from None
        finally:
            os.close(fd)

    def _hardlink(self, member: tarfile.TarInfo, path: str, existing) -> None:
        target_rel = _clean(member.linkname)
        if target_rel is None or target_rel == "":
            raise self.error(member.name, f"hard link target {member.linkname!r} escapes "
                                          "the image root")
        target_parent = self.resolve_parent(target_rel, member.name, create=False)
        target = os.path.join(target_parent or self.root, target_rel.rpartition("/")[2])
        try:
            if target_parent is None:
                raise FileNotFoundError(target)
            target_st = os.lstat(target)
        except FileNotFoundError:
            raise self.error(member.name, f"hard link target {member.linkname!r} "
                                          "does not exist") from None
        if stat.S_ISDIR(target_st.st_mode):
            raise self.error(member.name, "hard link to a directory")
        if existing is not None:
            if os.path.samestat(existing, target_st):
                return  # already that inode (a tar listing the same link twice)
            self.forget(path)
            os.unlink(path)
        os.link(target, path, follow_symlinks=False)
        self.stats.hardlinks += 1

    def _metadata(self, path: str, member: tarfile.TarInfo, *, is_dir: bool) -> None:
        symlink = member.issym()
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
        if not symlink:
            os.chmod(path, stat.S_IMODE(member.mode))  # after chown: keeps setuid/setgid
        deferred = None
        if self.deferred_inodes and not is_dir and not symlink:
            deferred = self.deferred_inodes.get(os.lstat(path).st_ino)
        for key, value in member.pax_headers.items():
            if key.startswith(_XATTR_PREFIX):
                name = key[len(_XATTR_PREFIX):]
                raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) \
                    else value
                try:
                    os.setxattr(path, name, raw, follow_symlinks=False)
                except OSError as exc:
                    if exc.errno in (errno.ENOTSUP, errno.EPERM) and symlink:
                        continue  # user.* xattrs are not allowed on symlinks
                    raise
                if deferred is not None:
                    deferred.xattrs[name] = raw
        mtime = int(member.mtime * 1_000_000_000)
        if is_dir:
            self.dir_times.append((path, mtime))
        else:
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _climbs_out(done: list[str], target: str) -> bool:
    """True when relative ``target``, followed from directory ``done``, rises above root."""
    depth = len(done)
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def _copy_sparse(source: IO[bytes], fd: int, size: int) -> int:
    """Copy ``size`` bytes, leaving holes for all-zero 4 KiB blocks; returns bytes copied."""
    copied = 0
    zero = bytes(_ZERO_BLOCK)
    while copied < size:
        data = source.read(min(_WRITE_BLOCK, size - copied))
        if not data:
            break
        view = memoryview(data)
        run_start = None  # start of the current run of non-zero blocks
        for pos in range(0, len(view), _ZERO_BLOCK):
            block = view[pos : pos + _ZERO_BLOCK]
            if block == zero[: len(block)]:
                if run_start is not None:
                    os.pwrite(fd, view[run_start:pos], copied + run_start)
                    run_start = None
            elif run_start is None:
                run_start = pos
        if run_start is not None:
            os.pwrite(fd, view[run_start:], copied + run_start)
        copied += len(view)
    os.ftruncate(fd, copied)
    return copied


def apply_tar(stream: IO[bytes], root: str, *, layer: str, vsize_limit: int = 1 << 62,
              on_entry: Callable[[ApplyStatistics], None] | None = None,
              defer: Callable[[str], bool] | None = None,
              spool_dir: str | None = None) -> ApplyStatistics:
    """Apply the uncompressed tar ``stream`` (read sequentially) onto ``root``.

    ``defer(path)`` (``path``: the real path under ``root``) picks regular files whose data
    is written after every other file's
    (``convert.layout``: where their blocks go, nothing else; the data waits in a temporary
    file in ``spool_dir``, default ``$TMPDIR``, meanwhile). ``layer`` names the layer (its
    digest) in errors. Raises LayerApplyError for malformed, truncated or hostile archives;
    the tree may then hold part of the layer (callers apply into a scratch layer that they
    discard on error).
    """
    applier = _Applier(root, layer, vsize_limit, defer, spool_dir)
    try:
        with tarfile.open(fileobj=stream, mode="r|", format=tarfile.PAX_FORMAT,
                          encoding="utf-8", errors="surrogateescape") as tar:
            return applier.apply(tar)
    except LayerApplyError:
        raise
    except (tarfile.TarError, EOFError) as exc:
        raise LayerApplyError(f"layer {layer}: malformed or truncated tar after "
                              f"{applier.stats.entries} entries: {exc}") from None
    finally:
        if applier.spool is not None:
            applier.spool.close()

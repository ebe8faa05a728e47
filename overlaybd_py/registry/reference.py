"""Image references (``[host[:port]/]name[:tag][@digest]``) and platform selection from indexes.

Pure: no I/O. Normalisation follows the Docker conventions every registry user expects
(``busybox`` means ``docker.io/library/busybox:latest``) so that credentials and mirrors keyed
by host are found for short names too.
"""

from __future__ import annotations

import logging
import platform as _platform
import re
from dataclasses import dataclass, replace

from ..errors import FormatError, NotFoundError, UsageError
from ..formats.oci import Descriptor, Index, Platform, validate_digest

__all__ = ["DOCKER_HUB", "Reference", "host_platform", "select_manifest"]

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# The grammar of the distribution reference package, written out.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
_MAX_NAME = 255


@dataclass(frozen=True, slots=True)
class Reference:
    """A normalised reference. ``tag`` and ``digest`` may both be set; the digest wins."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str, *, default_tag: str | None = "latest") -> Reference:
        """Parse and normalise ``text``; raises UsageError naming what is wrong.

        Without tag or digest, ``default_tag`` is used (None keeps a bare repository).
        """
        original = text
        if not text or text != text.strip():
            raise UsageError(f"invalid image reference {original!r}: empty or padded")
        digest = None
        if "@" in text:
            text, digest = text.split("@", 1)
            try:
                validate_digest(digest)
            except FormatError:
                raise UsageError(f"invalid image reference {original!r}: bad digest") from None
        registry, remainder = DOCKER_HUB, text
        first, sep, rest = text.partition("/")
        if sep and (
            ("." in first or ":" in first) or first == "localhost" or first != first.lower()
        ):
            registry, remainder = first, rest
            if not _HOST_RE.fullmatch(registry):
                raise UsageError(f"invalid image reference {original!r}: bad host {registry!r}")
        tag = None
        name = remainder
        colon = remainder.rfind(":")
        if colon > remainder.rfind("/"):
            name, tag = remainder[:colon], remainder[colon + 1 :]
            if not _TAG_RE.fullmatch(tag):
                raise UsageError(f"invalid image reference {original!r}: bad tag {tag!r}")
        if registry.lower() in _DOCKER_HUB_ALIASES:
            registry = DOCKER_HUB
            if "/" not in name:
                name = f"library/{name}"
        if not _NAME_RE.fullmatch(name) or len(name) > _MAX_NAME:
            raise UsageError(
                f"invalid image reference {original!r}: repository {name!r} must be lower-case "
                "components separated by '/'"
            )
        if tag is None and digest is None:
            tag = default_tag
        return cls(registry, name, tag, digest)

    @property
    def api_host(self) -> str:
        """The host[:port] that serves the ``/v2/`` API for this registry."""
        return _DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if known, else the tag."""
        ref = self.digest or self.tag
        if ref is None:
            raise UsageError(f"{self} names a repository, not an image (add :tag or @digest)")
        return ref

    @property
    def repository_ref(self) -> Reference:
        """The same repository with neither tag nor digest."""
        return replace(self, tag=None, digest=None)

    def with_digest(self, digest: str) -> Reference:
        return replace(self, digest=validate_digest(digest))

    def with_tag(self, tag: str) -> Reference:
        if not _TAG_RE.fullmatch(tag):
            raise UsageError(f"invalid tag {tag!r}")
        return replace(self, tag=tag, digest=None)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def host_platform() -> Platform:
    """The platform of this machine, in OCI terms (``linux/amd64``, ``linux/arm64/v8``...)."""
    machine = _platform.machine().lower()
    variant = ""
    if machine.startswith("armv"):
        variant = machine[3:5].rstrip("l")
        machine = "arm"
    return Platform.normalised(_platform.system().lower() or "linux", machine, variant)


def select_manifest(index: Index, wanted: Platform | None = None) -> Descriptor:
    """Pick the manifest of ``index`` for ``wanted`` (default: the host's platform).

    An entry without a platform never matches (attestations and artifacts), nor does one
    whose variant differs after normalisation. Raises NotFoundError listing what exists.
    """
    wanted = wanted or host_platform()
    for descriptor in index.manifests:
        if descriptor.platform is not None and descriptor.platform.matches(wanted):
            return descriptor
    available = sorted({str(d.platform) for d in index.manifests if d.platform is not None})
    raise NotFoundError(
        f"no manifest for platform {wanted} in the index (it has: {', '.join(available) or 'none'})"
    )

"""The one exception tree of overlaybd-py. Translated to errno/gRPC/exit codes only at the edges.

    OverlaybdError
    ├── UsageError                 bad reference, flag, config or argument (CLI exit 2)
    ├── FormatError                bytes of a layer/blob/trace are not what the format allows
    │   ├── CorruptLayerError        a checksum failed or a structure is inconsistent
    │   └── UnsupportedFormatError   valid, but a variant we refuse (turboOCI, erofs, IDX_COMP, ...)
    ├── RegistryError              the registry refused or failed a request
    │   ├── AuthError                credentials missing or rejected
    │   ├── NotFoundError            manifest, blob, tag or repository does not exist
    │   │   └── NotOverlaybdError          the image has no overlaybd form (nor referrer)
    │   ├── DigestMismatchError      the registry served bytes whose digest is not what we asked for
    │   ├── UntrustedCertificateError  its TLS certificate does not verify (not retried)
    │   └── TransientError           worth retrying (5xx, 429, resets); carries retry_after
    ├── DeviceError                a read or write of the virtual device failed (FUSE: EIO)
    └── MountError                 loop device, FUSE or ext4 mount orchestration failed
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "CorruptLayerError",
    "DeviceError",
    "DigestMismatchError",
    "FormatError",
    "MountError",
    "NotFoundError",
    "NotOverlaybdError",
    "OverlaybdError",
    "RegistryError",
    "TransientError",
    "UnsupportedFormatError",
    "UntrustedCertificateError",
    "UsageError",
]


class OverlaybdError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code: int = 1


class UsageError(OverlaybdError):
    """The user asked for something impossible: bad reference, flag, config or argument."""

    exit_code = 2


def _show(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value} (0x{value:x})"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value[:32]).hex() + ("..." if len(value) > 32 else "")
    return repr(value)


class FormatError(OverlaybdError):
    """Bytes read from a layer, blob or trace do not follow the format.

    Carries where (``field``, byte ``offset``, blob ``digest`` when known) and what
    (``expected`` vs ``actual``) so that a user can tell which file is bad and why.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        offset: int | None = None,
        expected: object = None,
        actual: object = None,
        digest: str | None = None,
    ) -> None:
        self.message = message
        self.field = field
        self.offset = offset
        self.expected = expected
        self.actual = actual
        self.digest = digest
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.offset is not None:
            parts.append(f"at byte offset {self.offset} (0x{self.offset:x})")
        if self.expected is not None or self.actual is not None:
            parts.append(f"expected {_show(self.expected)}, found {_show(self.actual)}")
        text = ", ".join(parts)
        if self.digest:
            text = f"{self.digest}: {text}"
        return text

    def with_digest(self, digest: str) -> FormatError:
        """Return this error naming the blob it came from (parsers do not know digests)."""
        if not self.digest:
            self.digest = digest
        return self


class CorruptLayerError(FormatError):
    """A checksum failed or a structure of a layer is inconsistent."""


class UnsupportedFormatError(FormatError):
    """The bytes are a valid variant that overlaybd-py deliberately does not read."""


class RegistryError(OverlaybdError):
    """The registry refused or failed a request."""

    def __init__(self, message: str, *, status: int | None = None, url: str | None = None):
        self.status = status
        self.url = url
        super().__init__(message)


class AuthError(RegistryError):
    """Credentials are missing or were rejected (never includes the credentials)."""


class NotFoundError(RegistryError):
    """The manifest, blob, tag or repository does not exist."""


class NotOverlaybdError(NotFoundError):
    """The image exists but is not an overlaybd image and has no overlaybd referrer."""


class DigestMismatchError(RegistryError):
    """The registry served content whose digest differs from the one requested."""


class UntrustedCertificateError(RegistryError):
    """The registry's TLS certificate does not verify against the trusted CAs (not retried)."""


class TransientError(RegistryError):
    """A failure worth retrying (5xx, 429, connection reset, short body)."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        url: str | None = None,
    ):
        self.retry_after = retry_after
        super().__init__(message, status=status, url=url)


class DeviceError(OverlaybdError):
    """A read or write of the virtual block device failed (seen by the kernel as EIO)."""


class MountError(OverlaybdError):
    """Setting up or tearing down a FUSE, loop or ext4 mount failed."""

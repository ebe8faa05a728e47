"""What registry connections trust: the system's CA store (OpenSSL's default paths, which
``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` override), as containerd, docker and skopeo do on
Linux, plus an optional CA file for a registry whose certificate a private CA signed.
httpx alone would use certifi's bundle and miss a CA installed on the node.
"""

from __future__ import annotations

import os
import ssl
import threading

from ..errors import UntrustedCertificateError, UsageError

__all__ = ["certificate_problem", "ssl_context", "untrusted"]

HINT = ("if a private CA signed it, trust that CA: [registry] ca_file for the node daemon, "
        "--ca-file FILE for a command, or the system's store (update-ca-certificates)")
# OpenSSL's verify codes that mean "no trusted CA signed this" (the others, such as an
# expired certificate or one for another host name, are the registry's to fix).
_UNKNOWN_ISSUER = {2, 18, 19, 20, 21}


def _system_store() -> bool:
    paths = ssl.get_default_verify_paths()
    if paths.cafile:  # resolved: set only when the file exists
        return True
    return bool(paths.capath and os.path.isdir(paths.capath) and os.listdir(paths.capath))


def ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A client context that verifies certificates and host names against the system's CAs
    (certifi's bundle on a machine without any) and ``ca_file``'s. Raises UsageError when
    ``ca_file`` cannot be read or holds no certificate.

    Built once per CA file and shared (building one reads the whole store, ~25 ms, on
    every client open otherwise); a CA file or system bundle that changed on disk since
    (``update-ca-certificates``) gets a new one, which replaces it."""
    system = ssl.get_default_verify_paths().cafile
    stamp = (_stamp(ca_file), system, _stamp(system))
    with _contexts_lock:
        kept = _contexts.get(ca_file)
        if kept is None or kept[0] != stamp:
            kept = _contexts[ca_file] = (stamp, _build_context(ca_file))
    return kept[1]


_contexts: dict[str | None, tuple[tuple, ssl.SSLContext]] = {}
_contexts_lock = threading.Lock()


def _stamp(path: str | None) -> tuple[int, int] | None:
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size) if st else None


def _build_context(ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not _system_store():
        import certifi

        context.load_verify_locations(cafile=certifi.where())
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except FileNotFoundError:
            raise UsageError(f"CA file {ca_file} does not exist") from None
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"CA file {ca_file}: not PEM certificates ({exc})") from None
    return context


def certificate_problem(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification failure behind ``exc`` (its causes and contexts)."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
    return None


def untrusted(host: str, problem: ssl.SSLCertVerificationError,
              url: str | None = None) -> UntrustedCertificateError:
    reason = problem.verify_message or problem.reason or str(problem)
    what = HINT if problem.verify_code in _UNKNOWN_ISSUER else \
        "its certificate must be renewed or made out for this host name on the registry"
    return UntrustedCertificateError(
        f"{host}: the registry's TLS certificate is not trusted ({reason}); {what}", url=url)

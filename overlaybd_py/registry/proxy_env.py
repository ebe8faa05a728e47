"""Proxies from the environment: ``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY`` and
``NO_PROXY`` (either case), with the meanings containerd, docker and skopeo give them.

A URL gets the proxy of its scheme (``ALL_PROXY`` when that is unset) unless its host is
exempt: loopback hosts (``localhost``, 127.0.0.0/8, ::1) never go through a proxy, as in Go's
HTTP client, and ``NO_PROXY`` lists more: ``*`` (everything), domain names (``example.com``
and ``.example.com`` both cover the domain and its subdomains), IP addresses, CIDR ranges,
each optionally with ``:port``. Pure: it reads the mapping it is given.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from ..errors import UsageError

__all__ = ["EnvProxies"]


def _get(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name.upper()) or environ.get(name.lower())
    return value.strip() or None if value else None


def _proxy_url(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    url = value if "://" in value else f"http://{value}"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UsageError(f"{name}={value!r}: not a proxy URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UsageError(f"{name}={value!r}: expected an http(s) proxy, http://HOST:PORT")
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_port(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):  # [v6]:port
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


@dataclass(frozen=True, slots=True)
class EnvProxies:
    """The proxy settings of an environment; ``EnvProxies()`` means none."""

    http: str | None = None
    https: str | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> EnvProxies:
        """Read the variables (raises UsageError naming a malformed one)."""
        fallback = _proxy_url(_get(environ, "ALL_PROXY"), "ALL_PROXY")
        exempt = _get(environ, "NO_PROXY") or ""
        return cls(
            http=_proxy_url(_get(environ, "HTTP_PROXY"), "HTTP_PROXY") or fallback,
            https=_proxy_url(_get(environ, "HTTPS_PROXY"), "HTTPS_PROXY") or fallback,
            no_proxy=tuple(e.strip().lower() for e in exempt.replace(" ", ",").split(",")
                           if e.strip()),
        )

    def __bool__(self) -> bool:
        return bool(self.http or self.https)

    def proxy_for(self, url: str | httpx.URL) -> str | None:
        """The proxy URL for a request to ``url``, or None to connect directly."""
        parsed = httpx.URL(url)
        proxy = self.https if parsed.scheme == "https" else self.http
        if proxy is None:
            return None
        host = parsed.host.lower().rstrip(".")
        if _is_loopback(host) or self._exempt(host, parsed.port or
                                              (443 if parsed.scheme == "https" else 80)):
            return None
        return proxy

    def _exempt(self, host: str, port: int) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        for entry in self.no_proxy:
            if entry == "*":
                return True
            name, entry_port = _split_port(entry)
            if entry_port is not None and entry_port != port:
                continue
            if address is not None:
                try:
                    if address in ipaddress.ip_network(name, strict=False):
                        return True
                except ValueError:
                    pass
                continue
            domain = name.removeprefix("*").lstrip(".")
            if domain and (host == domain or host.endswith("." + domain)):
                return True
        return False

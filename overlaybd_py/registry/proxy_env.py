"""Proxies from the environment: ``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY`` (either
case; upper case wins), read as Go's HTTP client reads them, so as containerd, docker and
skopeo on the same node do.

An ``https`` URL goes through ``HTTPS_PROXY``, an ``http`` one through ``HTTP_PROXY``, unless
its host is exempt: ``localhost`` and loopback addresses never go through a proxy, and
``NO_PROXY`` lists more, separated by commas or spaces: ``*`` (everything), a domain name
(``example.com`` covers it and its subdomains, ``.example.com`` and ``*.example.com`` the
subdomains only), an IP address or CIDR range; each may carry ``:port``. A proxy this client
cannot use (a SOCKS proxy: httpx needs an extra package for it) is ignored with a warning,
as the environment was before this client read it. Pure: it reads the mapping it is given.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from ..errors import UsageError

__all__ = ["EnvProxies", "proxy_setting"]

log = logging.getLogger(__name__)

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _get(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name) or environ.get(name.lower())
    return value.strip() or None if value else None


def _without_password(url: str) -> str:
    scheme, sep, rest = url.rpartition("://")
    _userinfo, at, hostport = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{hostport}"


def _usable(url: str) -> bool:
    """An http(s) proxy URL with a host (httpx needs an extra package for SOCKS)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def _proxy_url(value: str | None, name: str) -> str | None:
    """The proxy a variable names, or None (unset, or one this client cannot use)."""
    if value is None:
        return None
    url = value if "://" in value else f"http://{value}"
    if not _usable(url):
        log.warning("ignoring %s=%s: only http(s) proxies are supported (http://HOST:PORT)",
                    name, _without_password(url))
        return None
    return url


def _address(host: str) -> _Address | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host[:port]`` or ``[v6]:port``; a port that is empty or not a number counts as none
    (it then matches any port)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        return entry, None
    return host, int(port) if port.isascii() and port.isdigit() else None


@dataclass(frozen=True, slots=True)
class _Exemption:
    """One NO_PROXY entry, parsed."""

    network: _Network | None = None  # an address or CIDR range
    domain: str = ""  # without a leading "." or "*."
    subdomains_only: bool = False
    port: int | None = None

    @classmethod
    def parse(cls, entry: str) -> _Exemption | None:
        name, port = _split_port(entry)
        try:
            return cls(network=ipaddress.ip_network(name, strict=False), port=port)
        except ValueError:
            pass
        subdomains_only = name.startswith((".", "*."))
        domain = name.removeprefix("*").lstrip(".").rstrip(".")
        return cls(domain=domain, subdomains_only=subdomains_only, port=port) if domain else None

    def covers(self, host: str, address: _Address | None, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address is not None and address in self.network
        if host.endswith("." + self.domain):
            return True
        return host == self.domain and not self.subdomains_only


def proxy_setting(value: str | None, where: str) -> tuple[str | None, EnvProxies | None]:
    """A ``--proxy`` flag or ``[registry] proxy`` setting as ``ClientConfig``'s ``proxy`` and
    ``env_proxies``: unset -> the environment's; ``none`` -> no proxy at all; a URL -> every
    request through it. Raises UsageError naming ``where`` for anything else."""
    if value is None or value == "":
        return None, None
    if value.strip().lower() == "none":
        return None, EnvProxies()
    if not _usable(value):
        raise UsageError(f"{where} {_without_password(value)!r}: expected http(s)://HOST:PORT "
                         "or 'none'")
    return value, None


@dataclass(frozen=True, slots=True)
class EnvProxies:
    """The proxy settings of an environment; ``EnvProxies()`` means none."""

    http: str | None = None
    https: str | None = None
    bypass_all: bool = False
    exemptions: tuple[_Exemption, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> EnvProxies:
        entries = (_get(environ, "NO_PROXY") or "").replace(" ", ",").split(",")
        entries = [e.strip().lower() for e in entries if e.strip()]
        parsed = (_Exemption.parse(e) for e in entries if e != "*")
        return cls(
            http=_proxy_url(_get(environ, "HTTP_PROXY"), "HTTP_PROXY"),
            https=_proxy_url(_get(environ, "HTTPS_PROXY"), "HTTPS_PROXY"),
            bypass_all="*" in entries,
            exemptions=tuple(e for e in parsed if e is not None),
        )

    def __bool__(self) -> bool:
        return bool(self.http or self.https) and not self.bypass_all

    def proxy_for(self, url: str | httpx.URL) -> str | None:
        """The proxy URL for a request to ``url``, or None to connect directly."""
        parsed = httpx.URL(url)
        proxy = self.https if parsed.scheme == "https" else self.http
        if proxy is None or self.bypass_all:
            return None
        host = parsed.host.lower().rstrip(".")
        address = _address(host)
        if host == "localhost" or (address is not None and address.is_loopback):
            return None
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        if any(e.covers(host, address, port) for e in self.exemptions):
            return None
        return proxy

"""Node configuration: where state, the cache and the control socket live, how to reach
registries, what the daemon serves besides mounts (metrics) and where the snapshotter keeps
its snapshots. Loaded from a TOML file (default ``/etc/overlaybd-py/config.toml``, optional);
command-line flags override it. The README's "Node configuration" section documents every key.

Pure: reads one file, depends on nothing but ``errors``.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_SNAPSHOTTER_ROOT",
    "DEFAULT_SNAPSHOTTER_SOCKET",
    "NodeConfig",
    "load_config",
    "parse_address",
    "parse_prefetch_gap",
    "parse_size",
]

DEFAULT_CONFIG = "/etc/overlaybd-py/config.toml"
DEFAULT_STATE_DIR = "/run/overlaybd-py"
DEFAULT_CACHE_DIR = "/var/lib/overlaybd-py/cache"
DEFAULT_SNAPSHOTTER_ROOT = "/var/lib/overlaybd-py/snapshotter"
DEFAULT_SNAPSHOTTER_SOCKET = "/run/overlaybd-py/snapshotter.sock"
DAEMON_DIR = "daemon"  # the node daemon's server directory under state_dir

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40,
          "tb": 10**12, "tib": 1 << 40}

# The keys each table accepts: a typo is an error, never a silently ignored setting.
_KNOWN = {
    "": {"state_dir", "cache_dir", "cache_size", "memory_cache_size", "registry", "prefetch",
         "metrics", "download", "snapshotter"},
    "registry": {"insecure", "mirrors", "proxy", "retry_deadline", "credentials",
                 "docker_config_dir", "ca_file"},
    "prefetch": {"concurrency", "gap"},
    "metrics": {"address"},
    "download": {"rate"},
    "snapshotter": {"root", "socket"},
}
_CREDENTIAL_SOURCES = ("docker-config", "none")


def parse_prefetch_gap(value: str | int, what: str) -> int:
    """A prefetch gap (``[prefetch] gap``): a size of at most 16 MiB."""
    gap = parse_size(value, what)
    if gap > 16 << 20:
        raise UsageError(f"{what} must be at most 16MiB, got {gap} bytes")
    return gap


def parse_size(value: str | int, what: str = "size") -> int:
    """Bytes from ``10GiB``, ``512MiB``, ``1000`` (0 = unbounded)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise UsageError(f"{what}: {value} is negative")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise UsageError(f"{what}: {value!r} is not a size such as 512MiB or 10GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_address(value: str, what: str = "address") -> tuple[str, int]:
    """``(host, port)`` from ``host:port`` or ``[v6]:port``; raises UsageError."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", value.strip())
    if not match:
        raise UsageError(f"{what}: {value!r} is not host:port (e.g. 127.0.0.1:9863)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise UsageError(f"{what}: port {port} is out of range")
    return host, port


@dataclass(frozen=True)
class NodeConfig:
    state_dir: str = DEFAULT_STATE_DIR
    cache_dir: str = DEFAULT_CACHE_DIR
    cache_size: int = 0  # bytes; 0 = unbounded
    memory_cache_size: int = 64 << 20  # decoded chunks kept in memory
    plain_http: tuple[str, ...] = ()  # registry hosts reached over http
    mirrors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    proxy: str | None = None
    use_docker_config: bool = True  # registry.credentials = "docker-config" (or "none")
    docker_config_dir: str | None = None  # default: $DOCKER_CONFIG or ~/.docker
    ca_file: str | None = None  # CAs trusted besides the system's (PEM), for every registry
    # Parallel range reads of a prefetch (and of the background download). 8: what the
    # cold-start figures use (200 Mbit/10 ms, zstd: 2 -> 3.1 s, 4 -> 2.5 s, 8 -> 2.4 s,
    # 16 -> 2.7-3.0 s; bench/README.md).
    prefetch_concurrency: int = 8
    prefetch_gap: int | None = None  # trace records closer than this merge; None = default
    metrics_address: str | None = None  # host:port for Prometheus, off when unset
    download_rate: int = 0  # bytes/s of the background whole-image download; 0 = off
    retry_deadline: float = 60.0  # seconds a registry read keeps retrying before EIO
    snapshotter_root: str = DEFAULT_SNAPSHOTTER_ROOT
    snapshotter_socket: str = DEFAULT_SNAPSHOTTER_SOCKET
    source: str | None = None  # the file this came from

    def with_overrides(self, **changes: Any) -> NodeConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def daemon_dir(self) -> str:
        return str(Path(self.state_dir) / DAEMON_DIR)

    @property
    def daemon_socket(self) -> str:
        """The node daemon's control socket."""
        return str(Path(self.daemon_dir) / "control.sock")

    @property
    def daemon_lock(self) -> str:
        """The file a running node daemon holds an exclusive ``flock`` on."""
        return str(Path(self.state_dir) / "daemon.lock")


def _expect(table: dict, key: str, kind: type | tuple[type, ...], path: str) -> Any:
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise UsageError(f"{path}: '{key}' should be {name}, got {value!r}")
    return value


def _check_keys(data: dict, path: str) -> None:
    for table, known in _KNOWN.items():
        section = data if not table else data.get(table, {})
        if not isinstance(section, dict):
            raise UsageError(f"{path}: [{table}] should be a table")
        unknown = set(section) - known
        if unknown:
            where = f"[{table}] " if table else ""
            raise UsageError(f"{path}: unknown setting(s) {where}{', '.join(sorted(unknown))}")


def load_config(path: str | None) -> NodeConfig:
    """Read a config file; ``None`` reads ``$OVERLAYBD_PY_CONFIG`` or the default path if it
    exists. Raises UsageError naming the file and the key for anything it cannot use."""
    explicit = path is not None
    path = path or os.environ.get("OVERLAYBD_PY_CONFIG") or DEFAULT_CONFIG
    file = Path(path)
    if not file.exists():
        if explicit:
            raise UsageError(f"config file {path} does not exist")
        return NodeConfig()
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    _check_keys(data, path)
    settings: dict[str, Any] = {"source": str(file)}
    for key in ("state_dir", "cache_dir"):
        if key in data:
            settings[key] = _expect(data, key, str, path)
    for key in ("cache_size", "memory_cache_size"):
        if key in data:
            settings[key] = parse_size(_expect(data, key, (str, int), path), f"{path}: {key}")
    registry = data.get("registry", {})
    if "insecure" in registry:
        hosts = _expect(registry, "insecure", list, path)
        settings["plain_http"] = tuple(str(h) for h in hosts)
    if "mirrors" in registry:
        mirrors = _expect(registry, "mirrors", dict, path)
        for host, urls in mirrors.items():
            if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
                raise UsageError(f"{path}: registry.mirrors.{host} should be a list of URLs")
            for url in urls:
                if not url.startswith(("http://", "https://")):
                    raise UsageError(f"{path}: mirror {url!r} for {host} is not an http(s) URL")
        settings["mirrors"] = {h: tuple(u) for h, u in mirrors.items()}
    if "proxy" in registry:
        proxy = _expect(registry, "proxy", str, path).strip()
        if proxy and proxy.lower() != "none" and not proxy.startswith(("http://", "https://")):
            raise UsageError(f"{path}: registry.proxy should be an http(s) URL or 'none'")
        settings["proxy"] = proxy or None
    if "retry_deadline" in registry:
        deadline = _expect(registry, "retry_deadline", (int, float), path)
        if deadline <= 0:
            raise UsageError(f"{path}: registry.retry_deadline must be positive")
        settings["retry_deadline"] = float(deadline)
    if "credentials" in registry:
        source = _expect(registry, "credentials", str, path)
        if source not in _CREDENTIAL_SOURCES:
            raise UsageError(f"{path}: registry.credentials must be one of "
                             f"{', '.join(_CREDENTIAL_SOURCES)}, got {source!r}")
        settings["use_docker_config"] = source == "docker-config"
    if "docker_config_dir" in registry:
        settings["docker_config_dir"] = _expect(registry, "docker_config_dir", str, path)
    if "ca_file" in registry:
        ca_file = _expect(registry, "ca_file", str, path)
        if not os.path.isabs(ca_file):
            raise UsageError(f"{path}: registry.ca_file must be an absolute path")
        if not os.path.isfile(ca_file):
            raise UsageError(f"{path}: registry.ca_file {ca_file} does not exist")
        import ssl  # here: only a config that names a CA file pays for it

        try:  # the file alone (the system's store is the clients' to load)
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"{path}: registry.ca_file {ca_file}: not PEM certificates "
                             f"({exc})") from None
        settings["ca_file"] = ca_file
    prefetch = data.get("prefetch", {})
    if "concurrency" in prefetch:
        concurrency = _expect(prefetch, "concurrency", int, path)
        if not 1 <= concurrency <= 256:
            raise UsageError(f"{path}: prefetch.concurrency must be between 1 and 256")
        settings["prefetch_concurrency"] = concurrency
    if "gap" in prefetch:
        settings["prefetch_gap"] = parse_prefetch_gap(
            _expect(prefetch, "gap", (str, int), path), f"{path}: prefetch.gap")
    metrics = data.get("metrics", {})
    if "address" in metrics:
        address = _expect(metrics, "address", str, path)
        if address:
            parse_address(address, f"{path}: metrics.address")
        settings["metrics_address"] = address or None
    download = data.get("download", {})
    if "rate" in download:
        settings["download_rate"] = parse_size(_expect(download, "rate", (str, int), path),
                                               f"{path}: download.rate")
    snapshotter = data.get("snapshotter", {})
    for key in ("root", "socket"):
        if key in snapshotter:
            value = _expect(snapshotter, key, str, path)
            if not os.path.isabs(value):
                raise UsageError(f"{path}: snapshotter.{key} must be an absolute path")
            settings[f"snapshotter_{key}"] = value
    return NodeConfig(**settings)

"""Node configuration: where state, the cache and the control socket live, how to reach
registries. Loaded from a TOML file (default ``/etc/overlaybd-py/config.toml``, optional);
command-line flags override it. See the README's "Node configuration" section.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = ["DEFAULT_CONFIG", "NodeConfig", "load_config", "parse_size"]

DEFAULT_CONFIG = "/etc/overlaybd-py/config.toml"
DEFAULT_STATE_DIR = "/run/overlaybd-py"
DEFAULT_CACHE_DIR = "/var/lib/overlaybd-py/cache"

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40,
          "tb": 10**12, "tib": 1 << 40}


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


@dataclass(frozen=True)
class NodeConfig:
    state_dir: str = DEFAULT_STATE_DIR
    cache_dir: str = DEFAULT_CACHE_DIR
    cache_size: int = 0  # bytes; 0 = unbounded
    memory_cache_size: int = 64 << 20  # decoded chunks kept in memory
    plain_http: tuple[str, ...] = ()  # registry hosts reached over http
    mirrors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    proxy: str | None = None
    docker_config_dir: str | None = None  # default: $DOCKER_CONFIG or ~/.docker
    prefetch_concurrency: int = 16
    metrics_address: str | None = None  # host:port for Prometheus, off when unset
    download_rate: int = 0  # bytes/s of the background whole-image download; 0 = off
    retry_deadline: float = 60.0  # seconds a registry read keeps retrying before EIO
    source: str | None = None  # the file this came from

    def with_overrides(self, **changes: Any) -> NodeConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _expect(table: dict, key: str, kind: type | tuple[type, ...], path: str) -> Any:
    value = table[key]
    if not isinstance(value, kind):
        raise UsageError(f"{path}: '{key}' should be {getattr(kind, '__name__', kind)}, "
                         f"got {value!r}")
    return value


def load_config(path: str | None) -> NodeConfig:
    """Read a config file; ``None`` reads the default path if it exists."""
    explicit = path is not None
    path = path or os.environ.get("OVERLAYBD_PY_CONFIG") or DEFAULT_CONFIG
    file = Path(path)
    if not file.exists():
        if explicit:
            raise UsageError(f"config file {path} does not exist")
        return NodeConfig()
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    known = {"state_dir", "cache_dir", "cache_size", "memory_cache_size", "registry",
             "prefetch", "metrics", "download"}
    unknown = set(data) - known
    if unknown:
        raise UsageError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    settings: dict[str, Any] = {"source": str(file)}
    for key in ("state_dir", "cache_dir"):
        if key in data:
            settings[key] = _expect(data, key, str, path)
    for key in ("cache_size", "memory_cache_size"):
        if key in data:
            settings[key] = parse_size(_expect(data, key, (str, int), path), key)
    registry = data.get("registry", {})
    if registry:
        if "insecure" in registry:
            hosts = _expect(registry, "insecure", list, path)
            settings["plain_http"] = tuple(str(h) for h in hosts)
        if "mirrors" in registry:
            mirrors = _expect(registry, "mirrors", dict, path)
            settings["mirrors"] = {h: tuple(u) for h, u in mirrors.items()}
        if "proxy" in registry:
            settings["proxy"] = _expect(registry, "proxy", str, path) or None
        if "retry_deadline" in registry:
            deadline = _expect(registry, "retry_deadline", (int, float), path)
            if deadline <= 0:
                raise UsageError(f"{path}: registry.retry_deadline must be positive")
            settings["retry_deadline"] = float(deadline)
        if "docker_config_dir" in registry:
            settings["docker_config_dir"] = _expect(registry, "docker_config_dir", str, path)
    if "prefetch" in data and "concurrency" in data["prefetch"]:
        settings["prefetch_concurrency"] = _expect(data["prefetch"], "concurrency", int, path)
    if "metrics" in data and "address" in data["metrics"]:
        settings["metrics_address"] = _expect(data["metrics"], "address", str, path) or None
    if "download" in data and "rate" in data["download"]:
        settings["download_rate"] = parse_size(data["download"]["rate"], "download.rate")
    return NodeConfig(**settings)

"""How commands report: one JSON object on stdout with --json, aligned text otherwise."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any


def emit_json(obj: Mapping[str, Any]) -> None:
    """Write one JSON object (and nothing else) to stdout."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def emit_table(rows: list[tuple[str, Any]]) -> None:
    """Write ``key: value`` lines with the keys aligned."""
    width = max((len(k) for k, _ in rows), default=0)
    for key, value in rows:
        print(f"{key + ':':<{width + 1}} {value}")


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")

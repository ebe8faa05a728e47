"""The CLI's start-up cost: building the parser, and ``mount``'s path to a running daemon,
import neither trio, httpx, the engine, the daemon nor the registry client (together ~0.3 s
of a ~0.4 s start before they were imported where used)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("trio", "httpx", "overlaybd_py.engine", "overlaybd_py.daemon", "overlaybd_py.registry",
         "overlaybd_py.convert.converter")

_PROBE = """
import json, sys
from overlaybd_py.cli import build_parser
from overlaybd_py.cli.node import _mount, _mount_params, _report_mount
build_parser().parse_args(["mount", "--plain-http", "host:5000/img:1", "/mnt/x"])
print(json.dumps([m for m in {heavy!r} if m in sys.modules]))
"""


def test_building_the_parser_and_the_mount_path_import_nothing_heavy() -> None:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY)],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


"""The CLI's start-up cost: building the parser, ``mount``'s path to a running daemon and
``status``/``umount``'s reading of the records import neither trio, httpx, the engine, the
serving daemon nor the registry client (together ~0.3 s of a ~0.4 s start before they were
imported where used)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("trio", "httpx", "overlaybd_py.engine", "overlaybd_py.daemon._server",
         "overlaybd_py.registry", "overlaybd_py.convert.converter")


def _loaded_after(code: str) -> list[str]:
    probe = (f"import json, sys\n{code}\n"
             f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


def test_building_the_parser_and_the_mount_path_import_nothing_heavy() -> None:
    assert _loaded_after(
        "from overlaybd_py.cli import build_parser\n"
        "from overlaybd_py.cli.node import _mount, _mount_params, _report_mount\n"
        "build_parser().parse_args(['mount', '--plain-http', 'host:5000/img:1', '/mnt/x'])"
    ) == []


def test_status_and_umount_read_the_records_without_the_serving_side(tmp_path: Path) -> None:
    server = tmp_path / "fg-1"  # a foreground server that is alive (this test's process)
    (server / "mounts").mkdir(parents=True)
    (server / "pid").write_text(f"{os.getpid()}\n")
    assert _loaded_after(
        "from overlaybd_py.cli.node import _status, _umount, _clean_up_dead_servers\n"
        "from overlaybd_py.daemon import dead_server_dirs, read_records, server_dirs\n"
        f"assert dead_server_dirs({str(tmp_path)!r}, daemon=False) == []\n"
        f"assert [read_records(d) for d in server_dirs({str(tmp_path)!r})] == [[]]\n"
    ) == []

"""formats/ is pure: it imports only the standard library, _accel and errors (h11's test)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import overlaybd_py.formats

ALLOWED_LOCAL = {"_accel", "errors"}


def test_formats_import_only_stdlib_and_accel():
    root = Path(overlaybd_py.formats.__file__).parent
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 1:  # from .x import: a sibling in formats/
                    continue
                if node.level == 2:
                    names = [(node.module or "").split(".")[0]] if node.module else [
                        alias.name for alias in node.names]
                    bad = [n for n in names if n not in ALLOWED_LOCAL]
                    assert not bad, f"{path.name} imports overlaybd_py.{bad}"
                    continue
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            for name in names:
                assert name in sys.stdlib_module_names, f"{path.name} imports {name}"

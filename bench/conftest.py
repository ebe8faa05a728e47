"""Benchmark configuration: make the repository root importable (for ``tests.fixtures``).

Run benchmarks explicitly, e.g. ``pytest bench/bench_registry.py``; they are not collected by
the test run (their files are not named ``test_*.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

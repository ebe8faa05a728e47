"""Start-up time of the ``overlaybd-py`` command, side by side with the same command when
every command group's dependencies are imported up front (as the CLI did before it imported
them where used), and with the bare interpreter.

    .venv/bin/python bench/bench_cli.py [--rounds 15] [--output bench/results/cli]

Cases: ``--help``; ``mount --help`` (parsing plus everything ``mount`` imports before it
asks the node daemon: the same modules as a real ``mount REF DIR`` minus the request);
``convert --help``. Rounds interleave the sides; the report gives medians and the ratio
eager / ours (higher = ours starts faster). No root needed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {"--help": ["--help"], "mount --help": ["mount", "--help"],
         "convert --help": ["convert", "--help"]}
EAGER = ("import sys, trio, httpx, overlaybd_py.engine, overlaybd_py.daemon._server, "
         "overlaybd_py.registry, overlaybd_py.convert.converter, overlaybd_py.coldstart.harness; "
         "from overlaybd_py.cli import main; sys.exit(main(sys.argv[1:]))")


def _time(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "cli"))
    args = parser.parse_args()
    py = sys.executable
    times: dict[str, dict[str, list[float]]] = {c: {"ours": [], "eager": []} for c in CASES}
    interpreter: list[float] = []
    for _ in range(2):  # warm the page cache for every file the sides import
        for case_args in CASES.values():
            _time([py, "-m", "overlaybd_py", *case_args])
            _time([py, "-c", EAGER, *case_args])
    for round_ in range(args.rounds):
        interpreter.append(_time([py, "-c", "pass"]))
        for case, case_args in CASES.items():
            sides = [("ours", [py, "-m", "overlaybd_py", *case_args]),
                     ("eager", [py, "-c", EAGER, *case_args])]
            for side, argv in sides if round_ % 2 == 0 else sides[::-1]:
                times[case][side].append(_time(argv))
    result = {"rounds": args.rounds, "interpreter_s": statistics.median(interpreter),
              "cases": {}}
    for case, sides in times.items():
        ours, eager = statistics.median(sides["ours"]), statistics.median(sides["eager"])
        result["cases"][case] = {"ours_s": ours, "eager_s": eager, "ratio": eager / ours,
                                 "runs": sides}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    rows = "\n".join(f"| `overlaybd-py {case}` | {c['ours_s'] * 1000:.0f} ms | "
                     f"{c['eager_s'] * 1000:.0f} ms | {c['ratio']:.2f} |"
                     for case, c in result["cases"].items())
    report = (f"# CLI start-up\n\nMedians of {args.rounds} interleaved rounds; the bare "
              f"interpreter (`python -c pass`) took {result['interpreter_s'] * 1000:.0f} ms. "
              "Eager = the same command with every group's dependencies imported first (how "
              "the CLI started before). Ratio = eager / ours.\n\n"
              "| command | ours | eager | ratio |\n|---|---|---|---|\n" + rows + "\n")
    (out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

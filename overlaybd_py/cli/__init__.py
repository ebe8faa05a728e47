"""The ``overlaybd-py`` command: argument parsing and the translation of errors to exit codes.

Each command group lives in its own module with a ``register(subparsers)`` function that adds
its parsers and sets ``func`` (a callable taking the parsed namespace and returning an exit
code). Only this module turns exceptions into messages and exit codes.

Building the parser imports no engine, registry or trio code (about 0.3 s of imports): each
command imports what it needs when it runs, so ``--help`` and the commands that only talk
to a daemon (``mount``, ``umount``, ``status``) start quickly. A test keeps it so.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import OverlaybdError

__all__ = ["main"]

log = logging.getLogger(__name__)

# Command groups, in the order `--help` shows them.
_GROUPS = ("layer", "image", "node", "convert", "trace", "snapshotter", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlaybd-py",
        description="Lazy container images as overlaybd block devices.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    import importlib

    for group in _GROUPS:
        importlib.import_module(f"{__name__}.{group}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        try:
            return int(args.func(args) or 0)
        except BaseExceptionGroup as group:  # a failure inside a trio nursery
            from ..engine._tasks import unwrap_group

            raise unwrap_group(group) from None
    except OverlaybdError as exc:
        print(f"overlaybd-py: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("overlaybd-py: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

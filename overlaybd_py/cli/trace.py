"""``overlaybd-py trace show|plot|push``: read, draw and ship recorded traces."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import UsageError
from ._output import emit_json, emit_table, human_bytes
from .image import client_from_args, registry_options

__all__ = ["register"]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _show(args: argparse.Namespace) -> int:
    from ..coldstart.traces import load_trace, summarize

    loaded = load_trace(args.trace)
    summary = summarize(loaded)
    if args.json:
        emit_json({"trace": args.trace, "has_log": loaded.log is not None,
                   **summary.to_json()})
        return 0
    rows: list[tuple[str, Any]] = [
        ("records", f"{summary.records} ({human_bytes(summary.record_bytes)} of layer reads, "
                    f"{human_bytes(summary.unique_layer_bytes)} distinct)"),
    ]
    if summary.reads is not None:
        amp = "-" if summary.amplification is None else f"{summary.amplification:.2f}x"
        hit = "-" if summary.hit_ratio is None else f"{summary.hit_ratio:.1%}"
        rows += [
            ("reads", f"{summary.reads} ({human_bytes(summary.bytes_read or 0)}; "
                      f"{human_bytes(summary.bytes_covered or 0)} distinct)"),
            ("fetched", f"{human_bytes(summary.bytes_fetched or 0)} in {summary.requests} "
                        f"requests ({summary.prefetch_requests} by prefetch, "
                        f"{human_bytes(summary.prefetch_bytes or 0)})"),
            ("amplification", f"{amp} (bytes fetched / bytes covered)"),
            ("hit ratio", f"{hit} of reads needed no request"),
            ("time to first byte", _seconds(summary.time_to_first_byte_s)),
            ("read wait", _seconds(summary.read_wait_s)),
            ("critical-path fetch", _seconds(summary.critical_path_fetch_s)),
            ("duration", _seconds(summary.duration_s)),
        ]
    else:
        rows.append(("events", f"no {args.trace}.jsonl: times and fetches unknown"))
    emit_table(rows)
    for layer in summary.layers:
        print(f"  layer {layer.index}: {layer.records} records, "
              f"{human_bytes(layer.unique_bytes)} distinct read, {layer.fetches} fetches, "
              f"{human_bytes(layer.bytes_fetched)} fetched")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from ..coldstart.plots import plot_trace
    from ..coldstart.traces import load_trace

    loaded = load_trace(args.trace)
    outdir = args.output or os.path.dirname(os.path.abspath(args.trace))
    paths = plot_trace(loaded, outdir, args.format)
    if args.json:
        emit_json({"files": paths})
    else:
        for path in paths:
            print(path)
    return 0


def _push(args: argparse.Namespace) -> int:
    import trio

    from ..coldstart.accel import push_trace
    from ..registry import Reference

    try:
        with open(args.trace, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {args.trace}: {exc.strerror}") from None
    ref = Reference.parse(args.ref)
    dest = Reference.parse(args.dest) if args.dest else None

    async def main() -> dict[str, Any]:
        async with await client_from_args(args) as client:
            return await push_trace(client, ref, data, dest)

    result = trio.run(main)
    if args.json:
        emit_json(result)
    else:
        print(f"pushed {result['manifest']} as a {result['pushed_as']} with acceleration layer "
              f"{result['acceleration_layer']['digest']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    trace = subparsers.add_parser(
        "trace", help="show, plot or push recorded access traces",
        description="Traces are recorded with 'mount --record-trace FILE': FILE is the "
        "original overlaybd trace format, FILE.jsonl the timed event log.")
    commands = trace.add_subparsers(dest="trace_command", metavar="COMMAND")
    commands.required = True

    p = commands.add_parser("show", help="summary: bytes read and fetched, hit ratio, times")
    p.add_argument("trace", metavar="TRACE", help="trace file (or its .jsonl log)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_show)

    p = commands.add_parser("plot", help="fetch timeline, cumulative bytes, layer heat map")
    p.add_argument("trace", metavar="TRACE", help="trace file (or its .jsonl log)")
    p.add_argument("--output", "-o", metavar="DIR", help="where to write (default: beside "
                   "TRACE)")
    p.add_argument("--format", choices=("png", "svg"), default="png")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plot)

    p = commands.add_parser(
        "push", help="add TRACE to REF as its acceleration layer and push",
        description="Push REF's overlaybd image again with TRACE (a trace file or a priority "
        "list) as a top 'acceleration layer', which mounts prefetch automatically. A "
        "directly named image is re-tagged (or tagged --dest); a referrer is replaced by a "
        "newer referrer of the same subject.")
    p.add_argument("ref", metavar="REF")
    p.add_argument("trace", metavar="TRACE")
    p.add_argument("--dest", metavar="REF", help="tag the new manifest here instead")
    p.add_argument("--json", action="store_true")
    registry_options(p)
    p.set_defaults(func=_push)

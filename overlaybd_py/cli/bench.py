"""``overlaybd-py bench cold-start``: full pull vs lazy vs lazy + prefetch vs warm, over an
emulated link, with a report and plots (see ``bench/README.md``)."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from ..config import parse_prefetch_gap
from ..errors import UsageError
from ._output import emit_json

__all__ = ["register"]


def _cold_start(args: argparse.Namespace) -> int:
    from ..coldstart.harness import BenchOptions, run_bench
    from ..coldstart.network import LINKS
    from ..coldstart.variants import VARIANTS

    variants = tuple(v.strip() for v in args.variants.split(",")) if args.variants \
        else tuple(VARIANTS)
    opts = BenchOptions(
        image=args.image, output=Path(os.path.abspath(args.output)), run=args.run,
        link=LINKS[args.link], repeat=args.repeat, cache_dir=Path(os.path.abspath(
            args.cache_dir)), overlaybd=args.overlaybd, runner=args.runner,
        mounter=args.mounter, concurrency=args.prefetch_concurrency,
        gap=parse_prefetch_gap(args.prefetch_gap, "--prefetch-gap") if args.prefetch_gap
        else None,
        variants=variants,
        keep_work=args.keep_work, convert_args=tuple(shlex.split(args.convert_args or "")))
    result, leftovers = run_bench(opts)
    if leftovers:
        raise UsageError(f"the benchmark could not remove: {', '.join(leftovers)}")
    if args.json:
        emit_json(result)
    else:
        print(f"{opts.output / 'report.md'}")
        for name in result["variant_order"]:
            v = result["variants"][name]
            ratio = result["ratios_to_full_pull"].get(name)
            print(f"  {name:14} median {v['median_s']:.2f} s"
                  + (f"  ({ratio:.2f}x full pull)" if ratio is not None else "")
                  + f"  fetched {v['bytes_fetched'] / (1 << 20):.1f} MiB")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..coldstart.network import LINKS

    bench = subparsers.add_parser("bench", help="benchmarks: cold start over an emulated link")
    commands = bench.add_subparsers(dest="bench_command", metavar="COMMAND")
    commands.required = True
    p = commands.add_parser(
        "cold-start", help="time a container start: full pull, lazy, lazy + prefetch, warm",
        description="Run IMAGE's start four ways on this machine against a registry in a "
        "private network namespace (bandwidth shaped with tc tbf, latency from a delay proxy) "
        "and write result.json, report.md and plots to --output. IMAGE is recipe:tiny, "
        "recipe:numpy-pandas (built offline and cached), a skopeo source (oci:DIR:TAG, "
        "docker://REF, ...) or a registry reference. Needs root.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--run", metavar="CMD", help="the start to time, run with /bin/sh -c "
                   "(default for a recipe: its own)")
    p.add_argument("--link", choices=tuple(LINKS), default="loopback")
    p.add_argument("--repeat", type=int, default=3, metavar="N")
    p.add_argument("--output", "-o", metavar="DIR", required=True)
    p.add_argument("--cache-dir", metavar="DIR", default="/var/cache/overlaybd-py-bench",
                   help="built images, registry storage and converted layers, kept between "
                   "runs (default %(default)s)")
    p.add_argument("--overlaybd", metavar="SRC", help="an already converted overlaybd image "
                   "(skopeo source) instead of running 'overlaybd-py convert'")
    p.add_argument("--convert-args", metavar="ARGS", help="extra flags for 'overlaybd-py "
                   "convert', e.g. '--algorithm zstd --chunk-size 16'")
    p.add_argument("--runner", choices=("containerd", "chroot"), default="containerd",
                   help="how CMD runs: ctr run (default) or chroot")
    p.add_argument("--mounter", choices=("auto", "daemon", "cli", "inprocess"),
                   default="auto",
                   help="how overlaybd images are mounted: requests to a running node daemon "
                   "(as the snapshotter sends them), 'overlaybd-py mount' commands, or a "
                   "private serving process (auto: daemon once 'mount' records and "
                   "prefetches, else inprocess)")
    p.add_argument("--prefetch-concurrency", type=int, default=8, metavar="N")
    p.add_argument("--prefetch-gap", metavar="SIZE",
                   help="the node's [prefetch] gap (default: the engine's, 128KiB)")
    p.add_argument("--variants", metavar="LIST", help="comma-separated subset of "
                   "full_pull,lazy,lazy_prefetch,warm")
    p.add_argument("--keep-work", action="store_true", help="keep DIR/work (mount points, "
                   "caches, logs) for inspection")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cold_start)

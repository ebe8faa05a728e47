"""Pictures of traces and of benchmark results (matplotlib, headless "Agg" backend).

matplotlib is imported only here and only when a plot is asked for: reading, recording and
replaying traces never need it.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import UsageError
from .traces import LoadedTrace

__all__ = ["plot_bench", "plot_trace"]

HEAT_BINS = 256  # columns of the per-layer heat map
MiB = 1 << 20


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("plots need matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, outdir: str, name: str, fmt: str) -> str:
    path = os.path.join(outdir, f"{name}.{fmt}")
    fig.tight_layout()
    fig.savefig(path, format=fmt, dpi=120)
    return path


def plot_trace(loaded: LoadedTrace, outdir: str, fmt: str = "png",
               prefix: str = "") -> list[str]:
    """Write ``timeline``, ``cumulative`` (these two need the JSONL log) and ``heatmap``
    pictures into ``outdir``; returns their paths."""
    if fmt not in ("png", "svg"):
        raise UsageError(f"plot format must be png or svg, not {fmt!r}")
    plt = _pyplot()
    os.makedirs(outdir, exist_ok=True)
    written = []
    log = loaded.log
    if log is not None and (log.reads or log.fetches):
        fig, ax = plt.subplots(figsize=(10, 1.2 + 0.6 * max(1, len(log.header.layers))))
        colours = {"read": "tab:red", "readahead": "tab:orange", "prefetch": "tab:blue",
                   "other": "tab:gray"}
        for origin, colour in colours.items():
            spans = [(f.t, f.dt, f.layer) for f in log.fetches if f.origin == origin]
            if spans:
                for layer in sorted({s[2] for s in spans}):
                    ax.broken_barh([(t, max(dt, 1e-4)) for t, dt, lyr in spans if lyr == layer],
                                   (layer - 0.35, 0.7), facecolors=colour, alpha=0.6)
                ax.plot([], [], color=colour, linewidth=6, label=f"fetch ({origin})")
        waits = [(r.t, r.dt) for r in log.reads if r.fetches]
        if waits:
            ax.broken_barh(waits, (-0.9, 0.4), facecolors="black")
            ax.plot([], [], color="black", linewidth=6, label="read that fetched")
        ax.set_yticks([-0.7] + [layer.index for layer in log.header.layers],
                      ["reads"] + [f"layer {layer.index}" for layer in log.header.layers])
        ax.set_xlabel("seconds since recording started")
        ax.set_title("Fetches per layer over time")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        written.append(_save(fig, outdir, prefix + "timeline", fmt))
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, events in (
            ("bytes read (device)", sorted(log.reads, key=lambda e: e.t + e.dt)),
            ("bytes fetched (registry)", sorted(log.fetches, key=lambda e: e.t + e.dt)),
        ):
            xs, ys, total = [0.0], [0.0], 0
            for e in events:
                if not e.ok:
                    continue
                total += e.length
                xs.append(e.t + e.dt)
                ys.append(total / MiB)
            ax.step(xs, ys, where="post", label=label)
        ax.set_xlabel("seconds since recording started")
        ax.set_ylabel("MiB (cumulative)")
        ax.set_title("Cumulative bytes over time")
        ax.legend()
        written.append(_save(fig, outdir, prefix + "cumulative", fmt))
        plt.close(fig)

    written.append(_heatmap(plt, loaded, outdir, fmt, prefix))
    return written


def _heatmap(plt: Any, loaded: LoadedTrace, outdir: str, fmt: str, prefix: str) -> str:
    import numpy as np

    records = list(loaded.trace.reads()) if loaded.trace else []
    if not records and loaded.log is not None:
        records = [(p.layer, p.offset, p.length) for r in loaded.log.reads for p in r.pieces]
    else:
        records = [(r.layer_index, r.offset, r.count) for r in records]
    sizes: dict[int, int] = {}
    if loaded.log is not None:
        sizes = {layer.index: layer.lsmt_size for layer in loaded.log.header.layers}
    layer_ids = sorted(set(sizes) | {r[0] for r in records}) or [0]
    for layer, offset, length in records:  # without a log: the extent the trace shows
        sizes[layer] = max(sizes.get(layer, 0), offset + length)
    grid = np.zeros((len(layer_ids), HEAT_BINS))
    for row, layer in enumerate(layer_ids):
        size = max(sizes.get(layer, 1), 1)
        bin_bytes = size / HEAT_BINS
        for lyr, offset, length in records:
            if lyr != layer:
                continue
            end = offset + length
            first, last = int(offset // bin_bytes), int(min(end - 1, size - 1) // bin_bytes)
            for b in range(max(first, 0), min(last, HEAT_BINS - 1) + 1):
                lo, hi = max(offset, b * bin_bytes), min(end, (b + 1) * bin_bytes)
                grid[row, b] += max(0.0, hi - lo) / bin_bytes
    np.clip(grid, 0, 1, out=grid)
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.5 * len(layer_ids)))
    image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1,
                      interpolation="nearest")
    ax.set_yticks(range(len(layer_ids)), [f"layer {i}" for i in layer_ids])
    ax.set_xlabel(f"position in the layer's uncompressed LSMT file ({HEAT_BINS} bins)")
    ax.set_title("Parts of each layer the start read (fraction of each bin)")
    fig.colorbar(image, ax=ax, label="fraction read")
    path = _save(fig, outdir, prefix + "heatmap", fmt)
    plt.close(fig)
    return path


def plot_bench(result: dict[str, Any], outdir: str, fmt: str = "png") -> list[str]:
    """Bar charts of a ``bench cold-start`` result: median time per variant (runs as dots)
    and bytes fetched per variant against the image size."""
    plt = _pyplot()
    os.makedirs(outdir, exist_ok=True)
    variants = [v for v in result["variant_order"] if v in result["variants"]]
    data = [result["variants"][v] for v in variants]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(variants, [d["median_s"] or 0 for d in data], color="tab:blue", alpha=0.7)
    for i, d in enumerate(data):
        ax.scatter([i] * len(d["runs_s"]), d["runs_s"], color="black", s=12, zorder=3)
    ax.set_ylabel("seconds to CMD's exit (median; dots: runs)")
    ax.set_title(f"Cold start of {result['image']} ({result['link']['name']})")
    paths = [_save(fig, outdir, "coldstart-times", fmt)]
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(variants, [(d["bytes_fetched"] or 0) / MiB for d in data], color="tab:orange")
    ax.axhline(result["image_bytes"] / MiB, color="black", linestyle="--",
               label="image size (compressed layers)")
    if result.get("workload_bytes_covered"):
        ax.axhline(result["workload_bytes_covered"] / MiB, color="tab:red", linestyle=":",
                   label="bytes the workload's reads cover")
    ax.set_ylabel("MiB fetched from the registry (median run)")
    ax.set_title("Bytes fetched per variant")
    ax.legend()
    paths.append(_save(fig, outdir, "coldstart-bytes", fmt))
    plt.close(fig)
    return paths

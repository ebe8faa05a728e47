"""``report.md`` of a ``bench cold-start`` result: medians and spread per variant, ratios to
the full pull, bytes fetched against the image size and the workload's footprint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.prefetch import DEFAULT_GAP
from ..mount import LEAN_READAHEAD_KB, READAHEAD_KB

__all__ = ["write_report"]

MiB = 1 << 20
TITLES = {
    "full_pull": "full pull (pull + unpack + run)",
    "lazy": "overlaybd-py lazy",
    "lazy_prefetch": "lazy + trace prefetch",
    "warm": "warm (blocks cached)",
}


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:.1f} MiB"


def _gap(n: int | None) -> str:
    return f"{DEFAULT_GAP // 1024} KiB (default)" if n is None else f"{n // 1024} KiB"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


# The benchmark's own long-lived processes, in the order of the CPU table's columns.
CPU_PARTS = {"docker-registry": "registry", "delay proxy": "delay proxy",
             "overlaybd-py daemon": "node daemon", "containerd": "containerd"}


def _cpu_table(result: dict[str, Any]) -> list[str]:
    rows = [(name, result["variants"][name].get("cpu_s")) for name in result["variant_order"]
            if name in result["variants"]]
    rows = [(n, c) for n, c in rows if c]
    if not rows:
        return []
    parts = [p for p in CPU_PARTS if any(p in c for _n, c in rows)]
    cpus = result["machine"]["cpus"]
    lines = [f"CPU-seconds during the timed run (median; the machine's {cpus} CPUs together, "
             "then the benchmark's own servers; *rest* is the start itself: CMD, ctr, runc, "
             "the kernel, and the serving process when overlaybd mounts do not go through "
             "the node daemon):", "",
             "| variant | machine | " + " | ".join(CPU_PARTS[p] for p in parts) + " | rest |",
             "|---|---:|" + "---:|" * (len(parts) + 1)]
    for name, cpu in rows:
        known = [cpu.get(p) for p in parts]
        rest = cpu["machine"] - sum(x for x in known if x is not None)
        cells = ["-" if x is None else f"{x:.2f}" for x in known]
        lines.append(f"| {TITLES.get(name, name)} | {cpu['machine']:.2f} | "
                     + " | ".join(cells) + f" | {max(rest, 0.0):.2f} |")
    return [*lines, ""]


def _covered_by(name: str | None) -> str:
    if name == "record":
        return (" (the untimed start that recorded the prefetch trace: nothing prefetched, "
                f"the kernel's read-ahead at {LEAN_READAHEAD_KB} KiB)")
    if name == "lazy":
        return (f" (the first lazy start: the kernel's read-ahead at {READAHEAD_KB} KiB "
                "reads around what the start asks for)")
    return f" ({TITLES.get(name, name)}'s first start)" if name else ""


def write_report(result: dict[str, Any], path: Path, plots: list[str]) -> None:
    link = result["link"]
    shaped = "not shaped" if link["rate_mbit"] is None else f"{link['rate_mbit']:g} Mbit/s"
    lines = [
        f"# Cold start: `{result['image']}`",
        "",
        f"- command: `{result['run']}`",
        f"- link: **{link['name']}** ({shaped}, RTT {link['rtt_ms']:g} ms"
        + (", added per response by a delay proxy: TCP handshakes and slow start are not "
           "delayed)" if link["rtt_ms"] else ")"),
        f"- image: {_mib(result.get('image_bytes'))} compressed in "
        f"{result.get('image_layers')} layers; overlaybd image "
        f"{_mib(result.get('overlaybd_image_bytes'))} in {result.get('overlaybd_layers')} "
        f"layers (found via {result.get('overlaybd_via')})",
        f"- the start's reads cover {_mib(result.get('workload_bytes_covered'))} of the device"
        + _covered_by(result.get("workload_bytes_covered_by")),
        f"- {result['repeat']} run(s) per variant; runner `{result['runner']}`, overlaybd "
        f"mounts through `{result['mounter']}`; prefetch concurrency "
        f"{result['prefetch_concurrency']}, gap "
        f"{_gap(result.get('prefetch_gap'))}; page caches dropped before every timed run",
        "",
        "| variant | median | min - max | vs full pull | bytes fetched | of image |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    image = result.get("image_bytes") or 0
    for name in result["variant_order"]:
        v = result["variants"].get(name)
        if v is None:
            continue
        ratio = result["ratios_to_full_pull"].get(name)
        share = f"{v['bytes_fetched'] / image:.1%}" if image else "-"
        lines.append(
            f"| {TITLES.get(name, name)} | {_s(v['median_s'])} | {_s(v['min_s'])} - "
            f"{_s(v['max_s'])} | {'-' if ratio is None else f'{ratio:.2f}x'} | "
            f"{_mib(v['bytes_fetched'])} | {share} |")
    lines.append("")
    if result.get("amplification"):
        parts = [f"{TITLES.get(k, k)} {v:.2f}x" for k, v in result["amplification"].items()]
        lines += ["Bytes fetched / bytes the start's reads cover (block-level amplification; "
                  "compressed bytes over uncompressed reads): " + ", ".join(parts) + ".", ""]
    traces = [(name, result["variants"][name].get("trace_summary"))
              for name in ("lazy", "lazy_prefetch") if name in result["variants"]]
    traces = [(n, t) for n, t in traces if t]
    if traces:
        lines += ["| first run's trace | reads | requests | hit ratio | time to first byte | "
                  "read wait | critical-path fetch |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, t in traces:
            hit = "-" if t["hit_ratio"] is None else f"{t['hit_ratio']:.0%}"
            lines.append(
                f"| {TITLES[name]} | {t['reads']} | {t['requests']} "
                f"({t['prefetch_requests']} prefetch) | {hit} | "
                f"{_s(t['time_to_first_byte_s'])} | {_s(t['read_wait_s'])} | "
                f"{_s(t['critical_path_fetch_s'])} |")
        lines.append("")
    lines += _cpu_table(result)
    workload = result.get("workload_only") or {}
    if workload.get("overlayfs_s") and workload.get("overlaybd_s"):
        lines += [
            "Workload alone (CMD again in the same rootfs, page caches dropped, nothing "
            "fetched): overlayfs over the unpacked image "
            f"{', '.join(f'{x:.2f}' for x in workload['overlayfs_s'])} s; overlaybd-py "
            f"(ext4 on the block device, blocks in the local cache) "
            f"{', '.join(f'{x:.2f}' for x in workload['overlaybd_s'])} s: "
            f"**{workload['ratio']:.2f}x** of overlayfs.", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    lines += [
        "## Notes", "",
        "- Times run from the first step of the start (pull, or mount) to CMD's exit; a "
        "node daemon (or the serving process) and containerd are already running, as on a "
        "node.",
        "- bytes fetched = blob bytes the registry's own log says it sent during the timed "
        "part (the median run): the requests it answered, by its log's clock, before CMD "
        "exited; a prefetch still running then is counted up to there "
        "(`bytes_fetched_until_teardown` in result.json has the rest).",
        f"- measured {result['started']} on Linux {result['machine']['kernel']}, "
        f"{result['machine']['cpus']} CPUs; the benchmark's processes share them.",
    ]
    path.write_text("\n".join(lines) + "\n")

"""``bench cold-start``: the whole experiment on one machine, nothing outside it.

Order of work:

1. *Prepare* (untimed): the image as an OCI layout (a recipe is built and cached), pushed
   with skopeo to a docker-registry on 127.0.0.1 whose storage is kept in the cache dir;
   converted with ``overlaybd-py convert --dest`` to a tag named after the source digest
   and the conversion flags, unless that tag exists (or ``--overlaybd SRC`` gives a
   converted image); sizes read from the manifests.
2. *Link*: that registry is restarted inside a new network namespace, reached over a veth
   pair shaped with ``tc tbf``, behind the delay proxy when the link has a round-trip time.
3. *Runs*: for each repeat, each variant (``variants.py``): setup, drop page caches, timed
   part, untimed extras, teardown. Bytes fetched come from the registry's own log.
4. *Outputs*: ``result.json``, ``report.md``, plots, the traces.

Whatever happens (an error, Ctrl-C, SIGTERM), the ``ExitStack`` unmounts, stops every
process by pid and deletes the namespace; ``leftovers()`` checks that nothing remains.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..convert.layout import DEFAULT_LAYOUT
from ..errors import OverlaybdError, UsageError
from ..mount import mounts_under
from ..registry import ClientConfig, Reference, RegistryClient
from ..resolve import resolve_overlaybd
from . import images
from .cpu import CpuMeter
from .lazymount import LazyMountProcess
from .network import BENCH_SUBNETS, Link, NetNamespace
from .servers import BenchRegistry, Processes, free_port, start_delay_proxy
from .traces import load_trace, summarize
from .variants import MOUNTERS, RUNNERS, VARIANTS, Variant, cli_supports_traces, drop_caches

__all__ = ["Bench", "BenchOptions", "run_bench"]

log = logging.getLogger(__name__)

REPO = "bench/app"
RESULT_VERSION = 1


@dataclass
class BenchOptions:
    image: str
    output: Path
    run: str | None = None
    link: Link = field(default_factory=lambda: Link("loopback", None, 0.0))
    repeat: int = 3
    cache_dir: Path = Path("/var/cache/overlaybd-py-bench")
    overlaybd: str | None = None  # a converted image (skopeo source) instead of converting
    runner: str = "containerd"
    mounter: str = "auto"
    concurrency: int = 8
    gap: int | None = None  # the node's [prefetch] gap; None: the default
    variants: tuple[str, ...] = tuple(VARIANTS)
    keep_work: bool = False
    convert_args: tuple[str, ...] = ()  # extra 'overlaybd-py convert' flags


def _skopeo_copy(src: str, dest: str) -> None:
    argv = ["skopeo", "copy", "--preserve-digests", "--dest-tls-verify=false"]
    if src.startswith("docker://"):
        argv.append("--src-tls-verify=false")
    proc = subprocess.run([*argv, src, dest], capture_output=True, text=True)
    if proc.returncode:
        raise UsageError(f"skopeo copy {src} failed: {proc.stderr.strip()[-1500:]}")


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


class Bench:
    def __init__(self, opts: BenchOptions) -> None:
        if opts.repeat < 1:
            raise UsageError("--repeat must be at least 1")
        unknown = [v for v in opts.variants if v not in VARIANTS]
        if unknown:
            raise UsageError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
        if opts.runner not in RUNNERS:
            raise UsageError(f"--runner must be one of {', '.join(RUNNERS)}")
        self.opts = opts
        self.output = opts.output
        self.work = opts.output / "work"
        self.traces = opts.output / "traces"
        self.processes = Processes()
        self.processes_extra: list[LazyMountProcess] = []
        self.interrupted: int | None = None  # the signal that asked to stop (run_bench)
        self.runner = RUNNERS[opts.runner]()
        mounter = opts.mounter
        if mounter == "auto":
            mounter = "daemon" if cli_supports_traces() else "inprocess"
        if mounter not in MOUNTERS:
            raise UsageError(f"--mounter must be auto, {', '.join(MOUNTERS)}")
        if opts.gap is not None and mounter == "inprocess":
            raise UsageError("--prefetch-gap sets the node daemon's [prefetch] gap: use "
                             "--mounter daemon or cli")
        self.mounter = MOUNTERS[mounter]()
        self.netns: NetNamespace | None = None
        self.registry: BenchRegistry | None = None
        self.source_ref = ""
        self.overlaybd_ref = ""
        self.cmd = opts.run or ""
        self.prefetch_trace: Path | None = None
        self.info: dict[str, Any] = {}
        self.scratch: list[Path] = []  # short-named directories under /run

    # -- preparing ------------------------------------------------------------------------

    def _prepare_images(self, stack: contextlib.ExitStack) -> None:
        cache = self.opts.cache_dir
        source, default_run = images.source_spec(self.opts.image, cache)
        if not self.cmd:
            if default_run is None:
                raise UsageError("--run CMD is required unless IMAGE is a recipe:NAME")
            self.cmd = default_run
        storage = cache / "registry-storage"
        registry = BenchRegistry(storage, self.work / "registry-prepare.log", self.processes)
        registry.start("127.0.0.1", free_port())
        try:
            src_ref = f"{registry.host}/{REPO}:latest"
            _skopeo_copy(source, f"docker://{src_ref}")
            if self.opts.overlaybd:
                obd_ref = f"{registry.host}/{REPO}:overlaybd"
                _skopeo_copy(self.opts.overlaybd, f"docker://{obd_ref}")
            else:
                # One tag per source and conversion flags: a cached conversion is reused
                # only for the same image converted the same way (the default layout named:
                # conversions made before it was cold-last are tar order).
                digest = _run_trio(self._sizes, src_ref, None)["image_digest"]
                key = hashlib.sha256(" ".join([digest, f"layout={DEFAULT_LAYOUT}",
                                               *self.opts.convert_args]).encode())
                obd_ref = f"{registry.host}/{REPO}:obd-{key.hexdigest()[:12]}"
            self.info.update(_run_trio(self._sizes, src_ref, obd_ref))
            if not self.info.get("overlaybd_image_bytes"):
                self._convert(src_ref, obd_ref, cache)
                self.info.update(_run_trio(self._sizes, src_ref, obd_ref))
            self.info["convert_args"] = list(self.opts.convert_args)
            self._obd_tag = obd_ref.rsplit(":", 1)[1]
        finally:
            registry.stop()

    async def _sizes(self, src_ref: str, obd_ref: str | None) -> dict[str, Any]:
        async with await RegistryClient.open(ClientConfig(plain_http=True)) as client:
            manifest, _index = await client.resolve(Reference.parse(src_ref))
            out: dict[str, Any] = {
                "image_bytes": sum(d.size for d in manifest.parsed.layers),
                "image_layers": len(manifest.parsed.layers),
                "image_digest": manifest.descriptor.digest,
            }
            if obd_ref is None:
                return out
            try:
                resolved = await resolve_overlaybd(client, Reference.parse(obd_ref))
            except OverlaybdError as exc:  # no overlaybd image yet: convert
                log.info("no overlaybd image for %s yet: %s", obd_ref, exc)
                return out
            out.update(overlaybd_image_bytes=sum(d.size for d in resolved.layers),
                       overlaybd_layers=len(resolved.layers), overlaybd_via=resolved.via,
                       overlaybd_digest=resolved.image.digest)
            return out

    def _convert(self, src_ref: str, obd_ref: str, cache: Path) -> None:
        log.info("converting %s to %s", src_ref, obd_ref)
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "overlaybd_py", "convert", src_ref, "--dest", obd_ref,
             "--plain-http", "--quiet", "--cache-dir", str(cache / "convert"),
             "--work-dir", str(self.work / "convert"), *self.opts.convert_args],
            capture_output=True, text=True)
        if proc.returncode:
            raise UsageError(f"overlaybd-py convert failed ({proc.returncode}): "
                             f"{proc.stderr.strip()[-2000:]}")
        self.info["convert_s"] = round(time.monotonic() - started, 2)

    def _start_link(self, stack: contextlib.ExitStack) -> None:
        self.netns = NetNamespace(self.opts.link)
        stack.enter_context(self.netns)
        registry = BenchRegistry(self.opts.cache_dir / "registry-storage",
                                 self.work / "registry.log", self.processes)
        port = free_port()
        registry.start(self.netns.inner, port, exec_argv=self.netns.exec_argv)
        stack.callback(registry.stop)
        self.registry = registry
        host = registry.host
        if self.opts.link.rtt_ms:
            proxy_port = port + 1 if port < 65535 else port - 1
            proxy = f"{self.netns.inner}:{proxy_port}"
            start_delay_proxy(self.processes, proxy, registry.host, self.opts.link.rtt_ms,
                              self.work / "delayproxy.log", self.netns.exec_argv)
            host = proxy
        self.source_ref = f"{host}/{REPO}:latest"
        self.overlaybd_ref = f"{host}/{REPO}:{self._obd_tag}"

    def ensure_prefetch_trace(self) -> Path:
        """The trace the prefetch variant replays, recorded once by an untimed start on an
        empty cache (what a node does for an image's acceleration layer), with what the node
        chooses for a recording mount: the lean read-ahead, so the trace holds the start's
        reads and not the kernel's read-ahead around them."""
        if self.prefetch_trace is not None:
            return self.prefetch_trace
        from .variants import Lazy

        recorder = Lazy()
        recorder.name, recorder.read_ahead_kb = "record", None
        recorder.setup(self, 0)
        try:
            recorder.timed(self, 0)
        finally:
            recorder.teardown(self, 0)
        self.prefetch_trace = recorder.trace
        return recorder.trace  # type: ignore[return-value]

    def scratch_dir(self, tag: str) -> Path:
        """A fresh directory with a short path (for unix sockets), removed at the end."""
        import tempfile

        path = Path(tempfile.mkdtemp(prefix=f"obdpy{os.getpid()}-{tag[:12]}-", dir="/run"))
        self.scratch.append(path)
        return path

    # -- measuring --------------------------------------------------------------------------

    def _measure(self, variants: list[Variant]) -> dict[str, Any]:
        results: dict[str, Any] = {v.name: {"runs": []} for v in variants}
        assert self.registry is not None
        for run in range(self.opts.repeat):
            for variant in variants:
                self.check_interrupted()
                print(f"bench: run {run + 1}/{self.opts.repeat}: {variant.name}",
                      file=sys.stderr, flush=True)
                try:
                    variant.setup(self, run)
                    drop_caches()
                    mark = self.registry.log_mark()
                    meter = CpuMeter.start(self.processes.named())
                    started = time.monotonic()
                    output = variant.timed(self, run)
                    seconds = time.monotonic() - started
                    ended = time.time()
                    cpu = meter.stop()
                    self.registry.settle()  # the last requests' log lines
                    fetched = self.registry.blob_bytes_served(mark, until=ended)
                    extra = variant.after(self, run)
                finally:
                    variant.teardown(self, run)
                total = self.registry.blob_bytes_served(mark)
                results[variant.name]["runs"].append({
                    "seconds": round(seconds, 4), "bytes_fetched": fetched,
                    "bytes_fetched_until_teardown": total,
                    "output_tail": output.strip()[-200:], "cpu_s": cpu, **extra,
                })
        return results

    def _summarise(self, measured: dict[str, Any]) -> dict[str, Any]:
        variants: dict[str, Any] = {}
        for name, data in measured.items():
            runs = data["runs"]
            seconds = [r["seconds"] for r in runs]
            fetched = [r["bytes_fetched"] for r in runs]
            entry = {
                "runs_s": seconds, "median_s": _median(seconds),
                "min_s": min(seconds), "max_s": max(seconds),
                "bytes_fetched": int(statistics.median(fetched)),
                "bytes_fetched_runs": fetched, "runs": runs,
            }
            cpu = [r["cpu_s"] for r in runs if "cpu_s" in r]
            if cpu:  # per part, the median over the runs that measured it
                entry["cpu_s"] = {part: round(statistics.median(r[part] for r in cpu
                                                                if part in r), 3)
                                  for part in dict.fromkeys(k for r in cpu for k in r)}
            workload = [r["workload_s"] for r in runs if "workload_s" in r]
            if workload:
                entry["workload_only_s"] = workload
            trace = self.traces / f"{name}-0.trace"
            if trace.exists():
                entry["trace_summary"] = summarize(load_trace(str(trace))).to_json()
            variants[name] = entry
        return variants

    def run(self) -> dict[str, Any]:
        started = time.time()
        for leftover in NetNamespace.leftovers():
            log.info("removing network namespace %s left by a killed benchmark", leftover)
            subprocess.run(["ip", "netns", "del", leftover], check=False)
        if os.geteuid() != 0:
            raise UsageError("bench cold-start needs root (namespaces, mounts, containerd)")
        self.output.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.traces, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.traces.mkdir(parents=True)
        with contextlib.ExitStack() as stack:
            stack.callback(self._cleanup)
            self._prepare_images(stack)
            self._start_link(stack)
            self.runner.start(self)
            variants = [VARIANTS[name]() for name in self.opts.variants]
            measured = self._measure(variants)
            self.check_interrupted()
        result = self._result(measured, started)
        self._write_outputs(result)
        if not self.opts.keep_work:
            self._keep_logs()
            shutil.rmtree(self.work, ignore_errors=True)
        return result

    def check_interrupted(self) -> None:
        """Raise KeyboardInterrupt if a signal asked to stop. The handler raises it too, but
        Python drops an exception raised while a ``__del__`` or a GC callback runs; the flag
        is not lost."""
        if self.interrupted is not None:
            raise KeyboardInterrupt(f"signal {self.interrupted}")

    def _cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.runner.stop()
        for server in list(self.processes_extra):
            with contextlib.suppress(Exception):
                server.stop()
        self.processes.stop_all()
        for root in [self.work, *self.scratch]:
            for point in mounts_under(str(root)):
                subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
            for loop in _loops_under(root):
                subprocess.run(["losetup", "--detach", loop], capture_output=True, check=False)
        for path in self.scratch:
            shutil.rmtree(path, ignore_errors=True)
        if self.netns is not None:
            self.netns.close()

    def leftovers(self) -> list[str]:
        """What the benchmark failed to clean up (empty after ``run``, however it ended)."""
        out = []
        for root in [self.output, *self.scratch]:
            out += [f"mount {p}" for p in mounts_under(str(root))]
            out += [f"loop device {d}" for d in _loops_under(root)]
        out += [f"directory {p}" for p in self.scratch if p.exists()]
        out += [f"pid {p}" for p in self.processes.pids()]
        if self.netns is not None and self.netns.name in subprocess.run(
                ["ip", "netns", "list"], capture_output=True, text=True).stdout.split():
            out.append(f"netns {self.netns.name}")
        return out

    # -- outputs ------------------------------------------------------------------------------

    def _result(self, measured: dict[str, Any], started: float) -> dict[str, Any]:
        variants = self._summarise(measured)
        full = variants.get("full_pull", {}).get("median_s")
        # What the start's reads cover: best from the recording start (nothing prefetched,
        # the lean read-ahead), else from a variant's first trace.
        recorded = self.traces / "record-0.trace"
        summaries = [("record", summarize(load_trace(str(recorded))).to_json()
                      if recorded.exists() else None)]
        summaries += [(name, variants.get(name, {}).get("trace_summary"))
                      for name in ("lazy_prefetch", "lazy")]
        covered, covered_by = next(((summary["bytes_covered"], name)
                                    for name, summary in summaries
                                    if summary and summary.get("bytes_covered")), (None, None))
        workload = {
            "overlayfs_s": variants.get("full_pull", {}).get("workload_only_s"),
            "overlaybd_s": variants.get("warm", {}).get("workload_only_s"),
        }
        if workload["overlayfs_s"] and workload["overlaybd_s"]:
            workload["ratio"] = round(_median(workload["overlaybd_s"])
                                      / _median(workload["overlayfs_s"]), 3)
        return {
            "version": RESULT_VERSION,
            "image": self.opts.image,
            "run": self.cmd,
            "link": self.opts.link.to_json(),
            "repeat": self.opts.repeat,
            "runner": self.runner.name,
            "mounter": self.mounter.name,
            "prefetch_concurrency": self.opts.concurrency,
            "prefetch_gap": self.opts.gap,
            **self.info,
            "workload_bytes_covered": covered,
            "workload_bytes_covered_by": covered_by,
            "variant_order": list(self.opts.variants),
            "variants": variants,
            "ratios_to_full_pull": {
                name: round(v["median_s"] / full, 4) for name, v in variants.items()
                if full and v.get("median_s") is not None},
            "amplification": {
                name: round(v["bytes_fetched"] / covered, 4) for name, v in variants.items()
                if covered and name != "full_pull"},
            "workload_only": workload,
            "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                        "python": platform.python_version()},
            "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
            "duration_s": round(time.time() - started, 1),
        }

    def _write_outputs(self, result: dict[str, Any]) -> None:
        from .report import write_report

        (self.output / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        plots: list[str] = []
        try:
            from .plots import plot_bench, plot_trace

            plots += plot_bench(result, str(self.output / "plots"))
            for name in ("lazy", "lazy_prefetch"):
                trace = self.traces / f"{name}-0.trace"
                if trace.exists():
                    plots += plot_trace(load_trace(str(trace)), str(self.output / "plots"),
                                        prefix=f"{name}-")
        except UsageError as exc:  # matplotlib missing: numbers without pictures
            log.warning("no plots: %s", exc)
        write_report(result, self.output / "report.md",
                     [os.path.relpath(p, self.output) for p in plots])

    def _keep_logs(self) -> None:
        logs = self.output / "logs"
        logs.mkdir(exist_ok=True)
        for path in self.work.glob("*.log"):
            shutil.copy2(path, logs / path.name)


def _loops_under(path: Path) -> list[str]:
    """Loop devices whose backing file lies under ``path`` (a killed server's block file)."""
    proc = subprocess.run(["losetup", "--noheadings", "--output", "NAME,BACK-FILE", "--list"],
                          capture_output=True, text=True)
    prefix = str(path).rstrip("/") + "/"
    out = []
    for line in proc.stdout.splitlines():
        name, _, back = line.strip().partition(" ")
        if back.strip().startswith(prefix):
            out.append(name)
    return out


def _run_trio(fn: Any, *args: Any) -> Any:
    """``trio.run`` under Python's own SIGINT handler, which trio turns into a clean
    KeyboardInterrupt (``run_bench``'s handler would raise it anywhere inside trio); a
    SIGTERM meanwhile is sent on as a SIGINT."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return trio.run(fn, *args)
    saved = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # a SIGTERM becomes a SIGINT
        saved[signal.SIGTERM] = signal.signal(
            signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        return trio.run(fn, *args)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_bench(opts: BenchOptions) -> tuple[dict[str, Any], list[str]]:
    """Run the experiment with SIGTERM treated like Ctrl-C (both clean up; see
    ``Bench.check_interrupted``). Returns the
    result and the leftovers check (an empty list when everything was removed)."""
    bench = Bench(opts)
    # The registry lives in the benchmark's own network: no process of the run (containerd,
    # skopeo, our daemon) may send it through a proxy the caller's environment names.
    saved = {name: os.environ.get(name) for name in ("NO_PROXY", "no_proxy")}
    for name, value in saved.items():
        os.environ[name] = ",".join(filter(None, (value, str(BENCH_SUBNETS))))

    def interrupted(signum: int, frame: object) -> None:
        if bench.interrupted is not None:
            return  # a second signal must not break the clean-up the first one started
        bench.interrupted = signum
        raise KeyboardInterrupt

    # A SIGINT ignored from the start (``nohup``, a background job of a script) stays ignored.
    stoppers = [sig for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN]
    previous = {sig: signal.signal(sig, interrupted) for sig in stoppers}
    try:
        try:
            result = bench.run()
        except BaseException:
            left = bench.leftovers()
            if left:
                log.error("clean-up incomplete: %s", ", ".join(left))
            raise
        return result, bench.leftovers()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

"""``overlaybd-py bench cold-start`` end to end on the tiny image (built offline), as CI runs
it: once on loopback, once on a shaped link, and once interrupted. Checks the outputs'
shape and their consistency with each other, never timings; and that nothing is left
behind: no namespace, mount or process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from overlaybd_py.coldstart.traces import load_trace, summarize
from overlaybd_py.mount import READAHEAD_KB, mounts_under
from tests.fixtures.system import need, need_fuse, need_program

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    need_fuse()
    for program in ("ip", "tc", "docker-registry", "skopeo", "umoci", "containerd", "ctr",
                    "runc"):
        need_program(program)
    need(os.path.exists("/proc/sys/vm/drop_caches"), "no /proc/sys/vm/drop_caches")
    # Shared by the tests of this module: the tiny image is built and converted once.
    return tmp_path_factory.mktemp("bench-cache")


def _bench_argv(output: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "overlaybd_py", "bench", "cold-start", "recipe:tiny",
            "--repeat", "1", "--output", str(output), "--cache-dir", str(cache_dir), *extra]


def _our_processes(marker: str) -> list[str]:
    """Processes whose command line mentions ``marker`` (our output directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(f"{entry}: {cmdline.decode(errors='replace')[:200]}")
    return found


def _netns_of(pid: int) -> bool:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return any(line.split()[0] == f"obdpy{pid}" for line in names.splitlines() if line)


def _check_clean(output: Path, pid: int) -> None:
    assert mounts_under(str(output)) == []
    assert _our_processes(str(output)) == []
    assert not _netns_of(pid)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"obdpy{pid}"[:10] not in links


@pytest.mark.parametrize("link", ["loopback", "200mbit-10ms"])
def test_bench_runs_end_to_end(cache_dir, tmp_path, link):
    output = tmp_path / "out"
    proc = subprocess.Popen(_bench_argv(output, cache_dir, "--link", link, "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    _check_clean(output, proc.pid)
    result = json.loads(stdout)
    assert result == json.loads((output / "result.json").read_text())
    assert result["link"]["name"] == link
    assert result["variant_order"] == ["full_pull", "lazy", "lazy_prefetch", "warm"]
    image = result["image_bytes"]
    variants = result["variants"]
    for name in result["variant_order"]:
        v = variants[name]
        assert len(v["runs_s"]) == 1 and v["median_s"] == v["runs_s"][0] > 0
        assert all(run["output_tail"].endswith("ok") for run in v["runs"])  # CMD really ran
    # The full pull fetches the whole image (the registry's count), the lazy start less.
    assert variants["full_pull"]["bytes_fetched"] >= image
    assert 0 < variants["lazy"]["bytes_fetched"] < image
    assert variants["warm"]["bytes_fetched"] == 0
    # What the serving process counted is what the registry sent.
    lazy_run = variants["lazy"]["runs"][0]
    assert lazy_run["bytes_fetched_by_client"] == lazy_run["bytes_fetched_until_teardown"]
    # The prefetch replayed the trace an untimed start recorded: its own trace shows
    # prefetch requests and a start that issued (almost) nothing itself.
    pre = variants["lazy_prefetch"]["trace_summary"]
    lazy = variants["lazy"]["trace_summary"]
    assert pre["prefetch_requests"] > 0
    assert pre["requests"] - pre["prefetch_requests"] < lazy["requests"]
    recorded = summarize(load_trace(str(output / "traces" / "record-0.trace")))
    assert result["workload_bytes_covered_by"] == "record"
    assert result["workload_bytes_covered"] == recorded.bytes_covered > 0
    # Timed lazy runs read ahead as a plain lazy mount does, prefetching ones lean.
    assert variants["lazy"]["runs"][0]["read_ahead_kb"] == READAHEAD_KB
    assert variants["lazy_prefetch"]["runs"][0]["read_ahead_kb"] == 128
    assert set(result["ratios_to_full_pull"]) == set(variants)
    # CPU during every timed run: the machine's, and the benchmark's own servers' (each no
    # more than the machine's).
    for name in result["variant_order"]:
        cpu = variants[name]["runs"][0]["cpu_s"]
        assert cpu["machine"] > 0 and {"docker-registry", "containerd"} <= set(cpu)
        assert all(0 <= x <= cpu["machine"] + 0.05 for x in cpu.values()), cpu
    assert "overlaybd-py daemon" in variants["lazy"]["cpu_s"]
    assert result["workload_only"]["overlayfs_s"] and result["workload_only"]["overlaybd_s"]
    report = (output / "report.md").read_text()
    for title in ("full pull", "lazy + trace prefetch", "warm", "CPU-seconds"):
        assert title in report
    for plot in ("coldstart-times.png", "coldstart-bytes.png", "lazy-timeline.png",
                 "lazy_prefetch-heatmap.png"):
        assert (output / "plots" / plot).stat().st_size > 1000
    assert (output / "traces" / "lazy-0.trace").exists()
    assert not (output / "work").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_bench_cleans_up(cache_dir, tmp_path, sig):
    output = tmp_path / "out"
    # SIGINT as at a terminal, whatever this test inherited (a background job of a script
    # starts with it ignored, and the benchmark keeps it so).
    proc = subprocess.Popen(_bench_argv(output, cache_dir, "--link", "200mbit-10ms"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr is not None
    # Interrupt in the middle of the lazy variant: mounts, serving process, namespace,
    # registry, delay proxy and containerd are all up then.
    deadline = time.monotonic() + 300
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if "run 1/1: lazy" in line or not line:
            break
    assert "run 1/1: lazy" in seen, seen[-3000:]
    time.sleep(0.3)
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode != 0, f"the benchmark finished after the signal:\n{rest[-3000:]}"
    assert "interrupted" in rest, rest[-2000:]
    _check_clean(output, proc.pid)

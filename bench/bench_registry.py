"""Range-read latency and throughput: our client vs raw httpx and curl, same blob, same run.

A real ``docker-registry`` on 127.0.0.1 serves one 64 MiB random blob. Each client reads the
same random 4 KiB and 1 MiB ranges, one at a time (latency), and 16 at a time for 4 KiB
(parallel throughput); ours is also run with TCP_NODELAY off to measure what it buys.
Per-read times are taken inside the loop (connection set-up and 3 warm-up reads excluded);
pytest-benchmark additionally times whole batches. The summary (Markdown table + JSON, with
the ratios ours/raw) is printed at the end and written to ``.benchmarks/registry/``.

Run: ``.venv/bin/pytest bench/bench_registry.py -p no:cacheprovider``
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import trio

from overlaybd_py.registry import ClientConfig, HttpBlobSource, Reference, RegistryClient
from tests.fixtures.registry import RegistryServer

BLOB_SIZE = 64 * 1024 * 1024
SIZES = {"4KiB": 4096, "1MiB": 1024 * 1024}
READS = {"4KiB": 400, "1MiB": 60}
PARALLEL = 16
WARMUP = 3
ROUNDS = 3
CLIENTS = ["ours", "httpx", "curl", "ours-nodelay-off", "httpx-nodelay-off"]
RESULTS: dict[str, dict[str, list[float]]] = {}
CPU: dict[str, dict[str, float]] = {}
OUT_DIR = Path(__file__).resolve().parents[1] / ".benchmarks" / "registry"


@pytest.fixture(scope="module")
def blob():
    """(registry, reference, digest) of a 64 MiB random blob in a private registry."""
    root = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    try:
        with RegistryServer(root) as server:
            ref = Reference.parse(f"{server.host}/bench/blob:v1")
            data = random.Random(1).randbytes(BLOB_SIZE)

            async def push():
                config = ClientConfig(plain_http=True, use_docker_config=False)
                async with await RegistryClient.open(config) as client:
                    return await client.push_blob(ref, data, chunk_size=16 << 20)

            digest = trio.run(push).digest
            yield server, ref, digest
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _offsets(size: int, count: int) -> list[int]:
    rng = random.Random(size)
    return [rng.randrange(0, BLOB_SIZE - size) for _ in range(count)]


async def _ours(ref, digest, offsets, size, nodelay, parallel):
    config = ClientConfig(
        plain_http=True, use_docker_config=False, tcp_nodelay=nodelay, max_parallel=max(parallel, 1)
    )
    async with await RegistryClient.open(config) as client:
        source = await HttpBlobSource.open(client, ref, digest)

        async def read(offset):
            data = await source.read_at(offset, size)
            assert len(data) == size

        return await _timed(read, offsets, parallel)


async def _raw_httpx(server, digest, offsets, size, nodelay, parallel):
    url = f"{server.url}/v2/bench/blob/blobs/{digest}"
    option = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)]
    transport = httpx.AsyncHTTPTransport(socket_options=option)
    async with httpx.AsyncClient(transport=transport) as client:

        async def read(offset):
            response = await client.get(
                url, headers={"Range": f"bytes={offset}-{offset + size - 1}"}
            )
            assert response.status_code == 206 and len(response.content) == size

        return await _timed(read, offsets, parallel)


async def _timed(read, offsets, parallel):
    """Per-read seconds (sequential), or one total for the batch (parallel)."""
    for offset in offsets[:WARMUP]:
        await read(offset)
    if parallel <= 1:
        samples = []
        for offset in offsets[WARMUP:]:
            start = time.perf_counter()
            await read(offset)
            samples.append(time.perf_counter() - start)
        return samples
    limiter = trio.Semaphore(parallel)

    async def one(offset):
        async with limiter:
            await read(offset)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for offset in offsets[WARMUP:]:
            nursery.start_soon(one, offset)
    return [(time.perf_counter() - start) / (len(offsets) - WARMUP)] * (len(offsets) - WARMUP)


def _curl(server, digest, offsets, size):
    """One curl process, one reused connection: curl's own time_total per transfer."""
    program = shutil.which("curl")
    if program is None:
        pytest.skip("curl not installed")
    url = f"{server.url}/v2/bench/blob/blobs/{digest}"
    lines = []
    for offset in offsets:
        lines += [
            f'url = "{url}"',
            f'range = "{offset}-{offset + size - 1}"',
            'output = "/dev/null"',
            'write-out = "%{time_total} %{size_download}\\n"',
            "next",
        ]
    done = subprocess.run(
        [program, "-s", "--config", "-"],
        input="\n".join(lines[:-1]),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    rows = [line.split() for line in done.stdout.splitlines()]
    assert all(int(got) == size for _, got in rows), "curl read short"
    return [float(t) for t, _ in rows][WARMUP:]


def _run(kind, blob, size, offsets, parallel=1):
    server, ref, digest = blob
    nodelay = not kind.endswith("nodelay-off")
    if kind.startswith("ours"):
        return trio.run(_ours, ref, digest, offsets, size, nodelay, parallel)
    if kind.startswith("httpx"):
        return trio.run(_raw_httpx, server, digest, offsets, size, nodelay, parallel)
    return _curl(server, digest, offsets, size)


@pytest.mark.parametrize("size_name", list(SIZES))
@pytest.mark.parametrize("kind", CLIENTS)
def test_sequential_range_reads(benchmark, blob, kind, size_name):
    size = SIZES[size_name]
    offsets = _offsets(size, READS[size_name] + WARMUP)
    samples: list[float] = []
    benchmark.pedantic(
        lambda: samples.extend(_run(kind, blob, size, offsets)), rounds=ROUNDS, iterations=1
    )
    RESULTS.setdefault(f"{size_name} sequential", {})[kind] = samples
    benchmark.extra_info["median_ms"] = statistics.median(samples) * 1e3
    benchmark.extra_info["reads_per_round"] = len(offsets) - WARMUP


@pytest.mark.parametrize("kind", ["ours", "httpx"])
def test_parallel_4k_reads(benchmark, blob, kind):
    offsets = _offsets(4096, 800 + WARMUP)
    samples: list[float] = []
    benchmark.pedantic(
        lambda: samples.extend(_run(kind, blob, 4096, offsets, PARALLEL)),
        rounds=ROUNDS,
        iterations=1,
    )
    RESULTS.setdefault(f"4KiB x{PARALLEL} parallel", {})[kind] = samples


def _cpu_and_wall(kind, blob, size, offsets):
    """Run one batch; return (per-read wall seconds, client CPU seconds per read)."""
    import resource

    def cpu():
        own = time.process_time()
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own + kids.ru_utime + kids.ru_stime

    start = cpu()
    samples = _run(kind, blob, size, offsets)
    # Includes client set-up and warm-up reads (a few of hundreds): an upper bound.
    return samples, (cpu() - start) / len(samples)


@pytest.mark.parametrize("size_name", list(SIZES))
def test_interleaved_ratios(blob, size_name):
    """The ratio figures: the clients take turns, round after round, on the same offsets, so
    drift in machine load (2 shared cores) hits all of them alike."""
    size = SIZES[size_name]
    offsets = _offsets(size, READS[size_name] // 2 + WARMUP)
    kinds = ["ours", "httpx", "curl", "ours-nodelay-off"]
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    for round_no in range(6):
        order = kinds[round_no % len(kinds) :] + kinds[: round_no % len(kinds)]
        for kind in order:
            samples, cpu_per_read = _cpu_and_wall(kind, blob, size, offsets)
            wall[kind] += samples
            cpu[kind].append(cpu_per_read)
    RESULTS[f"{size_name} interleaved"] = wall
    CPU[f"{size_name} interleaved"] = {k: statistics.median(v) for k, v in cpu.items()}


@pytest.mark.parametrize("size_name", list(SIZES))
def test_alternating_ratios(blob, size_name):
    """The headline ratios: ours and raw httpx open side by side in one trio run and take
    turns read by read on the same offsets, so load drift on the shared machine hits both."""
    server, ref, digest = blob
    size = SIZES[size_name]
    offsets = _offsets(size, READS[size_name] * 2 + WARMUP)
    url = f"{server.url}/v2/bench/blob/blobs/{digest}"

    async def run():
        config = ClientConfig(plain_http=True, use_docker_config=False)
        async with (
            await RegistryClient.open(config) as client,
            httpx.AsyncClient() as raw,
        ):
            source = await HttpBlobSource.open(client, ref, digest)

            async def ours(offset):
                assert len(await source.read_at(offset, size)) == size

            async def plain(offset):
                headers = {"Range": f"bytes={offset}-{offset + size - 1}"}
                response = await raw.get(url, headers=headers)
                assert response.status_code == 206 and len(response.content) == size

            times: dict[str, list[float]] = {"ours": [], "httpx": []}
            for i, offset in enumerate(offsets):
                pair = [("ours", ours), ("httpx", plain)]
                for name, read in pair if i % 2 else pair[::-1]:
                    start = time.perf_counter()
                    await read(offset)
                    if i >= WARMUP:
                        times[name].append(time.perf_counter() - start)
            return times

    RESULTS[f"{size_name} alternating"] = trio.run(run)


def test_large_ranges_socket_path(blob):
    """4 MiB range reads (the block cache's fetch size): our client's socket path vs the same
    client with ``socket_ranges=False`` (httpx carries the body), in alternating batches of
    one trio run; wall time per read and the process's CPU (all threads) per read."""
    _server, ref, digest = blob
    size = 4 << 20
    offsets = _offsets(size, 8)

    async def run():
        wall: dict[str, list[float]] = {"ours": [], "ours-httpx-path": []}
        cpu: dict[str, list[float]] = {"ours": [], "ours-httpx-path": []}
        configs = {
            kind: ClientConfig(plain_http=True, use_docker_config=False,
                               socket_ranges=kind == "ours")
            for kind in wall
        }
        clients = {kind: await RegistryClient.open(c) for kind, c in configs.items()}
        try:
            sources = {k: await HttpBlobSource.open(c, ref, digest) for k, c in clients.items()}
            for source in sources.values():  # warm connections
                await source.read_at(0, size)
            for round_no in range(8):
                for kind in (list(wall) if round_no % 2 else list(wall)[::-1]):
                    started_cpu = time.process_time()
                    for offset in offsets:
                        start = time.perf_counter()
                        assert len(await sources[kind].read_at(offset, size)) == size
                        wall[kind].append(time.perf_counter() - start)
                    cpu[kind].append((time.process_time() - started_cpu) / len(offsets))
        finally:
            for client in clients.values():
                await client.aclose()
        return wall, cpu

    wall, cpu = trio.run(run)
    RESULTS["4MiB alternating"] = wall
    CPU["4MiB alternating"] = {k: statistics.median(v) for k, v in cpu.items()}


def test_small_put_nodelay(blob):
    """Requests with a body (manifest PUT): headers and body are two writes, which is where
    Nagle's algorithm can wait for a delayed ACK. Compare ours with TCP_NODELAY on and off."""
    from overlaybd_py.formats.oci import OCI_INDEX, Index

    _, ref, _ = blob
    body = Index(OCI_INDEX, ()).to_bytes()
    out: dict[str, list[float]] = {}
    for round_no in range(4):
        for nodelay in (True, False) if round_no % 2 == 0 else (False, True):

            async def run(nodelay=nodelay):
                config = ClientConfig(plain_http=True, use_docker_config=False, tcp_nodelay=nodelay)
                async with await RegistryClient.open(config) as client:
                    samples = []
                    for i in range(40):
                        start = time.perf_counter()
                        await client.push_manifest(ref.with_tag(f"t{i}"), body, OCI_INDEX)
                        samples.append(time.perf_counter() - start)
                    return samples[WARMUP:]

            key = "ours" if nodelay else "ours-nodelay-off"
            out.setdefault(key, []).extend(trio.run(run))
    RESULTS["manifest PUT"] = out


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """After the module: the table of per-read figures and the ratios, printed and saved."""
    yield
    if not RESULTS:
        return
    rows, report = [], {}
    for scenario, by_client in RESULTS.items():
        size = {"4KiB": 4096, "4MiB": 4 << 20}.get(scenario.split()[0], 1 << 20)
        for kind, samples in by_client.items():
            median = statistics.median(samples)
            mean = statistics.fmean(samples)
            p90 = sorted(samples)[int(len(samples) * 0.9) - 1]
            mib_s = size / mean / (1 << 20) if "PUT" not in scenario else 0.0
            cpu_us = CPU.get(scenario, {}).get(kind)
            report.setdefault(scenario, {})[kind] = {
                "requests": len(samples),
                "median_ms": median * 1e3,
                "p90_ms": p90 * 1e3,
                "mean_ms": mean * 1e3,
                "throughput_mib_s": mib_s,
                "client_cpu_us_per_read": None if cpu_us is None else cpu_us * 1e6,
            }
            cpu_text = "-" if cpu_us is None else f"{cpu_us * 1e6:.0f}"
            rows.append(
                f"| {scenario} | {kind} | {median * 1e3:.3f} | {p90 * 1e3:.3f} | "
                f"{mib_s:.1f} | {cpu_text} |"
            )
    ratios = _ratios(report)
    report["ratios"] = ratios
    table = [
        "| scenario | client | median ms | p90 ms | MiB/s | client CPU µs/read |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "| ratio | value | target |",
        "|---|---|---|",
        *(f"| {k} | {v['value']:.3f} | {v['target']} |" for k, v in ratios.items()),
    ]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "summary.json").write_text(json.dumps(report, indent=2))
    (OUT_DIR / "summary.md").write_text("\n".join(table) + "\n")
    writer = request.config.pluginmanager.get_plugin("terminalreporter")
    writer.write_line("")
    for line in table:
        writer.write_line(line)


def _ratios(report):
    out = {}

    def get(scenario, kind, key):
        return report.get(scenario, {}).get(kind, {}).get(key)

    inter, alt = "interleaved", "alternating"
    pairs = [
        # (name, scenario, numerator client, denominator client, figure, target)
        ("4KiB latency ours/httpx (median)", f"4KiB {alt}", "ours", "httpx", "median_ms", "<= 1.5"),
        (
            "4KiB latency ours/httpx (median, batches)",
            f"4KiB {inter}",
            "ours",
            "httpx",
            "median_ms",
            "info",
        ),
        ("4KiB latency ours/curl (median)", f"4KiB {inter}", "ours", "curl", "median_ms", "info"),
        (
            "4KiB client CPU ours/httpx",
            f"4KiB {inter}",
            "ours",
            "httpx",
            "client_cpu_us_per_read",
            "info",
        ),
        (
            "1MiB throughput ours/httpx",
            f"1MiB {alt}",
            "ours",
            "httpx",
            "throughput_mib_s",
            ">= 0.9",
        ),
        (
            "1MiB throughput ours/httpx (batches)",
            f"1MiB {inter}",
            "ours",
            "httpx",
            "throughput_mib_s",
            "info",
        ),
        ("1MiB throughput ours/curl", f"1MiB {inter}", "ours", "curl", "throughput_mib_s", "info"),
        (
            "1MiB client CPU ours/httpx",
            f"1MiB {inter}",
            "ours",
            "httpx",
            "client_cpu_us_per_read",
            "info",
        ),
        (
            "4MiB throughput socket path/httpx path (ours)",
            "4MiB alternating",
            "ours",
            "ours-httpx-path",
            "throughput_mib_s",
            "info",
        ),
        (
            "4MiB client CPU socket path/httpx path (ours)",
            "4MiB alternating",
            "ours",
            "ours-httpx-path",
            "client_cpu_us_per_read",
            "info",
        ),
        (
            f"4KiB x{PARALLEL} throughput ours/httpx",
            f"4KiB x{PARALLEL} parallel",
            "ours",
            "httpx",
            "throughput_mib_s",
            "info",
        ),
        (
            "4KiB latency nodelay-off/on (ours)",
            f"4KiB {inter}",
            "ours-nodelay-off",
            "ours",
            "median_ms",
            "info",
        ),
        (
            "1MiB throughput nodelay-off/on (ours)",
            f"1MiB {inter}",
            "ours-nodelay-off",
            "ours",
            "throughput_mib_s",
            "info",
        ),
        (
            "manifest PUT latency nodelay-off/on (ours)",
            "manifest PUT",
            "ours-nodelay-off",
            "ours",
            "median_ms",
            "info",
        ),
    ]
    for name, scenario, a, b, key, target in pairs:
        x, y = get(scenario, a, key), get(scenario, b, key)
        if x is not None and y:
            out[name] = {"value": x / y, "target": target}
    return out

"""The cold-start benchmark's CPU accounting (/proc/stat and /proc/PID/stat parsed from
texts written out by hand from proc(5)) and its stop flag."""

from __future__ import annotations

import os

import pytest

from overlaybd_py.coldstart.cpu import CpuMeter, busy_ticks, process_ticks

TICK = os.sysconf("SC_CLK_TCK")

# user nice system idle iowait irq softirq steal guest guest_nice
STAT = "cpu  100 5 40 9000 300 0 7 3 50 0\ncpu0 50 2 20 4500 150 0 3 1 25 0\nintr 1 2 3\n"


def _pid_stat(comm: str, utime: int, stime: int, cutime: int, cstime: int) -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime priority ...
    return (f"4242 ({comm}) S 1 4242 4242 0 -1 4194560 120 0 0 0 "
            f"{utime} {stime} {cutime} {cstime} 20 0 9 0 100 1000 50\n")


def test_busy_ticks_leave_out_idle_and_iowait():
    assert busy_ticks(STAT) == 100 + 5 + 40 + 0 + 7  # guest is inside user, steal is not ours


def test_busy_ticks_need_the_cpu_line():
    with pytest.raises(ValueError, match="cpu"):
        busy_ticks("cpu0 1 2 3 4 5 6 7 8\n")


@pytest.mark.parametrize("comm", ["docker-registry", "a b) (c", "x)"])
def test_process_ticks_count_from_the_last_parenthesis(comm):
    assert process_ticks(_pid_stat(comm, 11, 7, 5, 3)) == 26


def test_meter_reports_deltas_in_seconds_for_processes_alive_at_both_ends():
    files = {"/proc/stat": STAT, "/proc/1/stat": _pid_stat("reg", 10, 0, 0, 0),
             "/proc/2/stat": _pid_stat("proxy", 1, 1, 0, 0)}
    meter = CpuMeter.start({"registry": 1, "proxy": 2, "never": 3}, read=files.get)
    files["/proc/stat"] = STAT.replace("cpu  100 5 40", f"cpu  {100 + 2 * TICK} 5 {40 + TICK}")
    files["/proc/1/stat"] = _pid_stat("reg", 10 + TICK // 2, 0, 0, 0)
    del files["/proc/2/stat"]  # gone before the end: not reported
    assert meter.stop() == {"machine": 3.0, "registry": 0.5}


def test_a_stop_signal_is_not_lost_with_a_dropped_keyboard_interrupt():
    """The handler sets a flag besides raising: Python drops an exception raised while a
    ``__del__`` runs, and the benchmark must stop at its next step all the same."""
    from types import SimpleNamespace

    from overlaybd_py.coldstart.harness import Bench

    bench = SimpleNamespace(interrupted=None)
    Bench.check_interrupted(bench)  # nothing asked: goes on
    bench.interrupted = 2
    with pytest.raises(KeyboardInterrupt, match="signal 2"):
        Bench.check_interrupted(bench)


def test_registry_bytes_count_only_what_was_answered_by_the_end(tmp_path):
    """The registry logs a request after answering it; the benchmark counts blob GETs
    answered (by the log's own clock) before the timed part ended, after its mark."""
    import json

    from overlaybd_py.coldstart.servers import BenchRegistry, Processes, log_time

    def line(time: str, method: str = "GET", uri: str = "/v2/r/blobs/sha256:aa",
             status: int = 206, written: int = 100) -> str:
        return json.dumps({"msg": "response completed", "time": time,
                           "http.request.method": method, "http.request.uri": uri,
                           "http.response.status": status, "http.response.written": written})

    log = tmp_path / "registry.log"
    log.write_text(line("2026-11-28T06:00:00.5Z", written=7) + "\n")
    registry = BenchRegistry(tmp_path, log, Processes())
    mark = registry.log_mark()
    with log.open("a") as f:
        for entry in (line("2026-11-28T06:00:01.000000001Z", written=1000),
                      line("2026-11-28T06:00:01.5Z", uri="/v2/r/blobs/uploads/x", written=5),
                      line("2026-11-28T06:00:01.6Z", status=404, written=50),
                      line("2026-11-28T07:00:02.0+01:00", written=20000),  # 06:00:02 UTC
                      "not json"):
            f.write(entry + "\n")
    ended = log_time("2026-11-28T06:00:01.9Z")
    assert registry.blob_bytes_served(mark) == 21000
    assert registry.blob_bytes_served(mark, until=ended) == 1000
    assert registry.blob_bytes_served(0, until=ended) == 1007

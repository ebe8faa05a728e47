"""CPU time spent during a timed run: the whole machine's (``/proc/stat``) and each of the
benchmark's own long-lived processes' (``/proc/PID/stat``: the registry, the delay proxy,
the node daemon, containerd).

Everything in a run shares the machine's CPUs: a registry on the same host spends CPU on
every range request that a remote registry would spend elsewhere, and a lazy start makes
many of them. These figures say how much of the machine each part took.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["CpuMeter", "busy_ticks", "process_ticks"]

_TICK = os.sysconf("SC_CLK_TCK")


def busy_ticks(proc_stat: str) -> int:
    """Clock ticks all CPUs together spent working for this machine, from ``/proc/stat``'s
    ``cpu`` line: user, nice, system, irq, softirq (guest time is inside user time; idle,
    iowait and steal, the hypervisor's, are not counted)."""
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:8]]  # user nice system idle iowait irq softirq
            return sum(values) - values[3] - values[4]
    raise ValueError("/proc/stat has no 'cpu' line")


def process_ticks(pid_stat: str) -> int:
    """utime + stime + cutime + cstime of ``/proc/PID/stat`` (a child reaped in between adds
    its whole life; the servers measured here reap none that matter).
    The command name may hold spaces and parentheses: fields are counted after its last
    ')'."""
    fields = pid_stat.rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15])  # fields 14-17 of proc(5)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the process has gone
        return None


@dataclass
class CpuMeter:
    """``CpuMeter.start(pids)`` before the timed part, ``stop()`` after it: CPU-seconds of
    the machine (``machine``, all CPUs) and of each named process still alive at both
    ends."""

    pids: Mapping[str, int]
    machine: int
    processes: dict[str, int]
    read: Callable[[str], str | None] = _read

    @classmethod
    def start(cls, pids: Mapping[str, int],
              read: Callable[[str], str | None] = _read) -> CpuMeter:
        return cls(dict(pids), cls._machine(read), cls._processes(pids, read), read)

    @staticmethod
    def _machine(read: Callable[[str], str | None]) -> int:
        text = read("/proc/stat")
        if text is None:
            raise OSError("cannot read /proc/stat")
        return busy_ticks(text)

    @staticmethod
    def _processes(pids: Mapping[str, int], read: Callable[[str], str | None]) -> dict[str, int]:
        ticks = {}
        for name, pid in pids.items():
            text = read(f"/proc/{pid}/stat")
            if text is not None:
                ticks[name] = process_ticks(text)
        return ticks

    def stop(self) -> dict[str, float]:
        machine = self._machine(self.read)
        now = self._processes(self.pids, self.read)
        out = {"machine": round((machine - self.machine) / _TICK, 3)}
        for name, ticks in now.items():
            if name in self.processes:
                out[name] = round((ticks - self.processes[name]) / _TICK, 3)
        return out

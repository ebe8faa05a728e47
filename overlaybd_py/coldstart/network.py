"""The emulated link: a network namespace holding the registry, a veth pair to it shaped with
``tc tbf``, and (for a round-trip time) the delay proxy inside the namespace.

This kernel has no netem, so latency is added by ``delayproxy`` per response, not per
packet: TCP handshakes and slow start are not delayed (the report says so). Bandwidth is
shaped in both directions on the veth pair. Everything created is named after this process
(``obdpy<pid>``) and removed by ``close``, which tolerates half-built state.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import subprocess
from dataclasses import dataclass

from ..errors import UsageError

__all__ = ["BENCH_SUBNETS", "LINKS", "Link", "NetNamespace"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Link:
    name: str
    rate_mbit: float | None  # None: not shaped
    rtt_ms: float  # added per response by the delay proxy; 0: no proxy

    def to_json(self) -> dict:
        return {"name": self.name, "rate_mbit": self.rate_mbit, "rtt_ms": self.rtt_ms,
                "latency_model": "per-response delay proxy (no netem): TCP handshake and "
                                 "slow start are not delayed" if self.rtt_ms else None}


LINKS = {
    "loopback": Link("loopback", None, 0.0),
    "1gbit-2ms": Link("1gbit-2ms", 1000.0, 2.0),
    "200mbit-10ms": Link("200mbit-10ms", 200.0, 10.0),
}

BENCH_SUBNETS = ipaddress.ip_network("10.213.0.0/16")  # the veth pairs' /30s come from here


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode:
        raise UsageError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def _tc(*args: str, netns: str | None = None) -> None:
    argv = [*(["ip", "netns", "exec", netns] if netns else []), "tc", *args]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise UsageError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


def _free_subnet() -> ipaddress.IPv4Network:
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    start = os.getpid() % 16384
    subnets = list(BENCH_SUBNETS.subnets(new_prefix=30))
    for i in range(len(subnets)):
        net = subnets[(start + i) % len(subnets)]
        if str(net.network_address)[:-1] not in used and str(net[1]) not in used:
            return net
    raise UsageError("no free /30 in 10.213.0.0/16 for the benchmark's veth pair")


class NetNamespace:
    """``ns`` with ``inner`` (the namespace side, where servers listen) and the host side
    ``outer``; shaped to ``link``. Use as a context manager or call ``close``."""

    def __init__(self, link: Link) -> None:
        tag = f"obdpy{os.getpid()}"
        self.link = link
        self.name = tag
        self.host_if = f"{tag[:10]}h"
        self.ns_if = f"{tag[:10]}n"
        self.subnet = _free_subnet()
        self.outer = str(self.subnet[1])
        self.inner = str(self.subnet[2])
        self._created = False

    def __enter__(self) -> NetNamespace:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        if os.geteuid() != 0:
            raise UsageError("the benchmark needs root (network namespace, mounts)")
        _ip("netns", "add", self.name)
        self._created = True
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.outer}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("addr", "add", f"{self.inner}/30", "dev", self.ns_if, netns=self.name)
        _ip("link", "set", self.ns_if, "up", netns=self.name)
        _ip("link", "set", "lo", "up", netns=self.name)
        if self.link.rate_mbit:
            rate = f"{self.link.rate_mbit:g}mbit"
            # burst: at least a 64 KiB GSO super-packet plus room, ~2 ms of traffic at rate.
            burst = max(256 << 10, int(self.link.rate_mbit * 1e6 / 8 * 0.002))
            for dev, ns in ((self.host_if, None), (self.ns_if, self.name)):
                _tc("qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
                    str(burst), "latency", "100ms", netns=ns)
        log.info("network namespace %s: %s <-> %s (%s)", self.name, self.outer, self.inner,
                 self.link.name)

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec`` execs: same pid)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def close(self) -> None:
        _ip("link", "del", self.host_if, check=False)  # removes both ends
        if self._created or self.name in _ip("netns", "list", check=False).stdout.split():
            _ip("netns", "del", self.name, check=False)
        self._created = False

    @staticmethod
    def leftovers() -> list[str]:
        """Namespaces of benchmark processes that no longer exist (killed with SIGKILL)."""
        out = []
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith("obdpy") and name[5:].isdigit() and \
                    not os.path.exists(f"/proc/{name[5:]}"):
                out.append(name)
        return out

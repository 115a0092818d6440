"""Hosts of our own on one machine: network namespaces on a private subnet behind one bridge.

Each host is a namespace with its own loopback and one veth into the bridge; this process
(the test, in the root namespace) holds the bridge's address, so it reaches every host and
nothing else reaches them. A host can be killed (every process in it SIGKILLed, its link
down) or partitioned (link down, processes alive) and brought back. Needs root (CI runs as
root); where namespaces cannot be made, `Network.create` raises with the reason.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.231-10.239 that no route of this machine touches."""
    routes = ip("-4", "route", "show", "table", "all")
    taken = [ipaddress.ip_network(word, strict=False) for line in routes.splitlines()
             for word in line.split()[:1] if "/" in word or word[0].isdigit()]
    for second in range(231, 240):
        for third in range(0, 250, 7):
            net = ipaddress.ip_network(f"10.{second}.{third}.0/24")
            if not any(net.overlaps(t) for t in taken):
                return net
    raise RuntimeError("no free private /24 for the test hosts")


@dataclass
class Host:
    name: str  # short: used in interface names
    netns: str
    address: str
    veth: str  # the bridge's end, in the root namespace
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Run `argv` on this host (its pid is the command's: `ip netns exec` execs it)."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], env=env,
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        return proc

    def pids(self) -> list[int]:
        return [int(p) for p in ip("netns", "pids", self.netns, check=False).split()]

    def kill(self) -> None:
        """The host dies: every process in it SIGKILLed, its link taken down."""
        self.link(False)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.processes = [p for p in self.processes if p.poll() is None]

    def link(self, up: bool) -> None:
        """Up or down: down is a partition (its processes live on, unreachable)."""
        ip("link", "set", self.veth, "up" if up else "down")

    def stop(self) -> None:
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in self.pids():  # anything else left in the namespace
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.processes = []


@dataclass
class Network:
    tag: str  # unique to this run: names never clash with another run's
    subnet: ipaddress.IPv4Network
    bridge: str
    hosts: dict[str, Host] = field(default_factory=dict)

    @classmethod
    def create(cls) -> Network:
        if os.geteuid() != 0:
            raise RuntimeError("the multi-host suite needs root to make network namespaces "
                               f"(running as uid {os.geteuid()})")
        tag = f"tp{os.getpid() % 100000}"
        subnet = free_subnet()
        net = cls(tag, subnet, f"{tag}br")
        try:
            ip("link", "add", net.bridge, "type", "bridge")
            ip("addr", "add", f"{net.address(1)}/{subnet.prefixlen}", "dev", net.bridge)
            ip("link", "set", net.bridge, "up")
        except Exception:
            net.destroy()
            raise
        return net

    def address(self, n: int) -> str:
        return str(self.subnet.network_address + n)

    def add_host(self, name: str) -> Host:
        """A new namespace `name` with the next address, linked to the bridge."""
        n = 10 + len(self.hosts)
        host = Host(name, f"{self.tag}-{name}", self.address(n), f"{self.tag}{name}"[:15])
        self.hosts[name] = host
        ip("netns", "add", host.netns)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", f"{host.veth}p"[:15])
        ip("link", "set", f"{host.veth}p"[:15], "netns", host.netns)
        ip("link", "set", host.veth, "master", self.bridge)
        ip("link", "set", host.veth, "up")
        inside = ["netns", "exec", host.netns, "ip"]
        ip(*inside, "link", "set", f"{host.veth}p"[:15], "name", "eth0")
        ip(*inside, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
        ip(*inside, "link", "set", "eth0", "up")
        ip(*inside, "link", "set", "lo", "up")
        return host

    def destroy(self) -> None:
        for host in self.hosts.values():
            host.stop()
            ip("link", "del", host.veth, check=False)
            ip("netns", "del", host.netns, check=False)
        ip("link", "del", self.bridge, check=False)

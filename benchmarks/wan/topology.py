"""Three network namespaces joined by shaped, delayed veth links: site A, site B and a hub.

    ns drwan-a                       ns drwan-hub                         ns drwan-b
    wa0 127.10.1.2 ---veth--- ha0 127.10.1.1     127.10.2.1 hb0 ---veth--- wb0 127.10.2.2
                                  |  lo 127.10.0.1 (bridge)  |
                                  |  lo 127.10.0.2 (S3 blob store, moto)
                       iif ha0 -> tunA --[delay.py: FIFO, one-way delay]--> tunA -> route on
                       iif hb0 -> tunB --[delay.py: FIFO, one-way delay]--> tunB -> route on

Every packet that enters the hub from a site (to the other site, or to a
process in the hub such as the bridge) is policy-routed into that site's TUN,
held there for RTT/2 by `delay.py` and routed on when it comes back out. So
A<->B has the configured RTT, and A<->hub and hub<->B half of it each (the
bridge sits on the path, the best case for a relay).

Rates (tbf, `rate_mbit` each): a site's uplink is shaped on its TUN's egress
in the hub (before the delay stage), its downlink on the hub's veth towards it
(after the delay stage). Nothing is shaped or delayed inside a site.

Only 127.0.0.0/8 addresses are used, inside namespaces made here; each
namespace also drops (iptables) any packet to an address outside 127/8, as a
safety net. `teardown()` kills every process left in the namespaces and
deletes them; `cleanup()` does the same for leftovers of an earlier run.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "drwan"
NS_A, NS_B, NS_HUB = f"{PREFIX}-a", f"{PREFIX}-b", f"{PREFIX}-hub"
NAMESPACES = (NS_A, NS_B, NS_HUB)

A_ADDR, HUB_A_ADDR = "127.10.1.2", "127.10.1.1"
B_ADDR, HUB_B_ADDR = "127.10.2.2", "127.10.2.1"
HUB_ADDR = "127.10.0.1"  # the hub's service address (the bridge listens here), on its lo
BLOB_ADDR = "127.10.0.2"  # the cloud blob store (S3 on moto's server), also on the hub's lo
VPN_A_ADDR, VPN_B_ADDR = "127.20.0.1", "127.20.0.2"
# Fixed MACs so that neighbours are static: with the hub's policy routing, ARP for the hub's own
# veth address would resolve to the TUN and never be answered.
MACS = {"wa0": "02:dc:00:00:01:02", "ha0": "02:dc:00:00:01:01", "wb0": "02:dc:00:00:02:02", "hb0": "02:dc:00:00:02:01"}

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
for _addr in (A_ADDR, HUB_A_ADDR, B_ADDR, HUB_B_ADDR, HUB_ADDR, BLOB_ADDR, VPN_A_ADDR, VPN_B_ADDR):
    assert ipaddress.ip_address(_addr) in LOOPBACK, _addr  # the hard rule: nothing outside 127/8

HERE = Path(__file__).resolve().parent


@dataclass
class LinkSpec:
    rate_mbit: float = 24.0
    rtt_ms: float = 40.0
    burst_bytes: int = 4500
    limit_bytes: int = 150_000
    congestion_control: str = "bbr"

    def as_dict(self) -> dict[str, object]:
        return {
            "rate_mbit": self.rate_mbit,
            "rtt_ms": self.rtt_ms,
            "tbf_burst_bytes": self.burst_bytes,
            "tbf_limit_bytes": self.limit_bytes,
            "congestion_control": self.congestion_control,
        }


def sh(cmd: Sequence[str], *, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def ns_exec(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def nsh(ns: str, cmd: str, *, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh([*ns_exec(ns), *shlex.split(cmd)], timeout=timeout, check=check)


def existing_namespaces() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].startswith(PREFIX + "-")]


def kill_namespace_processes(ns: str, grace_s: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process inside `ns` (all were started by this suite)."""

    def pids() -> list[int]:
        out = sh(["ip", "netns", "pids", ns], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]

    found = pids()
    for pid in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and pids():
        time.sleep(0.1)
    for pid in pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return found


def cleanup(verbose: bool = True) -> list[str]:
    """Remove every namespace of this suite (and what runs in it). Safe to call any time."""
    removed = []
    for ns in existing_namespaces():
        killed = kill_namespace_processes(ns)
        sh(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
        if verbose:
            print(f"  removed namespace {ns}" + (f" (stopped {len(killed)} processes)" if killed else ""), flush=True)
    return removed


@dataclass
class WanLab:
    """The emulated WAN. `up()` builds it, `teardown()` removes it; use as a context manager."""

    spec: LinkSpec = field(default_factory=LinkSpec)
    workdir: Path = field(default_factory=lambda: Path("/tmp/drwan"))
    # Scheduling of every measured process started with popen/run/prefix, all modes alike: "rt"
    # (SCHED_FIFO 5, below the delay stage's 10), "nice" (nice -10) or "none". The machine may be
    # shared with other work; "rt" measures the software as if it had the machine to itself.
    priority: str = "none"
    delay_proc: subprocess.Popen[bytes] | None = None

    @property
    def one_way_delay_ms(self) -> float:
        return self.spec.rtt_ms / 2.0

    # -- building ----------------------------------------------------------
    def up(self) -> WanLab:
        if os.geteuid() != 0:
            raise PermissionError("the WAN emulation needs root (network namespaces, tc, TUN)")
        if self.spec.congestion_control not in ("reno", "bbr"):
            raise ValueError("only reno and bbr are available inside the namespaces")
        cleanup(verbose=True)  # leftovers of an interrupted run
        self.workdir.mkdir(parents=True, exist_ok=True)
        for ns in NAMESPACES:
            sh(["ip", "netns", "add", ns])
        for ns in NAMESPACES:
            self._base_sysctls(ns)
            self._guard(ns)
        # veth pairs created directly inside the namespaces (nothing ever lives in the root namespace)
        for site, hub in (("wa0", "ha0"), ("wb0", "hb0")):
            ns_site = NS_A if site == "wa0" else NS_B
            sh(
                ["ip", "link", "add", site, "address", MACS[site], "netns", ns_site, "type", "veth",
                 "peer", "name", hub, "address", MACS[hub], "netns", NS_HUB]
            )  # fmt: skip
        self._site(NS_A, "wa0", A_ADDR, HUB_A_ADDR, MACS["ha0"])
        self._site(NS_B, "wb0", B_ADDR, HUB_B_ADDR, MACS["hb0"])
        self._hub()
        return self

    def _base_sysctls(self, ns: str) -> None:
        for key, value in (
            ("net.ipv4.conf.all.route_localnet", 1),
            ("net.ipv4.conf.default.route_localnet", 1),
            ("net.ipv4.conf.all.rp_filter", 0),
            ("net.ipv4.conf.default.rp_filter", 0),
            ("net.ipv4.tcp_congestion_control", self.spec.congestion_control),
            ("net.ipv4.ip_forward", 1 if ns == NS_HUB else 0),
            # Early demux attaches a packet to the hub's own established socket before routing; a packet
            # that policy routing then sends into the TUN is "forwarded" with a socket and dropped. Off.
            ("net.ipv4.tcp_early_demux", 0 if ns == NS_HUB else 1),
            ("net.ipv4.udp_early_demux", 0 if ns == NS_HUB else 1),
        ):
            nsh(ns, f"sysctl -q -w {key}={value}")
        # lo keeps only 127.0.0.1: with the default 127.0.0.1/8 every 127.x address would be local.
        nsh(ns, "ip link set lo up")
        nsh(ns, "ip addr del 127.0.0.1/8 dev lo", check=False)
        nsh(ns, "ip addr replace 127.0.0.1/32 dev lo")
        for key in ("rp_filter", "route_localnet"):
            nsh(ns, f"sysctl -q -w net.ipv4.conf.lo.{key}={1 if key == 'route_localnet' else 0}")

    def _guard(self, ns: str) -> None:
        """Safety net: drop anything addressed outside 127/8 (there is no route there anyway)."""
        for chain in ("OUTPUT", "FORWARD"):
            nsh(ns, f"iptables -w -A {chain} ! -d 127.0.0.0/8 -j DROP")

    def _dev_sysctls(self, ns: str, dev: str) -> None:
        nsh(ns, f"sysctl -q -w net.ipv4.conf.{dev}.rp_filter=0")
        nsh(ns, f"sysctl -q -w net.ipv4.conf.{dev}.route_localnet=1")

    def _site(self, ns: str, dev: str, addr: str, gateway: str, gateway_mac: str) -> None:
        self._dev_sysctls(ns, dev)
        nsh(ns, f"ip addr add {addr}/24 dev {dev}")
        nsh(ns, f"ip link set {dev} up")
        nsh(ns, f"ip neigh replace {gateway} lladdr {gateway_mac} dev {dev} nud permanent")
        # src on the default route: without it the kernel picks 0.0.0.0 and the hub drops the packets as martians.
        nsh(ns, f"ip route add default via {gateway} dev {dev} src {addr}")

    def _tbf(self, ns: str, dev: str, overhead: int = 0) -> None:
        s = self.spec
        tbf = f"tbf rate {s.rate_mbit}mbit burst {s.burst_bytes} limit {s.limit_bytes}"
        if overhead:
            tbf += f" overhead {overhead}"
        nsh(ns, f"tc qdisc replace dev {dev} root {tbf}")

    def _hub(self) -> None:
        ns = NS_HUB
        nsh(ns, f"ip addr add {HUB_ADDR}/32 dev lo")
        nsh(ns, f"ip addr add {BLOB_ADDR}/32 dev lo")
        links = (("ha0", HUB_A_ADDR, A_ADDR, MACS["wa0"]), ("hb0", HUB_B_ADDR, B_ADDR, MACS["wb0"]))
        for dev, addr, peer, peer_mac in links:
            self._dev_sysctls(ns, dev)
            nsh(ns, f"ip addr add {addr}/24 dev {dev}")
            nsh(ns, f"ip link set {dev} up")
            nsh(ns, f"ip neigh replace {peer} lladdr {peer_mac} dev {dev} nud permanent")
            self._tbf(ns, dev)  # the site's downlink, after the delay stage
        for tun in ("tunA", "tunB"):
            nsh(ns, f"ip tuntap add dev {tun} mode tun")
            self._dev_sysctls(ns, tun)
            nsh(ns, f"ip link set {tun} up")
            # The site's uplink, before the delay stage; a TUN carries bare IP packets, so count the
            # 14-byte Ethernet header the veths pay, for the same goodput both ways.
            self._tbf(ns, tun, overhead=14)
        # Everything arriving from a site goes through its TUN first, also packets for the hub itself:
        # the local table moves behind the TUN rules.
        nsh(ns, "ip rule add pref 10 iif ha0 lookup 101")
        nsh(ns, "ip rule add pref 11 iif hb0 lookup 102")
        nsh(ns, "ip route add default dev tunA table 101")
        nsh(ns, "ip route add default dev tunB table 102")
        nsh(ns, "ip rule add pref 100 lookup local")
        nsh(ns, "ip rule del pref 0 lookup local")
        ready = self.workdir / "delay.ready"
        ready.unlink(missing_ok=True)
        self.delay_stats = self.workdir / "delay.stats.json"
        self.delay_proc = subprocess.Popen(
            [
                *ns_exec(ns), sys.executable, str(HERE / "delay.py"),
                "--delay-ms", str(self.one_way_delay_ms), "--stats", str(self.delay_stats),
                "--ready", str(ready), "tunA", "tunB",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "delay.log").open("ab"),
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not ready.exists():
            if self.delay_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the delay stage did not start: " + (self.workdir / "delay.log").read_text()[-2000:])
            time.sleep(0.05)

    # -- running things inside ----------------------------------------------
    def prefix(self, ns: str) -> list[str]:
        """Words that run a command inside `ns` (with the lab's niceness)."""
        extra = {"rt": ["chrt", "-f", "5"], "nice": ["nice", "-n", "-10"]}.get(self.priority, [])
        return [*ns_exec(ns), *extra]

    def popen(self, ns: str, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*self.prefix(ns), *cmd], **kwargs)  # type: ignore[call-overload]

    def run(self, ns: str, cmd: Sequence[str], *, timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix(ns), *cmd], capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]

    def qdisc_stats(self) -> dict[str, str]:
        out = {}
        for dev in ("ha0", "hb0", "tunA", "tunB"):
            out[dev] = nsh(NS_HUB, f"tc -s qdisc show dev {dev}", check=False).stdout.strip()
        return out

    def sent_bytes(self) -> dict[str, int]:
        """Bytes each shaper has sent so far: tunA = A's uplink, ha0 = A's downlink, tunB/hb0 likewise for B."""
        out = {}
        for dev in ("tunA", "ha0", "tunB", "hb0"):
            text = nsh(NS_HUB, f"tc -s qdisc show dev {dev}", check=False).stdout
            words = text.split()
            out[dev] = int(words[words.index("Sent") + 1]) if "Sent" in words else 0
        return out

    def delay_counters(self, fresh: bool = False) -> dict[str, object]:
        """The delay stage's counters; `fresh` asks it for a dump now (SIGUSR1) and waits for it."""

        def read() -> dict[str, object]:
            try:
                return json.loads(self.delay_stats.read_text())
            except (OSError, ValueError, AttributeError):
                return {}

        before = read()
        if fresh and self.delay_proc is not None and self.delay_proc.poll() is None:
            os.kill(self.delay_proc.pid, signal.SIGUSR1)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                now = read()
                if now.get("dumps", 0) != before.get("dumps", 0):
                    return now
                time.sleep(0.02)
        return read()

    # -- removing ------------------------------------------------------------
    def teardown(self) -> None:
        if self.delay_proc is not None and self.delay_proc.poll() is None:
            self.delay_proc.terminate()
            try:
                self.delay_proc.wait(5)
            except subprocess.TimeoutExpired:
                self.delay_proc.kill()
                self.delay_proc.wait()
        cleanup(verbose=False)

    def __enter__(self) -> WanLab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.teardown()

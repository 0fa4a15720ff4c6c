"""The relay in the WAN lab: one bridge in the hub, two router pairs, and an S3 blob store in the hub.

    relay        routers site-a / site-b with their DEFAULT [dicom] settings (zstd compression on,
                 data sets above the default 8 MiB spill through the blob store), plus --relay-dicom
    relay-plain  routers site-a2 / site-b2 with compression = false and spill_threshold_bytes = 0:
                 every byte inline through the bridge, nothing compressed (the earlier "relay" mode)
    relay-accel  routers site-a3 / site-b3, default [dicom] settings, the storage destination marked
                 `accelerate = true` on both routers (relay_router.accel): router A answers C-STORE from
                 its spool and ships it in buckets; router B delivers to its own storescp (forking, so
                 that the delivery pool's parallel associations are served)

Both pairs run in the same namespaces (routers A in site A, routers B in site B), sign on to the
same bridge and reach the same devices, so both modes are measured side by side in one run.

The blob store (`--blob-store`): `s3` is S3 on moto's HTTP server (`moto[server]`), started here
inside the hub namespace on BLOB_ADDR (127.10.0.2); the bucket is created here. The bridge holds
the (dummy) credentials and hands the routers presigned URLs on BLOB_ADDR: spilled parts cross the
same shaped, delayed links (site -> hub -> site) as everything else, over the routers' own HTTP
connections (relay_router.egress); an iptables rule in the hub counts the connections they open
(`store_connections`). `bridge` is the bridge's own file store (its default): parts go through its
PutBlobPart/GetBlobPart RPCs on the routers' gRPC connections. `auto` (the default) is `s3` when the
`relay` mode runs and `bridge` otherwise, as every run before the option existed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from benchmarks.wan.topology import BLOB_ADDR, HUB_ADDR, NS_A, NS_B, NS_HUB, WanLab
from relay_common.audit import read_events
from relay_demo.network import LocalRelayNetwork, Remote, Shared

MODES = ("relay", "relay-plain", "relay-accel")
PAIRS = {"relay": ("site-a", "site-b"), "relay-plain": ("site-a2", "site-b2"), "relay-accel": ("site-a3", "site-b3")}
ACCEL_SETTINGS: dict[str, object] = {"associations": 4}  # the [accelerate] section of relay-accel's routers
PLAIN: dict[str, object] = {"compression": False, "spill_threshold_bytes": 0}
BUCKET = "drwan-spill"
BLOB_PORT = 9000
REGION = "us-east-1"
# moto accepts any credentials; the bridge needs some for boto3 to sign. Never real ones.
AWS_ENV = {"AWS_ACCESS_KEY_ID": "drwan", "AWS_SECRET_ACCESS_KEY": "drwan", "AWS_EC2_METADATA_DISABLED": "true"}
PROBE = str(Path(__file__).resolve().parent / "probe.py")
STORE_SYN = ["-p", "tcp", "--syn", "-d", BLOB_ADDR, "--dport", str(BLOB_PORT)]  # iptables match of a new connection
BLOB_STORES = ("auto", "s3", "bridge")


def dest_title(mode: str, base: str) -> str:
    """The AE title under which site B's router exposes a device of site A (per relay mode: distinct)."""
    return f"{base}_{ {'relay': 'R', 'relay-plain': 'P'}.get(mode, 'X') }"[:16]


class RelayModes:
    """Starts and stops moto, the bridge and the routers of the requested relay modes."""

    def __init__(
        self,
        lab: WanLab,
        workdir: Path,
        modes: list[str],
        relay_dicom: Mapping[str, object],
        env: Mapping[str, str],
        blob_store: str = "auto",
    ) -> None:
        self.lab = lab
        self.workdir = workdir
        self.modes = [m for m in MODES if m in modes]
        if blob_store == "auto":
            blob_store = "s3" if "relay" in self.modes else "bridge"
        self.blob_store = blob_store
        self.relay_dicom = dict(relay_dicom)
        self.env = {k: v for k, v in env.items() if not k.startswith("AWS_")} | AWS_ENV
        self.moto: subprocess.Popen[bytes] | None = None
        self.net: LocalRelayNetwork | None = None
        self.ports: dict[str, int] = {}  # mode -> router A's DICOM port (in site A, on 127.0.0.1)
        self.ports_b: dict[str, int] = {}  # mode -> router B's DICOM port (in site B, on 127.0.0.1)
        self.pids: dict[str, int] = {}

    @property
    def blob_url(self) -> str:
        return f"http://{BLOB_ADDR}:{BLOB_PORT}"

    def dicom_settings(self, mode: str) -> dict[str, object]:
        """[dicom] settings of the mode's routers: defaults + --relay-dicom; relay-plain keeps its two keys.
        With the s3 store, the routers may open its presigned URLs (plain http on a loopback address): without
        `spill_endpoints` a router refuses them and sends everything inline, as every run before 2026-12-07
        (accel-egress) did whose blob store was s3 (runs with the relay mode)."""
        store = {"spill_endpoints": [self.blob_url + "/"], "spill_allow_insecure_http": True}
        if mode == "relay-plain":
            return {**self.relay_dicom, **PLAIN}
        return {**self.relay_dicom, **(store if self.blob_store == "s3" else {})}

    def _start_moto(self) -> None:
        log = (self.workdir / "moto.log").open("ab")
        self.moto = self.lab.popen(
            NS_HUB, [sys.executable, "-m", "moto.server", "-H", BLOB_ADDR, "-p", str(BLOB_PORT)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )  # fmt: skip
        self.pids["moto"] = self.moto.pid
        # Create the bucket from inside the hub (moto takes an unsigned PUT /bucket); retries until moto answers.
        deadline = time.monotonic() + 30
        while True:
            r = self.lab.run(
                NS_HUB,
                [sys.executable, PROBE, "http", "--method", "PUT", "--url", f"{self.blob_url}/{BUCKET}",
                 "--retry-s", "20"],
                timeout=60,
            )  # fmt: skip
            if r.returncode == 0 and json.loads(r.stdout)["status"] == 200:
                return
            if self.moto.poll() is not None or time.monotonic() > deadline:
                tail = (self.workdir / "moto.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"moto did not start in the hub: {r.stdout} {r.stderr[-1000:]}\n{tail}")
            time.sleep(0.5)

    def _count_store_connections(self) -> None:
        """A rule that only counts: every TCP SYN reaching the blob store in the hub (a new connection)."""
        self.lab.run(NS_HUB, ["iptables", "-w", "-I", "INPUT", *STORE_SYN], timeout=30, check=True)

    def store_connections(self) -> int:
        """TCP connections opened to the blob store so far (0 without the s3 store)."""
        if self.moto is None:
            return 0
        r = self.lab.run(NS_HUB, ["iptables", "-w", "-L", "INPUT", "-v", "-x", "-n"], timeout=30)
        for line in r.stdout.splitlines():
            if f"dpt:{BLOB_PORT}" in line and BLOB_ADDR in line and "flags:" in line:
                return int(line.split()[0])
        return 0

    def start(
        self,
        b_devices: Mapping[str, int],
        a_devices: Mapping[str, int],
        accel_devices: Mapping[str, int] | None = None,
    ) -> RelayModes:
        """`b_devices`: AE title -> port of devices in site B, reached from A as TITLE_B (both modes).
        `a_devices`: the same for site A, reached from B as dest_title(mode, TITLE) (C-MOVE destinations).
        `accel_devices`: relay-accel's storage destinations in site B (accelerated; default `b_devices`)."""
        if not self.modes:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        spill = None
        if self.blob_store == "s3":
            self._start_moto()
            self._count_store_connections()
            spill = {"store": f"s3://{BUCKET}/spill/", "endpoint_url": self.blob_url, "region": REGION}
        prefixes = {"bridge": self.lab.prefix(NS_HUB)}
        for a, b in PAIRS.values():
            prefixes[a], prefixes[b] = self.lab.prefix(NS_A), self.lab.prefix(NS_B)
        self.net = LocalRelayNetwork(
            self.workdir, env=self.env, bridge_spill=spill, bridge_host=HUB_ADDR, command_prefix=prefixes
        ).start()
        for mode in self.modes:
            a, b = PAIRS[mode]
            dicom = self.dicom_settings(mode)
            if mode == "relay-accel":
                self._add_accel_pair(a, b, accel_devices or b_devices, dicom)
                continue
            site_b = self.net.add_site(
                b,
                shared=[Shared(t, "127.0.0.1", p, [a]) for t, p in b_devices.items()],
                remote=[Remote(dest_title(mode, t), a, t) for t in a_devices],
                **dicom,
            )
            site_a = self.net.add_site(
                a,
                shared=[Shared(t, "127.0.0.1", p, [b]) for t, p in a_devices.items()],
                remote=[Remote(f"{t}_B"[:16], b, t) for t in b_devices],
                **dicom,
            )
            assert site_a.port and site_b.port and site_a.process and site_b.process
            self.ports[mode], self.ports_b[mode] = site_a.port, site_b.port
            suffix = "" if mode == "relay" else "-plain"
            self.pids[f"router-a{suffix}"] = site_a.process.pid
            self.pids[f"router-b{suffix}"] = site_b.process.pid
        self.net.wait_connected(60)
        assert self.net.bridge is not None
        self.pids["bridge"] = self.net.bridge.pid
        if "relay-accel" in self.modes:
            self._wait_capabilities(list(accel_devices or b_devices))
        return self

    def _add_accel_pair(self, a: str, b: str, devices: Mapping[str, int], dicom: Mapping[str, object]) -> None:
        assert self.net is not None
        site_b = self.net.add_site(
            b, shared=[Shared(t, "127.0.0.1", p, [a], accelerate=True) for t, p in devices.items()],
            accelerate=ACCEL_SETTINGS, **dicom,
        )  # fmt: skip
        site_a = self.net.add_site(
            a, remote=[Remote(f"{t}_B"[:16], b, t, accelerate=True) for t in devices],
            accelerate=ACCEL_SETTINGS, **dicom,
        )  # fmt: skip
        assert site_a.port and site_b.port and site_a.process and site_b.process
        self.ports["relay-accel"], self.ports_b["relay-accel"] = site_a.port, site_b.port
        self.pids["router-a-accel"], self.pids["router-b-accel"] = site_a.process.pid, site_b.process.pid

    def _accel_status(self, site: str) -> dict[str, object]:
        assert self.net is not None
        status = self.net.status(site).get("accelerate")
        return status if isinstance(status, dict) else {}

    def _wait_capabilities(self, titles: list[str], timeout: float = 120.0) -> None:
        """Router A answers locally only once it learned what the destination accepts (from router B)."""
        a = PAIRS["relay-accel"][0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            routes = self._accel_status(a).get("routes", {})
            if all(routes.get(f"{t}_B"[:16], {}).get("capabilities_known") for t in titles):  # type: ignore[union-attr]
                return
            time.sleep(0.2)
        raise RuntimeError(f"relay-accel: router A did not learn the capabilities of {titles} in {timeout:.0f} s")

    def accel_drained(self) -> bool:
        """Both relay-accel spools are empty: every instance delivered and its outcome back at router A."""
        return all(
            not any(dict(self._accel_status(site).get("spool_entries", {"?": 1})).values())  # type: ignore[arg-type]
            for site in PAIRS["relay-accel"]
        )

    def association_events(self, mode: str) -> int:
        """Associations of `mode` the bridge has audited (it writes the event when the association ends)."""
        if self.net is None or mode not in PAIRS:
            return 0
        try:
            events = read_events(self.net.workdir / "audit.jsonl")
        except (OSError, ValueError):
            return 0
        return sum(1 for e in events if e.get("event") == "association" and e.get("from_site") in PAIRS[mode])

    def bridge_bytes(self) -> dict[str, int]:
        """Bytes the bridge has carried so far, both ways, per relay mode (its audit's association events)."""
        if self.net is None:
            return {}
        try:
            events = [e for e in read_events(self.net.workdir / "audit.jsonl") if e.get("event") == "association"]
        except (OSError, ValueError):
            return {}
        out = {}
        for mode in self.modes:
            out[mode] = sum(
                int(e.get("bytes_from_initiator", 0)) + int(e.get("bytes_from_destination", 0))
                for e in events
                if e.get("from_site") in PAIRS[mode]
            )
        return out

    def describe(self) -> dict[str, object]:
        meaning = {
            "relay": "router defaults (zstd on, spill above 8 MiB)" + (" + --relay-dicom" if self.relay_dicom else ""),
            "relay-plain": "compression off, spill off: every byte inline through the bridge",
            "relay-accel": "router defaults + accelerate = true on the storage route: router A answers from its "
            f"spool, buckets to router B, parallel delivery ({ACCEL_SETTINGS}); the time is end to end "
            "(storescu start to the last file at storescp), sender_seconds is storescu's own",
        }
        return {
            "modes": {
                mode: {
                    "routers": list(PAIRS[mode]),
                    "router_dicom_settings": self.dicom_settings(mode),
                    "meaning": meaning[mode],
                }
                for mode in self.modes
            },
            "blob_store": f"S3 on moto's server in the hub at {self.blob_url}, bucket {BUCKET}"
            if self.blob_store == "s3"
            else "the bridge's own file store (parts through its blob RPCs)",
            "path": "storescu -> router A -> bridge (hub) -> router B -> storescp; gRPC over TLS, sealed frames; "
            "spilled parts: router A -> S3 (hub) -> router B through presigned URLs",
        }

    def stop(self) -> None:
        if self.net is not None:
            self.net.stop()
        if self.moto is not None and self.moto.poll() is None:
            self.moto.terminate()
            try:
                self.moto.wait(10)
            except subprocess.TimeoutExpired:
                self.moto.kill()
                self.moto.wait()

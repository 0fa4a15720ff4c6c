"""Site B's archive: a real Orthanc with a few studies, queried (C-FIND) and retrieved from (C-MOVE) by site A.

    find   pynetdicom in A: associate, one study-level C-FIND (Study Root, all studies), release;
           timed in-process like echo (probe.py find)
    move   DCMTK movescu in A asks the archive to C-MOVE the CT study to a storescp in A ("MOVE",
           port 11113); the archive opens the sub-association itself, back through the same path

Paths, by mode (the archive's modality table has one move destination per mode, told apart by AE title):

    raw          movescu -> 127.10.2.2:4242 ARCHIVE;      sub-association to MOVE_RAW = 127.10.1.2:11113
    vpn          movescu -> 127.20.0.2:4242 ARCHIVE;      sub-association to MOVE_VPN = 127.20.0.1:11113
    relay        movescu -> router A, called ARCHIVE_B;   sub-association to MOVE_R = router B (site-b),
                                                          which relays it to site A's shared MOVE device
    relay-plain  the same through site-a2/site-b2;         MOVE_P = router B of that pair

The archive and storescp "MOVE" run with TCP_NODELAY=1 like every DICOM process here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from benchmarks.common import dcmtk
from benchmarks.wan.orthanc import NsOrthanc
from benchmarks.wan.relay import MODES as RELAY_MODES
from benchmarks.wan.relay import dest_title
from benchmarks.wan.topology import A_ADDR, B_ADDR, NS_A, NS_B, VPN_A_ADDR, VPN_B_ADDR, WanLab
from benchmarks.wan.workloads import check_arrival
from relay_demo.datasets import generate_ct_series, write_series

PROBE = str(Path(__file__).resolve().parent / "probe.py")
ARCHIVE_AET = "ARCHIVE"
ARCHIVE_PORT = 4242
ARCHIVE_HTTP = 8042  # its REST API, on 127.0.0.1 in site B only
MOVE_AET = "MOVE"
MOVE_PORT = 11113
MOVE_TITLES = {"raw": "MOVE_RAW", "vpn": "MOVE_VPN", **{m: dest_title(m, MOVE_AET) for m in RELAY_MODES}}
DICOM_ENV = {**os.environ, "TCP_NODELAY": "1"}
EXTRA_STUDIES = 4  # small studies besides the CT study, so that a C-FIND returns a few answers


def extra_studies(cache: Path) -> list[Path]:
    """A few small CT studies (deterministic), each of 3 instances of 64x64."""
    directory = cache / f"archive-{EXTRA_STUDIES}"
    marker = directory / ".complete"
    if not marker.exists():
        shutil.rmtree(directory, ignore_errors=True)
        for i in range(EXTRA_STUDIES):
            write_series(
                generate_ct_series(3, rows=64, cols=64, patient_id=f"RELAY-ARCH-{i:04d}", patient_name=f"Archive^{i}",
                                   seed=100 + i),
                directory,
            )  # fmt: skip
        marker.write_text("ok")
    return sorted(directory.glob("*.dcm"))


class Archive:
    """Orthanc "ARCHIVE" in site B and storescp "MOVE" in site A."""

    def __init__(self, lab: WanLab, workdir: Path, rx: Path, log_dir: Path) -> None:
        self.lab = lab
        self.orthanc: NsOrthanc | None = None
        self.workdir = workdir
        self.rx = rx  # where storescp "MOVE" writes (tmpfs)
        self.log_dir = log_dir
        self.scp: subprocess.Popen[bytes] | None = None
        self.studies = 0
        self.pids: dict[str, int] = {}

    def start(self, relay_ports_b: dict[str, int]) -> Archive:
        modalities = {
            "move_raw": (MOVE_TITLES["raw"], A_ADDR, MOVE_PORT),
            "move_vpn": (MOVE_TITLES["vpn"], VPN_A_ADDR, MOVE_PORT),
            **{f"move_{m}": (MOVE_TITLES[m], "127.0.0.1", port) for m, port in relay_ports_b.items()},
        }
        self.orthanc = NsOrthanc(
            self.lab, NS_B, self.workdir, aet=ARCHIVE_AET, dicom_port=ARCHIVE_PORT, http_port=ARCHIVE_HTTP,
            modalities=modalities,
        ).start()  # fmt: skip
        assert self.orthanc.proc is not None
        self.pids["archive"] = self.orthanc.proc.pid
        self.rx.mkdir(parents=True, exist_ok=True)
        self.scp = self.lab.popen(
            NS_A,
            [dcmtk("storescp"), "--disable-host-lookup", "+xa", "-aet", MOVE_AET, "-od", str(self.rx), "-fe", ".dcm",
             str(MOVE_PORT)],
            env=DICOM_ENV, stdout=subprocess.DEVNULL,
            stderr=(self.log_dir / "storescp-move.log").open("ab"),
        )  # fmt: skip
        self.pids["storescp-move"] = self.scp.pid
        return self

    def load(self, studies: list[tuple[Path, ...]]) -> None:
        """Store the studies into the archive from inside site B (untimed, local)."""
        for files in studies:
            ts = str(pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
            extra = {"1.2.840.10008.1.2.4.90": ["-xv"], "1.2.840.10008.1.2.4.91": ["-xw"]}.get(ts, [])
            cmd = [dcmtk("storescu"), "-R", *extra, "-aet", "LOADER", "-aec", ARCHIVE_AET, "127.0.0.1",
                   str(ARCHIVE_PORT), *map(str, files)]  # fmt: skip
            r = self.lab.run(NS_B, cmd, timeout=590, env=DICOM_ENV)
            if r.returncode != 0:
                raise RuntimeError(f"loading the archive failed: {r.stderr[-1500:]}")
        assert self.orthanc is not None
        self.studies = len(self.orthanc.rest("GET", "/studies"))

    @staticmethod
    def target(mode: str, relay_ports: dict[str, int]) -> tuple[str, int, str]:
        if mode == "raw":
            return B_ADDR, ARCHIVE_PORT, ARCHIVE_AET
        if mode == "vpn":
            return VPN_B_ADDR, ARCHIVE_PORT, ARCHIVE_AET
        return "127.0.0.1", relay_ports[mode], f"{ARCHIVE_AET}_B"

    def find(self, mode: str, relay_ports: dict[str, int], count: int, timeout: float) -> list[dict[str, float]]:
        host, port, called = self.target(mode, relay_ports)
        r = self.lab.run(
            NS_A, [sys.executable, PROBE, "find", "--to", f"{host}:{port}", "--aec", called, "--count", str(count)],
            timeout=timeout,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"find ({mode}) failed: {r.stderr[-2000:]}")
        samples: list[dict[str, float]] = json.loads(r.stdout)["samples"]
        wrong = {s["matches"] for s in samples} - {self.studies}
        if wrong:
            raise RuntimeError(f"find ({mode}): {sorted(wrong)} answers, the archive holds {self.studies} studies")
        return samples

    def move(
        self, mode: str, relay_ports: dict[str, int], files: tuple[Path, ...], verify: bool, timeout: float
    ) -> float:
        host, port, called = self.target(mode, relay_ports)
        shutil.rmtree(self.rx, ignore_errors=True)
        self.rx.mkdir()
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        cmd = [dcmtk("movescu"), "-S", "-aet", "BENCH_SCU", "-aec", called, "-aem", MOVE_TITLES[mode],
               "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", host, str(port)]  # fmt: skip
        t0 = time.perf_counter()
        r = self.lab.run(NS_A, cmd, timeout=timeout, env=DICOM_ENV)
        elapsed = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"movescu ({mode}) failed ({r.returncode}): {r.stderr[-2000:]}")
        check_arrival(f"move ({mode})", self.rx, files, verify)
        return elapsed

    def stop(self) -> None:
        if self.scp is not None and self.scp.poll() is None:
            self.scp.terminate()
            try:
                self.scp.wait(10)
            except subprocess.TimeoutExpired:
                self.scp.kill()
                self.scp.wait()
        if self.orthanc is not None:
            self.orthanc.terminate()
            self.orthanc.wait()

"""The DICOMweb baseline: STOW-RS from an Orthanc in site A to an Orthanc in site B over HTTPS, no VPN.

    site A: Orthanc "WEB_A" with the DICOMweb plugin (orthanc-dicomweb); its REST API on 127.0.0.1:8044
    site B: Orthanc "WEB_B" with the DICOMweb plugin, HTTP on 127.0.0.1:8044, behind a TLS terminator
            (tlsproxy.py) on https://127.10.2.2:8043 (Orthanc's own HTTPS crashes on Debian 12: orthanc.py)

Each workload's study is stored into Orthanc A beforehand (storescu inside site A, untimed). The timed
step is one synchronous REST call inside site A:

    POST /dicom-web/servers/B/stow  {"Resources": [<study>], "Synchronous": true}

Orthanc A's DICOMweb client (libcurl, certificate checked against the suite's throwaway CA) then sends
the study as multipart/related application/dicom to Orthanc B across the emulated link (A -> hub -> B,
the same shaped path as the raw mode). Before each run Orthanc B is emptied (untimed); after it the
suite checks the instance count, and on the first repeat the SOP Instance UID and pixel SHA-256 of every
stored file against what was sent. Both Orthancs run with TCP_NODELAY=1 in their environment.

The `move` workload in this mode is the DICOMweb counterpart of a C-MOVE, a WADO-RS retrieve: Orthanc B
holds the CT study (stored into it untimed), Orthanc A's copy is deleted (untimed), then, timed:

    POST /dicom-web/servers/B/retrieve  {"Resources": [{"Study": <StudyInstanceUID>}], "Synchronous": true}
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from benchmarks.common import dcmtk
from benchmarks.wan.orthanc import NsOrthanc, OrthancError, dicomweb_plugin, make_tls
from benchmarks.wan.topology import B_ADDR, NS_A, NS_B, WanLab
from relay_demo.datasets import fingerprints

HERE = Path(__file__).resolve().parent
DICOM_ENV = {**os.environ, "TCP_NODELAY": "1"}
WEB_DICOM_PORT = 4243  # Orthanc A's DICOM port (loading only); 4242 is the archive's in site B
WEB_HTTP_PORT = 8044  # REST of both Orthancs, on 127.0.0.1 of their own namespace
HTTPS_PORT = 8043  # site B's DICOMweb endpoint (TLS terminator)


class DicomWeb:
    def __init__(self, lab: WanLab, workdir: Path, log_dir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.log_dir = log_dir
        self.a: NsOrthanc | None = None
        self.b: NsOrthanc | None = None
        self.proxy: subprocess.Popen[bytes] | None = None
        self.studies: dict[str, str] = {}  # workload -> Orthanc A's study ID
        self.pids: dict[str, int] = {}

    @property
    def url(self) -> str:
        return f"https://{B_ADDR}:{HTTPS_PORT}/dicom-web/"

    def start(self) -> DicomWeb:
        plugin = str(dicomweb_plugin())
        ca, server = make_tls(self.workdir / "tls", [B_ADDR, "127.0.0.1"])
        self.b = NsOrthanc(
            self.lab, NS_B, self.workdir / "orthanc-b", aet="WEB_B", dicom_port=WEB_DICOM_PORT,
            http_port=WEB_HTTP_PORT, extra={"Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}},
        ).start()  # fmt: skip
        ready = self.workdir / "tlsproxy.ready"
        self.proxy = self.lab.popen(
            NS_B,
            [sys.executable, str(HERE / "tlsproxy.py"), "--listen", f"{B_ADDR}:{HTTPS_PORT}", "--cert", str(server),
             "--to", f"127.0.0.1:{WEB_HTTP_PORT}", "--ready", str(ready)],
            stdout=subprocess.DEVNULL, stderr=(self.log_dir / "tlsproxy.log").open("ab"),
        )  # fmt: skip
        servers = {"B": {"Url": self.url}}
        self.a = NsOrthanc(
            self.lab, NS_A, self.workdir / "orthanc-a", aet="WEB_A", dicom_port=WEB_DICOM_PORT,
            http_port=WEB_HTTP_PORT, ca=ca,
            extra={"Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": servers}},
        ).start()  # fmt: skip
        if not _wait_file(ready, self.proxy):
            raise RuntimeError("the TLS terminator in site B did not start: " + _tail(self.log_dir / "tlsproxy.log"))
        for name, proc in (("orthanc-web-a", self.a.proc), ("orthanc-web-b", self.b.proc), ("tlsproxy", self.proxy)):
            if proc is not None:
                self.pids[name] = proc.pid
        return self

    def load(self, name: str, files: tuple[Path, ...], storescu_args: list[str]) -> None:
        """Store a workload's study into Orthanc A (inside site A, untimed)."""
        assert self.a is not None
        self._load(self.a, NS_A, files, storescu_args)
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        self.studies[name] = self.a.lookup(study)

    def _stow(self, resources: list[str], timeout: float) -> float:
        assert self.a is not None and self.b is not None
        self.b.delete_all()
        body = {"Resources": resources, "Synchronous": True}
        answer = self.a.request("POST", "/dicom-web/servers/B/stow", body, timeout=timeout)
        return float(answer["seconds"])

    def warm(self, files: tuple[Path, ...]) -> None:
        assert self.a is not None and self.b is not None
        ids = [self.a.lookup(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)) for f in files]
        self._stow(ids, 120)
        if self.b.count_instances() != len(files):
            raise RuntimeError("dicomweb warm-up: Orthanc B did not store the instances")
        self.b.delete_all()

    def stow(self, name: str, files: tuple[Path, ...], verify: bool, timeout: float) -> float:
        """The timed STOW-RS of a workload's study; checks what arrived in B."""
        assert self.b is not None
        try:
            seconds = self._stow([self.studies[name]], timeout)
        except OrthancError as exc:
            raise RuntimeError(f"dicomweb {name}: {exc}") from None
        got = self.b.count_instances()
        if got != len(files):
            raise RuntimeError(f"dicomweb {name}: Orthanc B holds {got} of {len(files)} instances")
        if verify and fingerprints(self.b.stored_files()) != fingerprints(files):
            raise RuntimeError(f"dicomweb {name}: what Orthanc B stored differs from what was sent")
        return seconds

    def _load(self, orthanc: NsOrthanc, ns: str, files: tuple[Path, ...], storescu_args: list[str]) -> None:
        cmd = [dcmtk("storescu"), "-R", *storescu_args, "-aet", "LOADER", "-aec", orthanc.aet, "127.0.0.1",
               str(WEB_DICOM_PORT), *map(str, files)]  # fmt: skip
        r = self.lab.run(ns, cmd, timeout=590, env=DICOM_ENV)
        if r.returncode != 0:
            raise RuntimeError(f"loading Orthanc {orthanc.aet} failed: {r.stderr[-1500:]}")

    def retrieve(self, files: tuple[Path, ...], storescu_args: list[str], verify: bool, timeout: float) -> float:
        """WADO-RS retrieve of a study from Orthanc B into Orthanc A (timed); B is filled and A's copy deleted
        beforehand (untimed)."""
        assert self.a is not None and self.b is not None
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        held = self.b.rest("POST", "/tools/lookup", study)
        if not held or int(self.b.rest("GET", f"/studies/{held[0]['ID']}/statistics")["CountInstances"]) != len(files):
            self.b.delete_all()
            self._load(self.b, NS_B, files, storescu_args)
        sid = self.b.lookup(study)  # Orthanc IDs derive from the UIDs: the same in A and B
        if self.a.rest("POST", "/tools/lookup", study):
            self.a.rest("DELETE", f"/studies/{sid}")
        body = {"Resources": [{"Study": study}], "Synchronous": True}
        try:
            seconds = float(self.a.request("POST", "/dicom-web/servers/B/retrieve", body, timeout=timeout)["seconds"])
            got = int(self.a.rest("GET", f"/studies/{sid}/statistics")["CountInstances"])
        except OrthancError as exc:
            raise RuntimeError(f"dicomweb retrieve: {exc}") from None
        if got != len(files):
            raise RuntimeError(f"dicomweb retrieve: Orthanc A holds {got} of {len(files)} instances")
        if verify:
            stored = fingerprints(self.a.stored_files())
            if any(stored.get(uid) != digest for uid, digest in fingerprints(files).items()):
                raise RuntimeError("dicomweb retrieve: what Orthanc A stored differs from what B held")
        return seconds

    def describe(self) -> dict[str, object]:
        return {
            "path": "Orthanc A (site A) -> HTTPS -> TLS terminator (site B) -> Orthanc B, over the raw path (no VPN)",
            "request": "POST /dicom-web/servers/B/stow {Resources: [study], Synchronous: true} on Orthanc A",
            "move": "WADO-RS retrieve: POST /dicom-web/servers/B/retrieve {Resources: [{Study: uid}], Synchronous: "
            "true} on Orthanc A (Orthanc B holds the study)",
            "software": "Orthanc 1.10 + DICOMweb plugin (Debian orthanc-dicomweb), libcurl client",
            "tls": "P-256 certificate from a throwaway CA, checked by Orthanc A; terminator: Python ssl (TLS >= 1.2)",
        }

    def stop(self) -> None:
        for orthanc in (self.a, self.b):
            if orthanc is not None:
                orthanc.terminate()
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()
        for orthanc in (self.a, self.b):
            if orthanc is not None:
                orthanc.wait()
        if self.proxy is not None:
            try:
                self.proxy.wait(10)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-1500:] if path.exists() else ""

"""Orthanc (Debian's `Orthanc` binary) inside a namespace of the WAN lab, driven through its REST API.

The suite runs in the root namespace and cannot reach a server inside a site's namespace, so every
REST call is one `probe.py http` process run inside that namespace (the same way the other probes
run). Things the WAN suite relies on (see also tests/support/orthanc.py):

* Orthanc binds DICOM and HTTP on every address of its namespace; two Orthancs in one namespace
  need distinct ports.
* Orthanc uses DCMTK for DICOM, so TCP_NODELAY=1 is in its environment like every DICOM process here.
* `RemoteAccessAllowed: false` lets only 127.0.0.1 in (its REST API is called from its own namespace).
* HTTPS server: Debian 12's Orthanc 1.10.1 crashes (SIGSEGV in a civetweb worker, civetweb 1.15 with
  OpenSSL 3) on its first HTTPS connection when `SslEnabled` is on, whatever the key type or TLS
  version (reproduced with curl). So the DICOMweb server's HTTPS endpoint is a TLS terminator
  (tlsproxy.py) in front of Orthanc's plain HTTP on 127.0.0.1. As an HTTPS client (DICOMweb plugin,
  libcurl) Orthanc works and checks the server against `HttpsCACertificates` (`ca`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.wan.topology import WanLab
from relay_common.pki import make_dev_pki

PROBE = str(Path(__file__).resolve().parent / "probe.py")
PLUGINS = Path("/usr/share/orthanc/plugins")


def orthanc_binary() -> str:
    found = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)
    if found is None:
        raise FileNotFoundError("Orthanc is not installed (apt-get install -y orthanc)")
    return found


def dicomweb_plugin() -> Path:
    path = PLUGINS / "libOrthancDicomWeb.so"
    if not path.exists():
        raise FileNotFoundError("Orthanc's DICOMweb plugin is not installed (apt-get install -y orthanc-dicomweb)")
    return path


def make_tls(directory: Path, ips: Sequence[str]) -> tuple[Path, Path]:
    """A throwaway CA and one server certificate for `ips`: (ca.pem, server-with-key.pem for the TLS terminator)."""
    files = make_dev_pki(directory, hostnames=[], ips=list(ips), days=2)
    combined = directory / "server-with-key.pem"
    combined.write_bytes(files.server_cert.read_bytes() + files.server_key.read_bytes())
    combined.chmod(0o600)
    return files.ca_cert, combined


class OrthancError(RuntimeError):
    pass


class NsOrthanc:
    """One Orthanc in namespace `ns` (None: this namespace), everything in `workdir`."""

    def __init__(
        self,
        lab: WanLab | None,
        ns: str | None,
        workdir: Path,
        *,
        aet: str,
        dicom_port: int,
        http_port: int,
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
        ca: Path | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self.lab, self.ns, self.workdir = lab, ns, workdir
        self.aet, self.dicom_port, self.http_port = aet, dicom_port, http_port
        self.modalities = dict(modalities or {})
        self.ca = ca
        self.extra = dict(extra or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "Name": f"drwan-{self.aet}",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAssociationCloseDelay": 0,
            "DicomScuTimeout": 60,
            "HttpTimeout": 600,
            "Plugins": [],
            "SaveJobs": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "MetricsEnabled": False,
            "SyncStorageArea": False,
            "HttpThreadsCount": 10,
            "ConcurrentJobs": 2,
            "StableAge": 1,
        }
        if self.ca:
            config |= {"HttpsVerifyPeers": True, "HttpsCACertificates": str(self.ca)}
        config.update(self.extra)
        return config

    def _prefix(self) -> list[str]:
        return self.lab.prefix(self.ns) if self.lab is not None and self.ns else []

    def start(self, timeout: float = 30.0) -> NsOrthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        self.proc = subprocess.Popen(
            [*self._prefix(), orthanc_binary(), f"--logdir={self.workdir / 'logs'}", str(path)],
            cwd=self.workdir,
            env={**os.environ, "TCP_NODELAY": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "stderr.txt").open("ab"),
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise OrthancError(f"Orthanc {self.aet} exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                self.rest("GET", "/system", timeout=5, retry_s=min(10.0, max(0.1, deadline - time.monotonic())))
                return self
            except (OrthancError, subprocess.TimeoutExpired):
                if time.monotonic() > deadline:
                    tail = self.log_tail()
                    raise OrthancError(f"Orthanc {self.aet} did not answer within {timeout} s: {tail}") from None
                time.sleep(0.2)

    def log_tail(self) -> str:
        for name in ("logs/Orthanc.log", "stderr.txt"):
            path = self.workdir / name
            if path.exists():
                text = path.read_text(errors="replace")[-2500:]
                if text.strip():
                    return text
        return ""

    def request(
        self, method: str, path: str, data: Any = None, *, timeout: float = 120.0, retry_s: float = 0.0
    ) -> dict[str, Any]:
        """One REST call from inside the namespace: {"status", "seconds", "body"}; raises on HTTP >= 400."""
        cmd = [sys.executable, PROBE, "http", "--method", method, "--url", self.base_url + path,
               "--timeout", str(timeout), "--retry-s", str(retry_s)]  # fmt: skip
        if data is not None:
            cmd += ["--data", data if isinstance(data, str) else json.dumps(data)]
        r = subprocess.run([*self._prefix(), *cmd], capture_output=True, text=True, timeout=timeout + retry_s + 30)
        if r.returncode != 0:
            raise OrthancError(f"{method} {path} on Orthanc {self.aet} failed: {r.stderr[-1500:]}")
        answer: dict[str, Any] = json.loads(r.stdout)
        if answer["status"] >= 400:
            raise OrthancError(
                f"{method} {path} on Orthanc {self.aet} -> HTTP {answer['status']}: {answer['body'][:1500]}"
                f"\n{self.log_tail()[-1000:]}"
            )
        return answer

    def rest(self, method: str, path: str, data: Any = None, *, timeout: float = 120.0, retry_s: float = 0.0) -> Any:
        body = self.request(method, path, data, timeout=timeout, retry_s=retry_s)["body"]
        return json.loads(body) if body.strip() else None

    def lookup(self, uid: str) -> str:
        """Orthanc ID of the resource with this DICOM UID."""
        hits = self.rest("POST", "/tools/lookup", uid)
        if not hits:
            raise OrthancError(f"Orthanc {self.aet} has no resource {uid}")
        return str(hits[0]["ID"])

    def count_instances(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def delete_all(self) -> None:
        for patient in self.rest("GET", "/patients"):
            self.rest("DELETE", f"/patients/{patient}")

    def stored_files(self) -> list[Path]:
        """The DICOM files Orthanc keeps (uncompressed storage area: one file per instance, as received)."""
        return [p for p in self.storage.rglob("*") if p.is_file() and len(p.name) >= 32]

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

"""Orthanc as a real third-party PACS in the integration tests.

Why a wrapper: each test needs its own Orthanc (own ports, own SQLite index,
own modality table) that starts fast, is driven through its REST API, and
always stops (an orphan Orthanc holds its SQLite lock and its ports).

Things worth knowing about Orthanc 1.10 (Debian 12):

* It accepts associations from anyone, but aborts C-FIND/C-MOVE/C-GET from a
  calling AE title that is not in ``DicomModalities`` unless
  ``DicomAlwaysAllowFind/Move/Get`` is true. A C-MOVE destination must always
  be a declared modality (looked up by AE title).
* It binds DICOM and HTTP on every interface (there is no bind address option);
  ``RemoteAccessAllowed: false`` only restricts HTTP to loopback clients.
* Startup takes ~0.2 s, but a clean shutdown takes ~3.5 s (its HTTP and DICOM
  servers poll for the stop flag), so stop many at once with
  :meth:`OrthancProcess.terminate` then :meth:`OrthancProcess.wait`.
* Orthanc uses Debian's DCMTK for DICOM networking, so it too needs
  ``TCP_NODELAY=1`` in its environment.
* ``DicomAssociationCloseDelay`` (default 5 s) keeps Orthanc's outgoing SCU
  associations open after a job; it is 0 here so peers see a prompt release.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from relay_demo.datasets import fingerprint
from tests.support.ports import free_port, wait_for_port

__all__ = ["OrthancError", "OrthancProcess", "orthanc_binary"]

Modalities = Mapping[str, tuple[str, str, int]]


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable (Debian installs /usr/sbin/Orthanc), or None."""
    return shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)


class OrthancError(RuntimeError):
    """Orthanc failed to start, died, or answered a REST call with an error."""


class OrthancProcess:
    """One Orthanc server in ``workdir`` (config, storage, index and logs all inside).

    ``modalities`` maps a modality name to ``(AE title, host, port)``; with
    ``always_allow`` any caller may C-FIND/C-MOVE/C-GET. Ports 0 mean "pick a
    free one". ``extra_config`` is merged last, for tests that need a knob.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        aet: str,
        dicom_port: int = 0,
        http_port: int = 0,
        modalities: Modalities | None = None,
        always_allow: bool = False,
        extra_config: Mapping[str, Any] | None = None,
        verbose: bool = False,
        start_timeout: float = 20.0,
        http_timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.aet = aet
        self.host = "127.0.0.1"
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.modalities: dict[str, tuple[str, str, int]] = dict(modalities or {})
        self.always_allow = always_allow
        self.extra_config = dict(extra_config or {})
        self.verbose = verbose
        self.start_timeout = start_timeout
        self.http_timeout = http_timeout
        self.config_path = self.workdir / "orthanc.json"
        self.log_dir = self.workdir / "logs"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- configuration and lifecycle ----------------------------------------

    def config(self) -> dict[str, Any]:
        """The JSON configuration this instance runs with."""
        config: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": os.fspath(self.workdir / "storage"),
            "IndexDirectory": os.fspath(self.workdir / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {name: list(entry) for name, entry in self.modalities.items()},
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": self.always_allow,
            "DicomAlwaysAllowMove": self.always_allow,
            "DicomAlwaysAllowGet": self.always_allow,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAssociationCloseDelay": 0,
            "DicomScuTimeout": 30,
            "Plugins": [],
            "SaveJobs": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "MetricsEnabled": False,
            "SyncStorageArea": False,
            "HttpThreadsCount": 10,
            "ConcurrentJobs": 2,
        }
        config.update(self.extra_config)
        return config

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        """Orthanc's current log file (``--logdir`` keeps an ``Orthanc.log`` symlink)."""
        return self.log_dir / "Orthanc.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> OrthancProcess:
        """Write the config, start Orthanc, wait until REST and DICOM both answer."""
        binary = orthanc_binary()
        if binary is None:
            raise OrthancError("Orthanc is not installed (Debian: apt-get install orthanc)")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        args = [binary, f"--logdir={self.log_dir}"]
        if self.verbose:
            args.append("--verbose")
        args.append(os.fspath(self.config_path))
        with open(self.workdir / "stderr.txt", "wb") as stderr:
            self._proc = subprocess.Popen(
                args,
                cwd=self.workdir,
                env={**os.environ, "TCP_NODELAY": "1"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self._failure(f"Orthanc exited with code {self._proc.returncode} while starting")
            try:
                self.get_json("/system", timeout=1.0)
            except (OSError, OrthancError):
                time.sleep(0.05)
                continue
            if wait_for_port(self.dicom_port, timeout=max(0.1, deadline - time.monotonic())):
                return self
        self.stop()
        raise self._failure(f"Orthanc did not answer on HTTP {self.http_port}/DICOM {self.dicom_port}")

    def _failure(self, message: str) -> OrthancError:
        stderr = self.workdir / "stderr.txt"
        tail = self.log_text()[-3000:] or (stderr.read_text(errors="replace")[-3000:] if stderr.exists() else "")
        return OrthancError(f"{message} ({self.aet}); log: {self.log_path}\n{tail}")

    def terminate(self) -> None:
        """Ask Orthanc to stop (SIGTERM) without waiting; pair with :meth:`wait`."""
        if self.running:
            assert self._proc is not None
            self._proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 20.0) -> None:
        """Wait for exit (it must release its SQLite lock); SIGKILL after ``timeout``."""
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None

    def stop(self, timeout: float = 20.0) -> None:
        self.terminate()
        self.wait(timeout)

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- REST ----------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> bytes:
        """One REST call; errors become :class:`OrthancError` naming the log file."""
        req = urllib.request.Request(self.base_url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.http_timeout) as rsp:
                return bytes(rsp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            raise OrthancError(
                f"{method} {path} -> HTTP {exc.code}: {detail} (Orthanc {self.aet}, log {self.log_path})"
            ) from exc

    def get_json(self, path: str, *, timeout: float | None = None) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def post_json(self, path: str, payload: Any, *, timeout: float | None = None) -> Any:
        raw = self.request("POST", path, json.dumps(payload).encode(), timeout=timeout)
        return json.loads(raw) if raw.strip() else None

    def upload(self, source: str | os.PathLike[str] | bytes) -> str:
        """POST /instances a file (path or bytes); returns the Orthanc instance ID."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        answer = json.loads(self.request("POST", "/instances", data, content_type="application/dicom"))
        return str(answer["ID"])

    def upload_many(self, sources: Iterable[str | os.PathLike[str] | bytes]) -> list[str]:
        return [self.upload(s) for s in sources]

    def instances(self) -> list[str]:
        """Orthanc IDs of every stored instance."""
        return [str(i) for i in self.get_json("/instances")]

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file, byte for byte as Orthanc keeps it."""
        return self.request("GET", f"/instances/{orthanc_id}/file")

    def find_sop(self, sop_instance_uid: str) -> str | None:
        """The Orthanc ID of the instance with this SOP Instance UID, or None."""
        if not sop_instance_uid:
            return None
        raw = self.request("POST", "/tools/lookup", sop_instance_uid.encode(), content_type="text/plain")
        for hit in json.loads(raw):
            if hit.get("Type") == "Instance":
                return str(hit["ID"])
        return None

    def fingerprints(self) -> dict[str, str]:
        """``{SOPInstanceUID: pixel sha256}`` of everything stored (downloads each file)."""
        return dict(fingerprint(self.instance_file(i)) for i in self.instances())

    def delete_all(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self.get_json("/patients"):
            self.request("DELETE", f"/patients/{patient}")

    def set_modalities(self, modalities: Modalities, *, replace: bool = False) -> None:
        """Declare modalities at runtime (PUT /modalities/{name}); ``replace`` drops the others."""
        if replace:
            for name in set(self.get_json("/modalities")) - set(modalities):
                self.request("DELETE", f"/modalities/{name}")
                self.modalities.pop(name, None)
        for name, (aet, host, port) in modalities.items():
            body = json.dumps({"AET": aet, "Host": host, "Port": port}).encode()
            self.request("PUT", f"/modalities/{name}", body)
            self.modalities[name] = (aet, host, port)

    # -- Orthanc as an SCU (what a PACS does on its own initiative) -----------

    def echo(self, modality: str, *, timeout: float = 10.0) -> bool:
        """C-ECHO from Orthanc to a declared modality; True on success."""
        try:
            self.request("POST", f"/modalities/{modality}/echo", b"{}", timeout=timeout)
        except OrthancError:
            return False
        return True

    def store_to(self, modality: str, orthanc_ids: Iterable[str], *, timeout: float = 60.0) -> Any:
        """C-STORE instances (or patients/studies/series IDs) to a modality, synchronously."""
        payload = {"Resources": list(orthanc_ids), "Synchronous": True}
        return self.post_json(f"/modalities/{modality}/store", payload, timeout=timeout)

    def query(self, modality: str, level: str, query: Mapping[str, str], *, timeout: float = 30.0) -> list[dict]:
        """C-FIND from Orthanc to a modality; returns the answers as ``{tag: value}`` dicts."""
        payload = {"Level": level.capitalize(), "Query": dict(query)}
        created = self.post_json(f"/modalities/{modality}/query", payload, timeout=timeout)
        answers = self.get_json(f"/queries/{created['ID']}/answers?expand&simplify", timeout=timeout)
        return [dict(a) for a in answers]

    def move_from(
        self,
        modality: str,
        level: str,
        resources: Iterable[Mapping[str, str]],
        *,
        target_aet: str | None = None,
        timeout: float = 60.0,
    ) -> Any:
        """C-MOVE from a modality to ``target_aet`` (default: this Orthanc), synchronously."""
        payload: dict[str, Any] = {"Level": level.capitalize(), "Resources": [dict(r) for r in resources]}
        payload["TargetAet"] = target_aet or self.aet
        payload["Synchronous"] = True
        payload["Timeout"] = int(timeout)
        return self.post_json(f"/modalities/{modality}/move", payload, timeout=timeout + 5)

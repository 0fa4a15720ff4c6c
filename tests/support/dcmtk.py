"""Thin wrappers around the DCMTK command-line tools, as third-party DICOM peers.

Why DCMTK in the tests: it is the reference implementation most PACS and
workstations descend from, and a relay that only ever talked to pynetdicom
would prove little. The wrappers run the real programs as subprocesses and
parse what a test needs from their log output (which DCMTK writes to stderr).

Things worth knowing (all found the hard way):

* Debian's DCMTK leaves Nagle on unless ``TCP_NODELAY=1`` is in the
  environment; every C-STORE then stalls on a delayed ACK (~40-50 ms), so
  every tool here runs with it set.
* The tools' exit code is not a verdict: ``findscu`` exits 0 when the peer
  aborts the association, ``movescu`` when the move fails. Use
  :attr:`ToolResult.ok`, which also reads the log.
* ``storescu`` only proposes the compressed transfer syntax named by one
  ``-x?`` option, and ``-R`` does not add a file's own syntax either, so a
  mix of JPEG 2000 and RLE files cannot be sent with options alone. The
  wrapper writes an association profile (``-xf``) proposing exactly the
  (SOP class, transfer syntax) pairs of the files.
* ``storescp`` logs "storing DICOM file" *before* writing; a file is complete
  once any later line is logged (next request, release or abort).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, TypeAlias

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from relay_demo.datasets import fingerprints as _fingerprints
from tests.support.ports import free_port, wait_for_port

__all__ = [
    "DCMTK_TOOLS",
    "dcmtk_binary",
    "FindResult",
    "GetResult",
    "MoveResult",
    "RetrieveResult",
    "StoreResult",
    "StorescpProcess",
    "ToolError",
    "ToolResult",
    "echoscu",
    "findscu",
    "getscu",
    "missing_tools",
    "movescu",
    "storescu",
    "tool_env",
]

DCMTK_TOOLS = ("echoscu", "findscu", "movescu", "getscu", "storescu", "storescp")
Keys = Mapping[str, str | int | None]
Model = Literal["study", "patient", "worklist"]
_MODEL_FLAG = {"study": "-S", "patient": "-P", "worklist": "-W"}
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@functools.cache
def dcmtk_binary(name: str) -> str | None:
    """Absolute path of the DCMTK program ``name``, or None.

    Not simply ``shutil.which``: pynetdicom installs Python apps with the same
    names (echoscu, storescp, ...) into the venv's bin, which comes first on
    PATH in an activated venv. Only native executables count; ``$DCMTK_BIN``
    (a directory) wins if set.
    """
    dirs = [os.environ.get("DCMTK_BIN", ""), *os.environ.get("PATH", "").split(os.pathsep), "/usr/bin"]
    for directory in filter(None, dirs):
        candidate = Path(directory, name)
        try:
            if os.access(candidate, os.X_OK):
                with candidate.open("rb") as exe:
                    if exe.read(4) == b"\x7fELF":
                        return os.fspath(candidate)
        except OSError:
            continue
    return None


def missing_tools(names: Iterable[str] = DCMTK_TOOLS) -> list[str]:
    """The DCMTK programs that are not installed."""
    return [name for name in names if dcmtk_binary(name) is None]


def _exe(name: str) -> str:
    found = dcmtk_binary(name)
    if found is None:
        raise FileNotFoundError(f"DCMTK {name} is not installed (Debian: apt-get install dcmtk)")
    return found


def tool_env() -> dict[str, str]:
    """The environment for every DCMTK process: ours plus ``TCP_NODELAY=1``."""
    return {**os.environ, "TCP_NODELAY": "1"}


class ToolError(AssertionError):
    """A DCMTK tool did not succeed; the message carries its command line and log."""


@dataclass
class ToolResult:
    """What one DCMTK run did: exit code, output, and facts parsed from its log."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    duration: float
    timed_out: bool = False

    @property
    def log(self) -> str:
        return self.stderr + self.stdout

    @property
    def accepted(self) -> bool:
        """The association was accepted by the peer."""
        return "Association Accepted" in self.log

    @property
    def rejected(self) -> bool:
        """The peer sent A-ASSOCIATE-RJ."""
        return "Association Rejected" in self.log

    @property
    def aborted(self) -> bool:
        """The peer (or the network) aborted the association."""
        return "Peer Aborted Association" in self.log or "Aborting Association" in self.log

    @property
    def errors(self) -> list[str]:
        return [line for line in self.log.splitlines() if line.startswith(("E: ", "F: "))]

    @property
    def final_status(self) -> str | None:
        """The status text of the last response, e.g. ``"Success"`` or ``"Pending"``."""
        found = re.findall(r"Received (?:Final )?[\w-]+ Response(?: \d+)? \(([^)]*)\)", self.log)
        statuses = re.findall(r"DIMSE Status\s*: 0x[0-9A-Fa-f]{4}: (\w+)", self.log)
        if statuses:  # debug log (-d): the last message dump is authoritative
            return statuses[-1]
        return found[-1] if found else None

    @property
    def ok(self) -> bool:
        """Exit code 0, accepted, not aborted, no error lines, final status Success."""
        return (
            self.returncode == 0
            and not self.timed_out
            and self.accepted
            and not self.aborted
            and not self.errors
            and (self.final_status or "Success").startswith("Success")
        )

    def check(self) -> Self:
        """Raise :class:`ToolError` with the full log unless :attr:`ok`."""
        if not self.ok:
            raise ToolError(str(self))
        return self

    def __str__(self) -> str:
        state = "TIMED OUT" if self.timed_out else f"exit {self.returncode}"
        return f"$ {' '.join(self.args)}\n[{state} after {self.duration:.2f}s]\n{self.log[-6000:]}"


@dataclass
class RetrieveResult(ToolResult):
    """movescu/getscu: sub-operation counts of the final response, and files received."""

    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    received: list[Path] = field(default_factory=list)


MoveResult: TypeAlias = RetrieveResult
GetResult: TypeAlias = RetrieveResult


@dataclass
class StoreResult(ToolResult):
    """storescu's result: how many C-STORE responses said Success."""

    sent: int = 0
    succeeded: int = 0

    @property
    def ok(self) -> bool:
        return super().ok and self.succeeded == self.sent


class FindResult(list[dict[str, str]]):
    """findscu's matches (one ``{keyword: value}`` dict each), with the run attached.

    A list so that ``len(findscu(...))`` and ``findscu(...)[0]["PatientID"]``
    read naturally; ``.run`` (and the delegated ``ok``, ``returncode``...) tell
    whether the query itself succeeded, and ``.datasets`` has the raw answers.
    """

    def __init__(self, run: ToolResult, datasets: list[Dataset]) -> None:
        super().__init__(_as_dict(ds) for ds in datasets)
        self.run = run
        self.datasets = datasets

    returncode = property(lambda self: self.run.returncode)
    stdout = property(lambda self: self.run.stdout)
    stderr = property(lambda self: self.run.stderr)
    ok = property(lambda self: self.run.ok)

    def check(self) -> Self:
        self.run.check()
        return self


def _as_dict(ds: Dataset) -> dict[str, str]:
    out: dict[str, str] = {}
    for elem in ds:
        if elem.VR == "SQ" or isinstance(elem.value, bytes):
            continue
        value = elem.value
        text = "\\".join(map(str, value)) if elem.VM > 1 else ("" if value is None else str(value))
        out[elem.keyword or str(elem.tag)] = text
    return out


def _run(args: list[str], *, timeout: float, cwd: Path | None = None) -> ToolResult:
    start = time.monotonic()
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=tool_env(),
            cwd=cwd,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # the child is killed by run()
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        return ToolResult(args, -9, out, err, time.monotonic() - start, timed_out=True)
    return ToolResult(args, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def _common(called: str, calling: str, timeout: float) -> list[str]:
    """AE titles and DCMTK's own timeouts (connect, ACSE, DIMSE), so nothing hangs."""
    t = str(max(1, int(timeout)))
    return ["-aet", calling, "-aec", called, "-to", t, "-ta", t, "-td", t]


def _keys(level: str | None, keys: Keys) -> list[str]:
    args = ["-k", f"QueryRetrieveLevel={level}"] if level else []
    for key, value in keys.items():
        args += ["-k", key if value is None or value == "" else f"{key}={value}"]
    return args


def _counts(log: str) -> tuple[int | None, int | None, int | None]:
    """Completed/failed/warning sub-operations of the last (final) response in the log."""

    def last(pattern: str) -> int | None:
        found = re.findall(pattern + r"\s*:\s*(\d+|none)", log)
        return None if not found else (0 if found[-1] == "none" else int(found[-1]))

    return (
        last(r"(?:Number of )?Completed Suboperations"),
        last(r"(?:Number of )?Failed Suboperations"),
        last(r"(?:Number of )?Warning Suboperations"),
    )


def echoscu(host: str, port: int, called: str, calling: str = "ECHOSCU", *, timeout: float = 30.0) -> ToolResult:
    """One C-ECHO; ``ok`` means the peer answered Success."""
    return _run([_exe("echoscu"), "-v", *_common(called, calling, timeout), host, str(port)], timeout=timeout + 5)


def findscu(
    host: str,
    port: int,
    called: str,
    calling: str = "FINDSCU",
    level: str = "STUDY",
    keys: Keys | None = None,
    model: Model = "study",
    *,
    timeout: float = 30.0,
    extra_args: Sequence[str] = (),
) -> FindResult:
    """A C-FIND; the answers come back through ``findscu -X`` files read with pydicom.

    ``keys``: keyword (or ``gggg,eeee``) -> value; ``None``/``""`` asks for a return key.
    """
    with tempfile.TemporaryDirectory(prefix="findscu-") as tmp:
        args = [_exe("findscu"), "-v", _MODEL_FLAG[model], *_common(called, calling, timeout), "-X", "-od", tmp]
        args += [*extra_args, host, str(port), *_keys(level if model != "worklist" else None, keys or {})]
        run = _run(args, timeout=timeout + 5)
        datasets: list[Dataset] = [pydicom.dcmread(p) for p in sorted(Path(tmp).glob("rsp*.dcm"))]
    return FindResult(run, datasets)


def movescu(
    host: str,
    port: int,
    called: str,
    calling: str = "MOVESCU",
    dest_ae: str = "STORESCP",
    keys: Keys | None = None,
    level: str = "STUDY",
    model: Model = "study",
    *,
    port_for_incoming: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> MoveResult:
    """A C-MOVE to ``dest_ae``; with ``port_for_incoming`` movescu also receives (into ``out_dir``).

    Runs with ``-d`` because only the debug log shows the final sub-operation
    counts (``completed``/``failed``/``warning``).
    """
    args = [_exe("movescu"), "-d", "-dhl", _MODEL_FLAG[model], *_common(called, calling, timeout), "-aem", dest_ae]
    before: set[Path] = set()
    if port_for_incoming is not None:
        if out_dir is None:
            raise ValueError("out_dir is required with port_for_incoming")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        before = set(Path(out_dir).iterdir())
        args += ["+P", str(port_for_incoming), "+xa", "-od", os.fspath(out_dir)]
    args += [*extra_args, host, str(port), *_keys(level, keys or {})]
    run = _run(args, timeout=timeout + 5)
    completed, failed, warning = _counts(run.log)
    received = sorted(set(Path(out_dir).iterdir()) - before) if port_for_incoming is not None and out_dir else []
    return MoveResult(**vars(run), completed=completed, failed=failed, warning=warning, received=received)


def getscu(
    host: str,
    port: int,
    called: str,
    calling: str = "GETSCU",
    out_dir: str | os.PathLike[str] = ".",
    keys: Keys | None = None,
    level: str = "STUDY",
    model: Model = "study",
    *,
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> GetResult:
    """A C-GET; the instances arrive on the same association and land in ``out_dir``.

    getscu proposes uncompressed transfer syntaxes for its storage contexts
    (use ``extra_args`` such as ``+xv`` to prefer a compressed one), so the
    SCP may transcode compressed instances; compare fingerprints accordingly.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    args = [_exe("getscu"), "-v", _MODEL_FLAG[model], *_common(called, calling, timeout), "-od", os.fspath(out)]
    args += [*extra_args, host, str(port), *_keys(level, keys or {})]
    run = _run(args, timeout=timeout + 5)
    completed, failed, warning = _counts(run.log)
    received = sorted(set(out.iterdir()) - before)
    return GetResult(**vars(run), completed=completed, failed=failed, warning=warning, received=received)


def _profile(files: Sequence[Path], directory: Path) -> Path | None:
    """A storescu association profile proposing exactly what ``files`` need (see module doc)."""
    pairs: dict[tuple[str, tuple[str, ...]], None] = {}
    for path in files:
        try:
            meta = read_file_meta_info(path)
            sop_class, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        except Exception:  # no file meta: let storescu decide on its own
            return None
        syntaxes = (ts, *(u for u in _UNCOMPRESSED if u != ts)) if ts in _UNCOMPRESSED else (ts,)
        pairs[(sop_class, syntaxes)] = None
    if not pairs or len(pairs) > 128:
        return None
    groups = sorted({syntaxes for _, syntaxes in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, syntaxes in enumerate(groups, 1):
        lines.append(f"[TS{i}]")
        lines += [f"TransferSyntax{j} = {uid}" for j, uid in enumerate(syntaxes, 1)]
    lines += ["", "[[PresentationContexts]]", "[Contexts]"]
    for i, (sop_class, syntaxes) in enumerate(pairs, 1):
        lines.append(f"PresentationContext{i} = {sop_class}\\TS{groups.index(syntaxes) + 1}")
    lines += ["", "[[Profiles]]", "[Relay]", "PresentationContexts = Contexts", ""]
    path = directory / "storescu.cfg"
    path.write_text("\n".join(lines))
    return path


def storescu(
    host: str,
    port: int,
    called: str,
    calling: str = "STORESCU",
    files: Iterable[str | os.PathLike[str]] = (),
    *,
    timeout: float = 60.0,
    extra_args: Sequence[str] = (),
) -> StoreResult:
    """C-STORE ``files`` (directories are walked) over one association, in their own syntaxes."""
    paths: list[Path] = []
    for item in files:
        p = Path(item)
        paths += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        profile = _profile(paths, Path(tmp))
        args = [_exe("storescu"), "-v", *_common(called, calling, timeout)]
        if profile is not None:
            args += ["-xf", os.fspath(profile), "Relay"]
        args += [*extra_args, host, str(port), *map(os.fspath, paths)]
        run = _run(args, timeout=timeout + 5)
    succeeded = len(re.findall(r"Received Store Response \(Success", run.log))
    return StoreResult(**vars(run), sent=len(paths), succeeded=succeeded)


class StorescpProcess:
    """A DCMTK ``storescp`` receiving into ``out_dir``: the classic C-MOVE destination.

    Accepts every SOP class (``-pm``) and transfer syntax (``+xa``), does no
    reverse DNS lookups (``-dhl``), names files ``<MODALITY>.<SOPInstanceUID>.dcm``.
    storescp serves one association at a time (no ``--fork``), as simple
    modalities do. It binds every interface: DCMTK 3.6.7 has no bind-address option.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        aet: str = "STORESCP",
        port: int = 0,
        *,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.out_dir = Path(out_dir).resolve()
        self.aet = aet
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path) if log_path else self.out_dir.with_name(self.out_dir.name + ".storescp.log")
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def args(self) -> list[str]:
        return [
            _exe("storescp"),
            "-v",
            "--disable-host-lookup",
            "-aet",
            self.aet,
            "-od",
            os.fspath(self.out_dir),
            "-pm",
            "+xa",
            "-fe",
            ".dcm",
            *self.extra_args,
            str(self.port),
        ]

    def start(self) -> StorescpProcess:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.args, stdout=subprocess.DEVNULL, stderr=log, env=tool_env(), stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if wait_for_port(self.port, timeout=0.2):
                return self
        self.stop()
        raise RuntimeError(f"storescp did not start on port {self.port}; log {self.log_path}:\n{self.log_text()}")

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def __enter__(self) -> StorescpProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def associations(self) -> int:
        """How many associations storescp has received so far."""
        return self.log_text().count("Association Received")

    def completed_files(self) -> list[Path]:
        """Files storescp has finished writing (a later log line proves the write ended)."""
        lines = self.log_text().splitlines()
        done = []
        for line in lines[:-1]:
            m = re.search(r"storing DICOM file: (.+)$", line)
            if m:
                done.append(Path(m.group(1)))
        last = lines[-1] if lines else ""
        if "storing DICOM file" in last and self._proc is not None and self._proc.poll() is not None:
            done.append(Path(last.split("storing DICOM file: ", 1)[1]))
        return sorted({p if p.is_absolute() else self.out_dir / p for p in done if p.exists()})

    def files(self) -> list[Path]:
        """Every ``.dcm`` file in ``out_dir`` (complete or not)."""
        return sorted(self.out_dir.glob("*.dcm"))

    def wait_for_files(self, n: int, timeout: float = 30.0) -> list[Path]:
        """Wait until at least ``n`` files are complete; raise TimeoutError with the log if not."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.completed_files()
            if len(done) >= n:
                return done
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"storescp {self.aet}: {len(done)}/{n} files after {timeout}s; log {self.log_path}:\n"
                    + self.log_text()[-4000:]
                )
            time.sleep(0.05)

    def fingerprints(self) -> dict[str, str]:
        return _fingerprints(self.completed_files())

    def clear(self) -> None:
        """Delete received files (the log keeps its history; completed_files skips missing ones)."""
        for path in self.files():
            path.unlink(missing_ok=True)

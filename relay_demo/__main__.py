"""`make demo`: two hospitals, one bridge, every DIMSE service across sites, on this machine.

Hospital A has a workstation (WS_A) and an archive (PACS_A); hospital B has an
archive (PACS_B). Each hospital runs a router; the bridge runs in between;
everything listens on 127.0.0.1 and talks TLS with a fresh development CA.
The workstation then uses PACS_B through its router exactly as if it were
local: C-ECHO, C-FIND, C-MOVE (PACS_B sends the images back to WS_A through the
relay), C-GET and C-STORE. Every image that arrives is checked byte for byte
(SOP Instance UID and a SHA-256 of its Pixel Data) against the original.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from rich.console import Console
from rich.table import Table

from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprint, fingerprints, generate_ct_series, sample_files, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared

console = Console(width=None if sys.stdout.isatty() else 120)


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    seconds: float
    instances: int = 0
    nbytes: int = 0


def _client(*contexts: str) -> AE:
    ae = AE(ae_title="WS_A")
    for c in contexts:
        ae.add_requested_context(c)
    return ae


def run_demo(work: Path) -> list[Step]:
    steps: list[Step] = []
    data = work / "data"
    b_files = write_series(
        generate_ct_series(12, rows=256, cols=256, patient_id="HOSP-B-0001", patient_name="Relay^Demo"), data / "b-ct"
    )
    b_files += [p for p in sample_files() if p.name in ("CT_small.dcm", "MR_small.dcm")]
    new_files = write_series(
        generate_ct_series(6, rows=256, cols=256, patient_id="HOSP-A-0042", patient_name="Relay^Store", seed=7),
        data / "a-new",
    )

    pacs_b = DemoArchive("PACS_B", 0, work / "pacs-b").start()
    ws_a = DemoArchive("WS_A", 0, work / "ws-a").start()
    pacs_a = DemoArchive("PACS_A", 0, work / "pacs-a").start()
    pacs_b.load(b_files)
    net = LocalRelayNetwork(work / "relay").start()
    try:
        console.print(f"[bold]bridge[/] on 127.0.0.1:{net.bridge_port} (TLS, development CA)")
        site_b = net.add_site(
            "hospital-b",
            shared=[Shared("PACS_B", "127.0.0.1", pacs_b.port, ["hospital-a"])],
            remote=[Remote("WS_A", "hospital-a")],
        )
        site_a = net.add_site(
            "hospital-a",
            shared=[
                Shared("WS_A", "127.0.0.1", ws_a.port, ["hospital-b"]),
                Shared("PACS_A", "127.0.0.1", pacs_a.port, ["hospital-b"]),
            ],
            remote=[Remote("PACS_B", "hospital-b")],
        )
        assert site_a.port and site_b.port
        # PACS_B reaches the move destination WS_A through its own router, like any local modality.
        pacs_b.set_known_node("WS_A", "127.0.0.1", site_b.port)
        net.wait_connected()
        console.print(
            f"[bold]router hospital-a[/] DICOM port {site_a.port}; [bold]router hospital-b[/] DICOM port {site_b.port}"
        )
        console.print(f"WS_A at hospital A now calls PACS_B at 127.0.0.1:{site_a.port}\n")
        port = site_a.port
        study_uid = str(fingerprint_study(b_files[0]))
        # The generated series is one study; the pydicom samples belong to others.
        originals = {u: h for u, h in fingerprints(b_files).items() if u in _study_sops(b_files, study_uid)}

        steps.append(_echo(port))
        steps.append(_find(port, study_uid))
        steps.append(_move(port, study_uid, ws_a, originals))
        steps.append(_get(port, study_uid, originals))
        steps.append(_store(port, new_files, pacs_b))
        return steps
    finally:
        net.stop()
        for archive in (pacs_b, ws_a, pacs_a):
            archive.stop()


def _study_sops(files: list[Path], study_uid: str) -> set[str]:
    import pydicom

    headers = (pydicom.dcmread(f, stop_before_pixels=True) for f in files)
    return {str(h.SOPInstanceUID) for h in headers if str(h.StudyInstanceUID) == study_uid}


def fingerprint_study(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _timed(name: str, fn) -> Step:
    start = time.perf_counter()
    try:
        ok, detail, count, nbytes = fn()
    except Exception as exc:  # the demo reports every failure and carries on
        ok, detail, count, nbytes = False, f"{type(exc).__name__}: {exc}", 0, 0
    return Step(name, ok, detail, time.perf_counter() - start, count, nbytes)


def _associate(ae: AE, port: int, **kwargs):
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_B", **kwargs)
    if not assoc.is_established:
        raise RuntimeError("association to PACS_B was not accepted")
    return assoc


def _echo(port: int) -> Step:
    def go():
        assoc = _associate(_client(Verification), port)
        status = assoc.send_c_echo()
        assoc.release()
        return status.Status == 0, f"status 0x{status.Status:04X}", 0, 0

    return _timed("C-ECHO", go)


def _find(port: int, study_uid: str) -> Step:
    def go():
        assoc = _associate(
            _client(StudyRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelFind), port
        )
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientName = "Relay*"
        query.StudyInstanceUID = ""
        query.PatientID = ""
        found = [
            ds
            for status, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
            if status and status.Status in (0xFF00, 0xFF01) and ds is not None
        ]
        assoc.release()
        uids = {str(ds.StudyInstanceUID) for ds in found}
        return study_uid in uids, f"{len(found)} matching studies (patient 'Relay*')", len(found), 0

    return _timed("C-FIND", go)


def _move(port: int, study_uid: str, ws_a: DemoArchive, originals: dict[str, str]) -> Step:
    def go():
        ws_a.clear()
        assoc = _associate(_client(StudyRootQueryRetrieveInformationModelMove), port)
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        final = None
        for status, _ in assoc.send_c_move(query, "WS_A", StudyRootQueryRetrieveInformationModelMove):
            final = status
        assoc.release()
        received = ws_a.fingerprints()
        identical = received == originals
        nbytes = sum(i.path.stat().st_size for i in ws_a.instances.values())
        ok = bool(final) and final.Status == 0 and identical
        return (
            ok,
            f"PACS_B sent {len(received)} images to WS_A through both routers; byte-identical: {identical}",
            len(received),
            nbytes,
        )

    return _timed("C-MOVE", go)


def _get(port: int, study_uid: str, originals: dict[str, str]) -> Step:
    def go():
        got: dict[str, str] = {}
        nbytes = 0

        def on_store(event: evt.Event) -> int:
            nonlocal nbytes
            ds = event.dataset
            ds.file_meta = event.file_meta
            uid, digest = fingerprint(ds)
            got[uid] = digest
            nbytes += len(event.request.DataSet.getvalue())
            return 0x0000

        ae = _client(StudyRootQueryRetrieveInformationModelGet)
        for sop in (CTImageStorage, MRImageStorage):
            ae.add_requested_context(sop)
        roles = [build_role(CTImageStorage, scp_role=True), build_role(MRImageStorage, scp_role=True)]
        assoc = _associate(ae, port, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        final = None
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            final = status
        assoc.release()
        identical = got == originals
        ok = bool(final) and final.Status == 0 and identical
        return ok, f"{len(got)} images retrieved on the same association; byte-identical: {identical}", len(got), nbytes

    return _timed("C-GET", go)


def _store(port: int, files: list[Path], pacs_b: DemoArchive) -> Step:
    def go():
        import pydicom

        ae = _client(CTImageStorage)
        assoc = _associate(ae, port)
        statuses = [assoc.send_c_store(pydicom.dcmread(f)) for f in files]
        assoc.release()
        sent = fingerprints(files)
        stored = {u: h for u, h in pacs_b.fingerprints().items() if u in sent}
        ok = all(s and s.Status == 0 for s in statuses) and stored == sent
        nbytes = sum(f.stat().st_size for f in files)
        return (
            ok,
            f"{len(stored)} of {len(files)} new images stored in PACS_B; byte-identical: {stored == sent}",
            len(files),
            nbytes,
        )

    return _timed("C-STORE", go)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay_demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep configs and logs in this directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    work = args.keep or Path(tempfile.mkdtemp(prefix="relay-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]dicom-relay demo: hospital A <-> bridge <-> hospital B")
    try:
        steps = run_demo(work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    table = Table(title="What crossed the relay (WS_A at hospital A -> PACS_B at hospital B)")
    for col in ("service", "result", "images", "MB", "seconds", "detail"):
        table.add_column(col, justify="right" if col in ("images", "MB", "seconds") else "left")
    for s in steps:
        table.add_row(
            s.name,
            "[green]OK[/]" if s.ok else "[red]FAILED[/]",
            str(s.instances),
            f"{s.nbytes / 1e6:.2f}",
            f"{s.seconds:.2f}",
            s.detail,
        )
    console.print(table)
    if args.keep:
        console.print(f"configs and logs kept in {work}")
    failed = [s.name for s in steps if not s.ok]
    if failed:
        console.print(f"[red bold]demo failed:[/] {', '.join(failed)}")
        return 1
    console.print("[green bold]all services worked across sites, every image byte-identical[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Audit export with real parts: rsyslog (Debian, imtcp + gtls) as the RFC 5425 collector, DCMTK as peers.

- Every message rsyslog receives is an RFC 5424 message (protocol version 1, app
  name and MSGID parsed by rsyslog) carrying a DICOM audit message that validates
  against the PS3.15 A.5.1 schema; a message containing line feeds arrives as one
  record, which only octet-counting framing (RFC 5425 3.3) gives.
- rsyslog stopped for 30 s while events happen: nothing lost, in order, after it
  restarts. A spool limit hit during an outage: the overflow is counted.
- A study stored by DCMTK storescu to storescp, recorded by a TCP proxy on
  127.0.0.1, gives the study tap one study with its Study Instance UID, the
  patient's ID and the instance count, and a valid Instances Transferred message.
  The same through real routers: a C-MOVE from Orthanc to a DCMTK workstation across two
  sites records the study at both routers and exports one Instances Transferred message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from relay_common import dicom_audit
from relay_common.audit import AuditLog, read_events
from relay_common.config import AuditSection, parse_config
from relay_common.syslog_tls import wait_until
from relay_demo.datasets import generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.studytap import Side, StudyTap
from tests.integration.conftest import OrthancPool, _require, require_dcmtk
from tests.support.dcmtk import StorescpProcess, movescu, storescu
from tests.support.ports import free_port, wait_for_port

try:  # the dev PKI helpers may move to relay_common during the day
    from relay_common.pki import make_dev_pki  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from relay_bridge.pki import make_dev_pki

pytestmark = pytest.mark.integration
SCHEMA = etree.RelaxNG(etree.parse(str(Path(__file__).parents[1] / "fixtures" / "audit" / "dicom-audit-message.rng")))
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
SEP = "\x1f"  # field separator in the test's rsyslog template


class Rsyslog:
    """rsyslogd in the foreground with its own config: a TLS (gtls) listener on 127.0.0.1, one line per message."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.pki = directory / "pki"
        make_dev_pki(self.pki, hostnames=["localhost"], ips=["127.0.0.1"])
        self.port = free_port()
        self.out = directory / "received.log"
        self.proc: subprocess.Popen[bytes] | None = None
        (directory / "rsyslog.conf").write_text(
            f'global(workDirectory="{directory}" maxMessageSize="256k"\n'
            f'       DefaultNetstreamDriverCAFile="{self.pki / "ca.pem"}"\n'
            f'       DefaultNetstreamDriverCertFile="{self.pki / "server.pem"}"\n'
            f'       DefaultNetstreamDriverKeyFile="{self.pki / "server.key"}")\n'
            'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")\n'
            f'input(type="imtcp" port="{self.port}" address="127.0.0.1")\n'
            'template(name="fields" type="string"\n'
            f'         string="%protocol-version%{SEP}%app-name%{SEP}%msgid%{SEP}%msg%\\n")\n'
            f'*.* action(type="omfile" file="{self.out}" template="fields")\n'
        )

    def start(self) -> Rsyslog:
        log = (self.dir / "rsyslogd.log").open("ab")
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.dir / "rsyslog.conf"), "-i", str(self.dir / "rsyslogd.pid")],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        if not wait_for_port(self.port, timeout=15):
            self.stop()
            raise RuntimeError(f"rsyslogd did not listen: {(self.dir / 'rsyslogd.log').read_text()}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # rsyslog flushes its output file on SIGTERM
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def records(self) -> list[tuple[str, str, str, bytes]]:
        """(protocol version, app name, MSGID, MSG) per received message."""
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_bytes().decode("utf-8").splitlines():
            version, app, msgid, msg = line.split(SEP, 3)
            out.append((version, app, msgid, msg.removeprefix("\ufeff").encode()))
        return out

    def section(self, spool: Path, **extra: object) -> AuditSection:
        document = {
            "file": str(spool.parent / "audit.jsonl"),
            "collector": f"tls://127.0.0.1:{self.port}",
            "ca_file": str(self.pki / "ca.pem"),
            "spool_dir": str(spool),
            **extra,
        }
        return parse_config(document, AuditSection)


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    _require([] if os.path.exists(RSYSLOGD) else ["rsyslog rsyslog-gnutls"])
    (tmp_path / "rsyslog").mkdir()
    server = Rsyslog(tmp_path / "rsyslog")
    server.start()
    yield server
    server.stop()


def xml(record: tuple[str, str, str, bytes]) -> etree._Element:
    doc = etree.fromstring(record[3])
    assert SCHEMA.validate(doc), (SCHEMA.error_log, record[3][:300])
    return doc


def test_events_arrive_as_valid_octet_counted_rfc5424(rsyslog: Rsyslog, tmp_path: Path) -> None:
    audit = AuditLog.from_section(rsyslog.section(tmp_path / "spool"), app="relay-bridge", source_id="bridge-1")
    audit.event("start", "success")
    audit.event("sign_on", "failure", router="hospital-a", source="127.0.0.1:4000", detail="wrong password\nline 2")
    audit.event("access_refused", "alert", router="hospital-a", to_site="hospital-b")
    audit.event("association", "success", site="b")  # no studies: JSON only
    assert wait_until(lambda: len(rsyslog.records()) == 3, 15), rsyslog.records()
    records = rsyslog.records()
    assert [(v, a, m) for v, a, m, _ in records] == [
        ("1", "relay-bridge", "start"),
        ("1", "relay-bridge", "sign_on"),
        ("1", "relay-bridge", "access_refused"),
    ]
    events = [xml(r).find("EventIdentification/EventID").get("csd-code") for r in records]
    assert events == ["110100", "110114", "110113"]  # Application Activity, User Authentication, Security Alert
    # The line feed inside the message did not end it: octet counting, not LF framing. rsyslog shows it as #012.
    description = xml(records[1]).find("EventIdentification/EventOutcomeDescription").text
    assert description == "wrong password#012line 2"
    audit.close()


def test_a_30_second_outage_loses_nothing(rsyslog: Rsyslog, tmp_path: Path) -> None:
    audit = AuditLog.from_section(rsyslog.section(tmp_path / "spool"), app="relay-router", source_id="hospital-a")
    audit.event("sign_on", "success", site="hospital-a", detail="n=0")
    assert wait_until(lambda: len(rsyslog.records()) == 1, 15)
    rsyslog.stop()
    outage_end = time.monotonic() + 30
    n = 1
    while time.monotonic() < outage_end:  # events keep happening while the collector is down
        audit.event("sign_on", "success", site="hospital-a", detail=f"n={n}")
        n += 1
        time.sleep(1)
    assert audit.collector is not None and audit.collector.spooled >= n - 2, audit.collector.spooled
    rsyslog.start()
    assert wait_until(lambda: len(rsyslog.records()) == n, 30), (len(rsyslog.records()), n, audit.collector.last_error)
    details = [xml(r).find("EventIdentification/EventOutcomeDescription").text for r in rsyslog.records()]
    assert details == [f"n={i}" for i in range(n)]  # all of them, in order
    assert audit.collector.overflowed == 0 and audit.collector.spooled == 0
    audit.close()


def test_overflow_is_counted_when_the_spool_limit_is_hit(rsyslog: Rsyslog, tmp_path: Path) -> None:
    audit = AuditLog.from_section(
        rsyslog.section(tmp_path / "spool", queue_limit_bytes=6000), app="relay-router", source_id="hospital-a"
    )
    rsyslog.stop()
    for i in range(20):
        audit.event("identity_mismatch", "alert", site="hospital-b", detail=f"n={i}")
    assert audit.collector is not None
    assert wait_until(lambda: audit.collector.spooled + audit.collector.overflowed == 20, 10)
    kept = audit.collector.spooled
    assert 0 < kept < 20 and audit.collector.overflowed == 20 - kept
    rsyslog.start()
    assert wait_until(lambda: len(rsyslog.records()) == kept, 30)
    details = [xml(r).find("EventIdentification/EventOutcomeDescription").text for r in rsyslog.records()]
    assert details == [f"n={i}" for i in range(kept)]  # the oldest are kept, new ones dropped
    audit.close()


class RecordingProxy:
    """A TCP proxy on 127.0.0.1 that records each direction's bytes of one connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = {Side.REQUESTOR: bytearray(), Side.ACCEPTOR: bytearray()}
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.target_port))
        pumps = [
            threading.Thread(target=self._pump, args=(client, server, Side.REQUESTOR), daemon=True),
            threading.Thread(target=self._pump, args=(server, client, Side.ACCEPTOR), daemon=True),
        ]
        for p in pumps:
            p.start()
        for p in pumps:
            p.join()
        client.close()
        server.close()
        self.done.set()

    def _pump(self, src: socket.socket, dst: socket.socket, side: Side) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                self.sent[side] += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


def test_a_dcmtk_store_gives_the_study_and_patient(tmp_path: Path) -> None:
    require_dcmtk("storescu", "storescp")
    study_uid = "1.2.826.0.1.3680043.8.498.4242"
    files = write_series(
        generate_ct_series(5, rows=64, cols=64, patient_id="PAT-AUDIT-1", study_uid=study_uid), tmp_path / "in"
    )
    storescp = StorescpProcess(tmp_path / "out", aet="ARCHIVE").start()
    proxy = RecordingProxy(storescp.port)
    try:
        result = storescu("127.0.0.1", proxy.port, "ARCHIVE", "MODALITY", files)
        assert result.succeeded == 5, result.log
        assert proxy.done.wait(10)
    finally:
        proxy.close()
        storescp.stop()
    tap = StudyTap()
    # As the relay would see it: the bytes of each direction in arbitrary reads.
    for side, data in proxy.sent.items():
        for start in range(0, len(data), 7919):
            tap.feed(side, data[start : start + 7919])
    (study,) = tap.summary()
    assert study["study_uid"] == study_uid and study["patient_id"] == "PAT-AUDIT-1"
    assert study["instances"] == 5 and study["sop_classes"] == {"1.2.840.10008.5.1.4.1.1.2": 5}
    assert study["sent_by"] == "calling" and tap.broken == [] and tap.unreadable == 0
    (message,) = tap.messages(
        source_id="hospital-a",
        calling=dicom_audit.Participant("MODALITY", True, ae_titles=("MODALITY",)),
        called=dicom_audit.Participant("ARCHIVE", ae_titles=("ARCHIVE",)),
    )
    doc = etree.fromstring(dicom_audit.to_bytes(message))
    assert SCHEMA.validate(doc), SCHEMA.error_log
    ids = [p.get("ParticipantObjectID") for p in doc.findall("ParticipantObjectIdentification")]
    assert ids == [study_uid, "PAT-AUDIT-1"]


def test_a_c_move_through_real_routers_records_the_study(
    orthanc_factory: OrthancPool, tmp_path: Path, rsyslog: Rsyslog
) -> None:
    """C-MOVE of a study from hospital B's Orthanc to hospital A's workstation, through both routers.

    The archive's sub-association (Orthanc B -> router B -> bridge -> router A -> storescp) carries
    the study: each router writes one association event naming it with the patient's ID, and router
    B exports one DICOM Instances Transferred message to rsyslog that validates against the schema.
    """
    require_dcmtk("movescu", "storescp")
    study_uid = "1.2.826.0.1.3680043.8.498.5151"
    # 128 KiB images, above router B's spill threshold: router A receives them from the blob store,
    # re-emitted as P-DATA, and its tap must see them all the same.
    series = write_series(
        generate_ct_series(4, rows=256, cols=256, patient_id="PAT-MOVE-7", study_uid=study_uid), tmp_path / "ct"
    )
    workstation = StorescpProcess(tmp_path / "ws-a", "WS_A").start()
    orthanc_b = orthanc_factory("ORTHANC_B")
    orthanc_b.upload_many(series)
    net = LocalRelayNetwork(tmp_path / "relay").start()
    try:
        site_b = net.add_site(
            "hospital-b",
            shared=[Shared("ORTHANC_B", "127.0.0.1", orthanc_b.dicom_port, ["hospital-a"])],
            remote=[Remote("WS_A", "hospital-a")],
            start=False,
            spill_threshold_bytes=65536,
        )
        collector = (
            f'\ncollector = "tls://127.0.0.1:{rsyslog.port}"\nca_file = "{rsyslog.pki / "ca.pem"}"\n'
            f'spool_dir = "{tmp_path / "spool-b"}"\n'
        )
        config_b = net.router_config_path("hospital-b")
        config_b.write_text(config_b.read_text().replace("[audit]\n", "[audit]" + collector, 1))
        site_b.port = net.start_router("hospital-b")
        site_a = net.add_site(
            "hospital-a",
            shared=[Shared("WS_A", "127.0.0.1", workstation.port, ["hospital-b"])],
            remote=[Remote("PACS_B", "hospital-b", "ORTHANC_B")],
        )
        orthanc_b.set_modalities({"WS_A": ("WS_A", "127.0.0.1", site_b.port)})
        net.wait_connected()
        result = movescu("127.0.0.1", site_a.port, "PACS_B", "WS_A", "WS_A", {"StudyInstanceUID": study_uid})
        assert result.check().completed == 4, result.log
        workstation.wait_for_files(4)

        def studies(site: str) -> list[dict[str, object]]:
            events = read_events(net.workdir / f"audit-{site}.jsonl")
            return [s for e in events if e["event"] == "association" for s in e.get("studies", [])]

        wait_until(lambda: studies("hospital-b") and studies("hospital-a"), 20)
        assert net.log("hospital-a").count("parts from blob") == 4, "the data sets did not come through the spill"
        for site in ("hospital-b", "hospital-a"):
            (study,) = studies(site)  # the C-FIND/C-MOVE association carries no C-STORE: one study in all
            assert study["study_uid"] == study_uid and study["patient_id"] == "PAT-MOVE-7", study
            assert study["instances"] == 4 and study["sent_by"] == "calling"
        assert wait_until(lambda: any(r[2] == "association" for r in rsyslog.records()), 20), rsyslog.records()
        transfers = [xml(r) for r in rsyslog.records() if r[2] == "association"]
        assert len(transfers) == 1
        doc = transfers[0]
        assert doc.find("EventIdentification/EventID").get("csd-code") == "110104"
        ids = [p.get("ParticipantObjectID") for p in doc.findall("ParticipantObjectIdentification")]
        assert ids == [study_uid, "PAT-MOVE-7"]
        titles = [p.get("AlternativeUserID") for p in doc.findall("ActiveParticipant")[:2]]
        assert titles == ["AETITLES=ORTHANC_B", "AETITLES=WS_A"]
    finally:
        net.stop()
        workstation.stop()

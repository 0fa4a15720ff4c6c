"""Hostile bytes at a live router's DICOM port, beyond test_relay_refusals.py's malformed PDUs.

One network for the whole module: site-a's router (ARTIM 1.5 s, DIMSE timeout 2 s, so that stalled
peers are cut quickly) relays to a DemoArchive at site-b. A bystander association, opened before the
first hostile byte, must keep working through all of it, and the router's memory must stay flat.

Each hostile connection must END: the router answers (A-ABORT, A-ASSOCIATE-RJ/AC for valid requests)
and closes, or closes at once, or closes when its ARTIM or DIMSE timer fires; the time to the close is
measured. The truncation drills cut a valid C-ECHO exchange at every byte offset, once followed by a
close and once by silence.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from relay_demo.archive import DemoArchive
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from relay_router.ul import PduType, a_release_rq, parse_abort
from tests.integration.test_reliability import HOST, quiet_site, read_pdu, rss_mb
from tests.unit.ul import builders as B

pytestmark = [
    pytest.mark.integration,
    # The archive double is pynetdicom in this process. A P-DATA-TF PDU that a device starts and never
    # finishes is relayed as far as it came (P-DATA is streamed), then the router aborts and closes; the
    # pynetdicom reactor thread on the archive side dies on the partial command set (its own bug, as the
    # router documents in relay_router/ul/connection.py). That is noise for these tests, not a failure.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
]
ARTIM_S = 1.5
DIMSE_S = 2.0
# The DIMSE watchdog looks every min(5, DIMSE_S / 2) s, so a stalled peer is cut within DIMSE_S + 1 s.
CUT_WITHIN_S = DIMSE_S + 1 + 2  # + 2 s of slack for a busy 2-core machine


@dataclass
class Hostile:
    net: LocalRelayNetwork
    archive: DemoArchive
    port: int
    bystander: Association
    rss_start: float

    @property
    def router_pid(self) -> int:
        process = self.net.sites["site-a"].process
        assert process is not None
        return process.pid

    def assert_healthy(self) -> None:
        process = self.net.sites["site-a"].process
        assert process is not None and process.poll() is None, "router A died"
        status = self.bystander.send_c_echo()
        assert status and status.Status == 0, "the bystander association stopped working"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    archive = DemoArchive("ARCHIVE_B", 0, tmp_path_factory.mktemp("hostile-archive"))
    archive._ae.maximum_associations = 200  # the truncation drills hold ~90 associations at once
    archive.start()
    net = LocalRelayNetwork(tmp_path_factory.mktemp("hostile")).start()
    try:
        # The drills come from one address, hundreds at a time, and hold ~90 associations into site-b:
        # the caps on unfinished requests and on inbound associations per site are raised so that
        # they test how each cut ends, not the caps (test_admission.py tests those).
        quiet_site(
            net,
            "site-b",
            shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])],
            max_inbound_associations=200,
            max_inbound_per_site=200,
        )
        port = quiet_site(
            net,
            "site-a",
            remote=[Remote("ARCHIVE_B", "site-b")],
            artim_timeout_s=ARTIM_S,
            dimse_timeout_s=DIMSE_S,
            max_pending_requests=1000,
            max_pending_per_address=1000,
        ).port
        assert port
        net.wait_connected()
        ae = AE(ae_title="BYSTANDER")
        ae.add_requested_context(Verification)
        bystander = ae.associate(HOST, port, ae_title="ARCHIVE_B")
        assert bystander.is_established
        hostile = Hostile(net, archive, port, bystander, 0.0)
        hostile.assert_healthy()
        hostile.rss_start = rss_mb(hostile.router_pid)
        yield hostile
        bystander.release()
    finally:
        net.stop()
        archive.stop()


# ----------------------------------------------------------------------------- observing one connection


@dataclass
class Ending:
    """How the router ended one hostile connection."""

    pdus: list[bytes]  # everything it sent after our last byte, in order
    closed: bool  # it closed the connection (EOF) before our deadline
    seconds: float  # from our last byte (or half-close) to its close

    @property
    def kind(self) -> str:
        if not self.pdus:
            return "closed" if self.closed else "nothing"
        return {0x02: "AC", 0x03: "RJ", 0x04: "P-DATA", 0x06: "RELEASE-RP", 0x07: "ABORT"}.get(
            self.pdus[0][0], f"PDU 0x{self.pdus[0][0]:02x}"
        )


def observe(
    sock: socket.socket, deadline_s: float, *, stop_after_answer: bool = False, since: float | None = None
) -> Ending:
    """Read PDUs until the router closes the connection (or `deadline_s`); times count from `since` (or now)."""
    started = time.monotonic() if since is None else since
    pdus: list[bytes] = []
    while True:
        left = deadline_s - (time.monotonic() - started)
        if left <= 0:
            return Ending(pdus, False, time.monotonic() - started)
        try:
            pdu = read_pdu(sock, timeout=left)
        except TimeoutError:
            return Ending(pdus, False, time.monotonic() - started)
        except ConnectionResetError:
            return Ending(pdus, True, time.monotonic() - started)
        if len(pdu) < 6 or len(pdu) < 6 + int.from_bytes(pdu[2:6], "big"):
            return Ending(pdus + ([pdu] if pdu else []), True, time.monotonic() - started)
        pdus.append(pdu)
        if stop_after_answer and pdu[0] in (PduType.ASSOCIATE_AC, PduType.ASSOCIATE_RJ):
            return Ending(pdus, False, time.monotonic() - started)


RQ = B.associate_rq(called="ARCHIVE_B", calling="WS_HOSTILE")


def establish(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(RQ)
    answer = read_pdu(sock)
    assert answer[:1] == bytes([PduType.ASSOCIATE_AC]), f"the archive should accept: {answer[:16]!r}"
    return sock


def with_length(pdu: bytes, marker: bytes, length: int) -> bytes:
    """`pdu` with the 2-byte length after the first item header `marker` (type, reserved) replaced."""
    at = pdu.index(marker, 74)
    return pdu[: at + 2] + length.to_bytes(2, "big") + pdu[at + 4 :]


def big_request() -> bytes:
    rq = B.big_rq(65536)
    return rq[:10] + b"ARCHIVE_B".ljust(16) + rq[26:]


def drip(sock: socket.socket, data: bytes, pieces: int, gap: float) -> None:
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        try:
            sock.sendall(data[i : i + step])
        except OSError:  # the router has already given up on us (ARTIM)
            return
        time.sleep(gap)


# name -> (associate first?, what to send: bytes or a function of the socket, acceptable first answers)
CORPUS: dict[str, tuple[bool, object, set[str]]] = {
    "user-information item longer than the PDU": (False, with_length(RQ, b"\x50\x00", 0xFFFF), {"ABORT"}),
    "presentation-context item longer than the PDU": (False, with_length(RQ, b"\x20\x00", 0xFFFF), {"ABORT"}),
    "abstract-syntax sub-item longer than the PDU": (False, with_length(RQ, b"\x30\x00", 0xFFF0), {"ABORT"}),
    "maximum-length sub-item longer than the PDU": (False, with_length(RQ, b"\x51\x00", 0xFFFF), {"ABORT"}),
    "PDU-length shorter than the items it holds": (False, RQ[:2] + (68 + 4).to_bytes(4, "big") + RQ[6:], {"ABORT"}),
    "A-ASSOCIATE-RQ of 64 KiB (valid: 127 contexts, a large JWT)": (False, big_request(), {"AC", "RJ"}),
    "A-ASSOCIATE-AC from the requestor": (False, B.associate_ac(RQ), {"ABORT"}),
    "A-RELEASE-RQ before any association": (False, a_release_rq(), {"ABORT"}),
    "A-ABORT as the first PDU": (False, bytes([7, 0, 0, 0, 0, 4, 0, 0, 0, 0]), {"closed"}),
    "undefined PDU type 0x08 mid-association": (True, bytes([8, 0, 0, 0, 0, 4, 0, 0, 0, 0]), {"ABORT"}),
    "undefined PDU type 0xFF mid-association": (True, bytes([0xFF, 0, 0, 0, 0, 4, 0, 0, 0, 0]), {"ABORT"}),
    "P-DATA-TF above the archive's maximum PDU length": (
        True,
        B.p_data(B.pdv(1, 3, b"\0" * 64), length=1 << 20),
        {"ABORT"},
    ),
    "P-DATA-TF with a PDV item longer than the PDU": (True, B.p_data(B.pdv(1, 3, b"\0" * 8, length=4096)), {"ABORT"}),
    "P-DATA-TF with length 0": (True, B.p_data(), {"ABORT", "closed"}),
    "second A-ASSOCIATE-RQ mid-association": (True, RQ, {"ABORT"}),
    "A-ASSOCIATE-RQ delivered 7 bytes at a time (within ARTIM)": (False, lambda sock: drip(sock, RQ, 30, 0.02), {"AC"}),
    "A-ASSOCIATE-RQ dripping slower than ARTIM": (False, lambda sock: drip(sock, RQ[:8], 8, ARTIM_S / 4), {"closed"}),
}
# Pipelining: bytes that arrive in the same read as a complete A-ASSOCIATE-RQ.
PIPELINED = {
    "second A-ASSOCIATE-RQ in the same segment": RQ + RQ,
    "P-DATA-TF before the A-ASSOCIATE-AC, in the same segment": RQ + b"".join(B.echo_rq()),
}


def run_hostile(hostile: Hostile, associate: bool, payload: object) -> Ending:
    sock = establish(hostile.port) if associate else socket.create_connection((HOST, hostile.port), timeout=10)
    with sock:
        if callable(payload):
            payload(sock)
        else:
            assert isinstance(payload, bytes)
            sock.sendall(payload)
        ending = observe(sock, 10.0, stop_after_answer=True)
        if ending.kind in ("AC", "RJ"):  # a valid request: answered; end it politely
            with contextlib.suppress(OSError):
                sock.sendall(bytes([7, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
            ending = Ending(ending.pdus, True, ending.seconds)
    return ending


@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_input_ends_cleanly_and_the_bystander_keeps_working(hostile: Hostile, name: str) -> None:
    associate, payload, expected = CORPUS[name]
    ending = run_hostile(hostile, associate, payload)
    print(f"\n{name}: {ending.kind} then {'close' if ending.closed else 'OPEN'} after {ending.seconds * 1000:.0f} ms")
    assert ending.kind in expected, f"{name}: got {ending.kind} {ending.pdus[:1]!r}"
    assert ending.closed, f"{name}: the router left the connection open"
    if ending.kind == "ABORT":
        assert parse_abort(ending.pdus[0])[0] == 2  # service provider
    hostile.assert_healthy()


@pytest.mark.parametrize("name", PIPELINED)
def test_pipelined_violation_after_the_request_is_aborted(hostile: Hostile, name: str) -> None:
    with socket.create_connection((HOST, hostile.port), timeout=10) as sock:
        sock.sendall(PIPELINED[name])
        ending = observe(sock, 10.0)
    hostile.assert_healthy()
    assert ending.closed
    assert ending.kind == "ABORT", f"{name}: expected A-ABORT (source 2), got {ending.kind}"
    assert parse_abort(ending.pdus[0])[0] == 2


# ----------------------------------------------------------------------------- truncation at every offset

ECHO = b"".join(B.echo_rq())
RELEASE = a_release_rq()
# The requestor's side of a complete C-ECHO exchange, and the answer each PDU waits for.
EXCHANGE = [(RQ, PduType.ASSOCIATE_AC), (ECHO, PduType.P_DATA_TF), (RELEASE, PduType.RELEASE_RP)]
TOTAL = sum(len(pdu) for pdu, _ in EXCHANGE)
BOUNDARIES = {len(RQ), len(RQ) + len(ECHO), TOTAL}


def truncated_exchange(port: int, cut: int, *, then_close: bool) -> Ending:
    """Play the exchange up to byte `cut` (waiting for each answer), then close or fall silent."""
    # ARTIM runs from the moment the router accepts the connection: for a cut inside the request, time
    # the close from before the connect. (Timed from after sendall, a thread that the loaded machine
    # paused between the two saw ARTIM fire "early", at 0.85 s instead of 1.5 s.)
    connecting = time.monotonic()
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sent = 0
        for pdu, answer_type in EXCHANGE:
            part = pdu[: max(0, cut - sent)]
            if part:
                sock.sendall(part)
            sent += len(part)
            if len(part) < len(pdu):
                break
            answer = read_pdu(sock, timeout=30)  # the archive may be slow to answer under this load
            assert answer[:1] == bytes([answer_type]), f"cut {cut}: {answer[:12]!r} instead of {answer_type!r}"
        if then_close:
            sock.shutdown(socket.SHUT_WR)
        return observe(sock, 20.0, since=connecting if cut < len(RQ) and not then_close else None)


def _report(endings: dict[int, Ending]) -> str:
    kinds = Counter(e.kind for e in endings.values())
    times = [e.seconds for e in endings.values()]
    return (
        f"{len(endings)} cuts: {dict(kinds)}; close after median {statistics.median(times) * 1000:.0f} ms, "
        f"max {max(times) * 1000:.0f} ms"
    )


def test_exchange_cut_at_every_offset_then_closed(hostile: Hostile) -> None:
    """The device sends a prefix of the exchange and closes: the router must close its side at once."""
    with ThreadPoolExecutor(16) as pool:
        endings = dict(
            zip(
                range(TOTAL + 1),
                pool.map(lambda cut: truncated_exchange(hostile.port, cut, then_close=True), range(TOTAL + 1)),
                strict=True,
            )
        )
    print(f"\ntruncated then closed: {_report(endings)}")
    for cut, ending in endings.items():
        assert ending.closed and ending.seconds < 2, f"cut {cut}: {ending}"
        assert ending.kind in ("closed", "ABORT"), f"cut {cut}: {ending.kind}"
    hostile.assert_healthy()


def test_exchange_cut_at_every_offset_then_silent(hostile: Hostile) -> None:
    """The device sends a prefix and falls silent mid-PDU: ARTIM closes before the request is complete,
    the DIMSE timer aborts after it (an association idle at a PDU boundary is legitimate and stays)."""
    cuts = [cut for cut in range(1, TOTAL + 1) if cut not in BOUNDARIES or cut == TOTAL]
    before_rq = [cut for cut in cuts if cut < len(RQ)]
    after_rq = [cut for cut in cuts if cut >= len(RQ)]
    endings: dict[int, Ending] = {}
    # Incomplete requests hold nothing but a socket: all at once. Past the request each cut holds an
    # association to the archive (pynetdicom, in this process, sharing its GIL with these threads): 20 at a
    # time, so that on a loaded machine (CI runs test files in parallel) the archive still accepts router B's
    # connections in time; at 45 it sometimes did not, and router A rightly answered A-ASSOCIATE-RJ 2-3-1.
    for group, workers in ((before_rq, len(before_rq)), (after_rq, 20)):
        with ThreadPoolExecutor(workers) as pool:
            endings.update(
                zip(
                    group,
                    pool.map(lambda cut: truncated_exchange(hostile.port, cut, then_close=False), group),
                    strict=True,
                )
            )
        hostile.assert_healthy()
    print(
        f"\ntruncated then silent, request incomplete: {_report({c: endings[c] for c in before_rq})}"
        f"\ntruncated then silent, after the request: {_report({c: endings[c] for c in after_rq})}"
    )
    for cut in before_rq:  # ARTIM: a plain close, no PDU (PS3.8 9.1.5)
        ending = endings[cut]
        assert ending.kind == "closed" and ARTIM_S - 0.2 < ending.seconds < ARTIM_S + 2, f"cut {cut}: {ending}"
    for cut in after_rq:
        ending = endings[cut]
        if cut == TOTAL:  # the complete exchange: released, closed at once
            assert ending.kind == "closed" and ending.seconds < 2
            continue
        assert ending.kind == "ABORT" and ending.closed and ending.seconds < CUT_WITHIN_S, f"cut {cut}: {ending}"
    hostile.assert_healthy()


def test_router_memory_stays_bounded(hostile: Hostile) -> None:
    """Runs last in this module: after the corpus and ~600 truncated connections."""
    rss = rss_mb(hostile.router_pid)
    print(f"\nrouter A RSS {hostile.rss_start:.0f} MB before the hostile input, {rss:.0f} MB after")
    assert rss < 150
    assert rss - hostile.rss_start < 30
    hostile.assert_healthy()
    assert "Traceback" not in hostile.net.log("site-a")

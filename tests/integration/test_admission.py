"""Who may call through a router, how many at once, and what a caller can make it hold.

Real routers and bridge (processes, gRPC over TLS), DCMTK's echoscu and pynetdicom peers:
- the LAN allow-list (`[[local]]`, `[[shared]]` from their own host): A-ASSOCIATE-RJ 1/1/3 for
  unknown titles and addresses, logged and audited (issue 15 item 2);
- inbound associations have their own caps, so a peer cannot lock the hospital's own workstations
  out (issue 17 item 8);
- unfinished A-ASSOCIATE-RQs are capped and bounded in size (issue 17 item 9).

Source addresses: the loopback network is 127.0.0.0/8, so a client bound to 127.0.0.2 reaches a
router listening on 127.0.0.1 and is seen as 127.0.0.2.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from relay_demo.archive import DemoArchive
from relay_demo.network import Remote, Shared
from relay_router.ul import PduType, parse_reject
from tests.support import dcmtk
from tests.support.admission import AdmissionNetwork, local_entries, rss_bytes, write_tls_files
from tests.support.wire import read_pdu, wait_until
from tests.unit.ul.builders import IMPLICIT_LE, VERIFICATION, associate_rq

pytestmark = pytest.mark.integration
HOST = "127.0.0.1"
CALLING_AE_NOT_RECOGNISED = (1, 1, 3)
LOCAL_LIMIT_EXCEEDED = (2, 3, 2)


@pytest.fixture
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdmissionNetwork]:
    network = AdmissionNetwork(tmp_path_factory.mktemp("admission")).start()
    yield network
    network.stop()


def port_of(net: AdmissionNetwork, name: str) -> int:
    port = net.sites[name].port
    assert port
    return port


def echo(port: int, called: str, calling: str, source: str = HOST) -> tuple[bool, tuple[int, int, int] | None]:
    """(C-ECHO succeeded, the A-ASSOCIATE-RJ triple if rejected), from a pynetdicom AE bound to `source`."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title=called, bind_address=(source, 0))
    try:
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            return False, (rj.result, rj.result_source, rj.diagnostic)
        if not assoc.is_established:
            return False, None
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and status.Status == 0, None
    finally:
        ae.shutdown()


def rejection(port: int, called: str, calling: str, source: str) -> tuple[int, int, int]:
    """The A-ASSOCIATE-RJ triple the router answers a request from `source` with (raises if it is no RJ)."""
    return parse_reject(raw_request(port, associate_rq(called=called, calling=calling), source=source))


def raw_request(port: int, rq: bytes, source: str = HOST) -> bytes:
    with socket.create_connection((HOST, port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(rq)
        return read_pdu(sock)


# -- the LAN allow-list ------------------------------------------------------------------------


@pytest.fixture
def allow_list(net: AdmissionNetwork, archive_factory: Callable[..., DemoArchive]) -> AdmissionNetwork:
    """site-a admits WS_OK from 127.0.0.1 only, ANY_WS from anywhere, and its [[shared]] STORE_A from 127.0.0.3."""
    archive = archive_factory("ARCHIVE_B")
    net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
    net.extra_toml["site-a"] = local_entries(("WS_OK", ["127.0.0.1"]), ("ANY_WS", []))
    net.add_site("site-a", shared=[Shared("STORE_A", "127.0.0.3", 11119, [])], remote=[Remote("ARCHIVE_B", "site-b")])
    net.wait_connected()
    return net


def test_listed_callers_pass_and_unknown_titles_get_1_1_3_from_dcmtk(allow_list: AdmissionNetwork) -> None:
    port = port_of(allow_list, "site-a")
    assert dcmtk.echoscu(HOST, port, "ARCHIVE_B", "WS_OK").ok
    assert dcmtk.echoscu(HOST, port, "ARCHIVE_B", "ANY_WS").ok
    refused = dcmtk.echoscu(HOST, port, "ARCHIVE_B", "INTRUDER")
    assert refused.rejected and not refused.accepted
    assert "Rejected Permanent" in refused.log and "Calling AE Title Not Recognized" in refused.log, refused.log
    # The raw answer, and the title not revealing anything about routes (an unknown called title: same answer).
    assert parse_reject(raw_request(port, associate_rq(called="ARCHIVE_B", calling="INTRUDER"))) == (1, 1, 3)
    assert parse_reject(raw_request(port, associate_rq(called="NO_SUCH", calling="INTRUDER"))) == (1, 1, 3)
    log = allow_list.log("site-a")
    assert "calling AE title 'INTRUDER' from '127.0.0.1' is not a [[local]] device of this router" in log, log[-2000:]

    def refusals() -> list[dict[str, object]]:
        return [e for e in allow_list.audit_events("site-a") if e.get("reason") == "unknown_calling_ae"]

    events = wait_until(lambda: len(refusals()) == 3 and refusals(), what="three audited refusals")
    assert all(e["outcome"] == "failure" and e["address"] == "127.0.0.1" for e in events)
    assert {e["calling_ae"] for e in events} == {"INTRUDER"}


def test_the_source_address_is_checked_for_titles_that_name_one(allow_list: AdmissionNetwork) -> None:
    port = port_of(allow_list, "site-a")
    assert echo(port, "ARCHIVE_B", "WS_OK", source="127.0.0.1") == (True, None)
    # Rejections read from the raw answer: pynetdicom sometimes reports a connection the router closed right
    # after its A-ASSOCIATE-RJ as an abort, on a loaded machine.
    assert rejection(port, "ARCHIVE_B", "WS_OK", source="127.0.0.2") == CALLING_AE_NOT_RECOGNISED
    assert echo(port, "ARCHIVE_B", "ANY_WS", source="127.0.0.2") == (True, None)
    # A [[shared]] device may call from its own host without a [[local]] entry, and only from there.
    assert echo(port, "ARCHIVE_B", "STORE_A", source="127.0.0.3") == (True, None)
    assert rejection(port, "ARCHIVE_B", "STORE_A", source="127.0.0.1") == CALLING_AE_NOT_RECOGNISED
    for line in (
        "calling AE title 'WS_OK' from '127.0.0.2' is not allowed from this address",
        "calling AE title 'STORE_A' from '127.0.0.1' is not allowed from this address",
    ):  # the router's log reaches its file a moment after the rejection
        wait_until(lambda line=line: line in allow_list.log("site-a"), what=f"the log line {line!r}")


# -- inbound associations have their own caps ----------------------------------------------------


def hold(port: int, called: str, calling: str) -> object | None:
    """An established association kept open (or None if it was not accepted)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title=called)
    return assoc if assoc.is_established else None


def test_a_peer_holding_its_inbound_cap_cannot_lock_out_our_workstations(
    net: AdmissionNetwork, archive_factory: Callable[..., DemoArchive]
) -> None:
    archive_a, archive_b = archive_factory("ARCHIVE_A"), archive_factory("ARCHIVE_B")
    net.add_site(
        "site-a",
        shared=[Shared("ARCHIVE_A", HOST, archive_a.port, ["*"])],
        remote=[Remote("ARCHIVE_B", "site-b")],
        max_associations=3,
        max_inbound_associations=2,
        max_inbound_per_site=1,
    )
    net.add_site(
        "site-b", shared=[Shared("ARCHIVE_B", HOST, archive_b.port, ["*"])], remote=[Remote("ARCHIVE_A", "site-a")]
    )
    net.add_site("site-c", remote=[Remote("ARCHIVE_A", "site-a")])
    net.wait_connected()
    held = []
    try:
        first_b = hold(port_of(net, "site-b"), "ARCHIVE_A", "PEER_B")
        assert first_b is not None
        held.append(first_b)
        # site-b has its one slot at site-a: a second is refused, the calling device told "local limit exceeded".
        answer = raw_request(port_of(net, "site-b"), associate_rq(called="ARCHIVE_A", calling="PEER_B2"))
        assert answer[0] == PduType.ASSOCIATE_RJ and parse_reject(answer) == LOCAL_LIMIT_EXCEEDED
        wait_until(
            lambda: "site site-b has reached its limit of associations to site-a (1)" in net.log("site-a"),
            what="the per-site refusal in site-a's log",
        )
        first_c = hold(port_of(net, "site-c"), "ARCHIVE_A", "PEER_C")
        assert first_c is not None, "another site still gets in while site-b holds its share"
        held.append(first_c)
        # Now every inbound slot of site-a is taken: other sites are refused ...
        answer = raw_request(port_of(net, "site-c"), associate_rq(called="ARCHIVE_A", calling="PEER_C2"))
        assert parse_reject(answer) == LOCAL_LIMIT_EXCEEDED
        wait_until(
            lambda: "site site-a has reached its limit of associations from other sites (2)" in net.log("site-a"),
            what="the inbound refusal in site-a's log",
        )
        # ... but site-a's own workstation still calls out.
        assert dcmtk.echoscu(HOST, port_of(net, "site-a"), "ARCHIVE_B", "WS_A").ok
        wait_until(
            lambda: (
                {e["site"] for e in net.audit_events("site-a") if e.get("reason") == "inbound_limit"}
                == {"site-b", "site-c"}
            ),
            what="both inbound refusals audited",
        )
    finally:
        for assoc in held:
            assoc.release()  # type: ignore[attr-defined]


# -- what an unfinished request can make the router hold -----------------------------------------


def padded_request(total: int, calling: str = "SLOW") -> bytes:
    """A real A-ASSOCIATE-RQ grown to `total` bytes with an unrecognised item (PS3.8 9.3.1: skipped)."""
    rq = associate_rq(called="ARCHIVE_B", calling=calling)
    body = rq[6:]
    missing = total - len(rq)
    assert missing > 4
    while missing > 0:  # item length is 16 bits: several items for more than 64 KiB
        pad = min(missing, 60000) - 4
        body += bytes([0x7F, 0]) + pad.to_bytes(2, "big") + b"\0" * pad
        missing -= pad + 4
    assert len(body) + 6 == total
    return rq[:2] + len(body).to_bytes(4, "big") + body


@pytest.fixture
def one_route(net: AdmissionNetwork, archive_factory: Callable[..., DemoArchive]) -> AdmissionNetwork:
    archive = archive_factory("ARCHIVE_B")
    net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
    net.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], artim_timeout_s=60)
    net.wait_connected()
    return net


SLOW_CLIENTS = 48
RSS_GROWTH_BOUND = 8 * 1024 * 1024  # what 48 half requests may add to the router's RSS (measured: 3.3 MB)


def test_slow_half_requests_stay_bounded_and_others_are_served(one_route: AdmissionNetwork) -> None:
    """The attack of issue 17 item 9 (48 clients each sending half of a 1 MiB request: +58 MB RSS) now gets
    A-ASSOCIATE-RJ at once; 48 clients each sending half of the largest request the router takes (64 KiB)
    and waiting grow its RSS by less than 8 MiB, and a normal C-ECHO is served meanwhile."""
    port = port_of(one_route, "site-a")
    proc = one_route.sites["site-a"].process
    assert proc is not None
    assert echo(port, "ARCHIVE_B", "WS")[0]  # warm: the first association's imports and buffers
    before = rss_bytes(proc.pid)
    huge_half = padded_request(1000 * 1024)[: 500 * 1024]
    for i in range(SLOW_CLIENTS):
        with socket.create_connection((HOST, port), timeout=10, source_address=(f"127.0.1.{10 + i // 8}", 0)) as sock:
            sock.sendall(huge_half)
            assert parse_reject(read_pdu(sock)) == (1, 3, 2)
    half = padded_request(64 * 1024)[: 32 * 1024]
    clients: list[socket.socket] = []
    try:
        for i in range(SLOW_CLIENTS):  # 6 source addresses x 8: within both caps (per address 8, total 64)
            sock = socket.create_connection((HOST, port), timeout=10, source_address=(f"127.0.1.{10 + i // 8}", 0))
            sock.sendall(half)
            clients.append(sock)
        time.sleep(1.5)  # let the router read what was sent
        grown = rss_bytes(proc.pid) - before
        assert grown < RSS_GROWTH_BOUND, f"RSS grew by {grown / 1e6:.1f} MB for {SLOW_CLIENTS} half requests"
        started = time.monotonic()
        assert echo(port, "ARCHIVE_B", "WS") == (True, None)
        assert time.monotonic() - started < 5
        print(f"RSS growth for {SLOW_CLIENTS} half requests of 64 KiB: {grown / 1e6:.2f} MB")
    finally:
        for sock in clients:
            sock.close()


def test_unfinished_requests_beyond_the_per_address_cap_are_closed_at_once(one_route: AdmissionNetwork) -> None:
    port = port_of(one_route, "site-a")
    half = padded_request(8 * 1024)[:1000]
    clients = []
    try:
        for _ in range(8):  # max_pending_per_address
            sock = socket.create_connection((HOST, port), timeout=10, source_address=("127.0.2.1", 0))
            sock.sendall(half)
            clients.append(sock)
        time.sleep(0.5)
        with socket.create_connection((HOST, port), timeout=5, source_address=("127.0.2.1", 0)) as ninth:
            started = time.monotonic()
            with contextlib.suppress(ConnectionResetError):
                assert ninth.recv(100) == b""  # closed, nothing sent
            assert time.monotonic() - started < 3
        # Another address is not affected.
        assert echo(port, "ARCHIVE_B", "WS", source="127.0.2.2") == (True, None)
        wait_until(
            lambda: (
                "closed a connection from '127.0.2.1' at once: 8 A-ASSOCIATE-RQs from 127.0.2.1 are unfinished"
                in one_route.log("site-a")
            ),
            what="the pending-cap log line",
        )
    finally:
        for sock in clients:
            sock.close()
    # Once they are gone, the address may call again.
    wait_until(lambda: echo(port, "ARCHIVE_B", "WS", source="127.0.2.1") == (True, None), timeout=10, what="echo")


def test_an_oversized_request_gets_a_rejection_and_a_clear_log_line(one_route: AdmissionNetwork) -> None:
    port = port_of(one_route, "site-a")
    big = padded_request(64 * 1024 + 4096)
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(big)
        answer = read_pdu(sock)
    assert answer[0] == PduType.ASSOCIATE_RJ
    assert parse_reject(answer) == (1, 3, 2)  # permanent, service provider (presentation), local limit exceeded
    wait_until(
        lambda: (
            f"A-ASSOCIATE-RQ of {len(big) - 6} bytes is larger than max_request_bytes (65536)"
            in one_route.log("site-a")
        ),
        what="the oversize log line",
    )
    events = wait_until(
        lambda: [e for e in one_route.audit_events("site-a") if e.get("reason") == "request_too_large"],
        what="the audited oversize rejection",
    )
    assert len(events) == 1 and events[0]["address"] == HOST and events[0]["result"] == "rejected"
    # A request just under the limit is served: 60 KB of proposed transfer syntaxes, one of them usable.
    private = [f"1.2.826.0.1.3680043.9.7777.{10**29 + n}" for n in range(1000)]
    fits = associate_rq(called="ARCHIVE_B", calling="WS", contexts=((VERIFICATION, (*private, IMPLICIT_LE)),))
    assert 58 * 1024 < len(fits) <= 64 * 1024
    answer = raw_request(port, fits)
    assert answer[0] == PduType.ASSOCIATE_AC, answer[:16]
    assert echo(port, "ARCHIVE_B", "WS") == (True, None)


# -- DICOM over TLS on the LAN (PS3.15 B.1/B.3) ---------------------------------------------------


def echoscu_tls(port: int, tls: list[str]) -> str:
    """DCMTK's echoscu over TLS (Debian builds DCMTK with OpenSSL); its whole log."""
    dcmtk_args = ["echoscu", "-v", *tls, "-aet", "WS_TLS", "-aec", "ARCHIVE_B", "-to", "10", HOST, str(port)]
    run = subprocess.run(dcmtk_args, capture_output=True, text=True, timeout=30)
    return f"exit {run.returncode}\n{run.stdout}{run.stderr}"


def test_dicom_over_tls_with_device_certificates(
    net: AdmissionNetwork, archive_factory: Callable[..., DemoArchive], tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert not dcmtk.missing_tools(("echoscu",)), "DCMTK echoscu is required"
    files = write_tls_files(tmp_path_factory.mktemp("tls"))
    archive = archive_factory("ARCHIVE_B")
    net.add_site("site-b", shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])])
    net.add_site(
        "site-a",
        remote=[Remote("ARCHIVE_B", "site-b")],
        tls_listen=f"{HOST}:0",
        tls_cert_file=str(files["router.pem"]),
        tls_key_file=str(files["router.key"]),
        tls_ca_file=str(files["ca.pem"]),
    )
    net.wait_connected()
    tls_port = wait_until(lambda: net.status("site-a").get("dicom_tls_port"), what="the TLS listener")
    assert isinstance(tls_port, int)
    trust = ["+cf", str(files["ca.pem"])]
    good = echoscu_tls(tls_port, ["+tls", str(files["device.key"]), str(files["device.pem"]), *trust])
    assert good.startswith("exit 0") and "Received Echo Response (Success)" in good, good
    # A device certificate from another CA, no certificate at all, and plain DICOM on the TLS port: refused.
    stranger = echoscu_tls(tls_port, ["+tls", str(files["stranger.key"]), str(files["stranger.pem"]), *trust])
    anonymous = echoscu_tls(tls_port, ["+tla", *trust])
    plain = echoscu_tls(tls_port, [])
    for answer in (stranger, anonymous, plain):
        assert not answer.startswith("exit 0") and "Echo Response" not in answer, answer
    # The plain listener keeps working beside it, and the router serves others after the failed handshakes.
    assert dcmtk.echoscu(HOST, port_of(net, "site-a"), "ARCHIVE_B", "WS").ok
    assert "Received Echo Response (Success)" in echoscu_tls(
        tls_port, ["+tls", str(files["device.key"]), str(files["device.pem"]), *trust]
    )

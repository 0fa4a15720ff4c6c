"""relay_bridge.cluster.link: the replica link's framing (sans-IO) and the link server over real
mutual TLS, fed hostile input: truncated, oversized and out-of-order frames, a wrong certificate,
a bad header, an association id used twice; and its backpressure."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import directory as directory_module
from relay_bridge.cluster.link import (
    WARM,
    Link,
    LinkClosed,
    LinkPool,
    LinkServer,
    client_context,
    presents_cluster_certificate,
    server_context,
)
from relay_bridge.cluster.link_codec import END, END_FRAME, FrameDecoder, Header, LinkProtocolError, encode
from relay_bridge.cluster.pki import CLUSTER_NAME, ClusterFiles, make_cluster_pki
from relay_bridge.config import BridgeConfig, ClusterSection, ServerSection
from relay_bridge.directory import Device, Directory
from relay_bridge.server import RelayServicer
from relay_common.config import InvalidValue

ASSOC = "cd" * 16


# -- framing, without sockets ------------------------------------------------------------------------------


def _stream(frames: list[bytes]) -> bytes:
    return b"".join(encode(f) + f for f in frames) + END_FRAME


def test_frames_come_out_the_same_however_the_stream_was_cut() -> None:
    frames = [b"", b"a", b"x" * 70_000, bytes(range(256)) * 3]
    stream = _stream(frames)
    for cut in (1, 3, 4, 5, 1000, 65_536, len(stream)):
        decoder = FrameDecoder(1 << 20)
        out: list[bytes | None] = []
        for at in range(0, len(stream), cut):
            out += decoder.feed(stream[at : at + cut])
        assert out == [*frames, END], cut  # the empty frame stays a frame; the end mark is distinct
        assert decoder.buffered == 0


def test_an_oversized_length_is_refused_before_its_bytes_are_held() -> None:
    decoder = FrameDecoder(1024)
    with pytest.raises(LinkProtocolError, match="exceeds"):
        decoder.feed((1025).to_bytes(4, "big"))  # only the length has arrived
    decoder = FrameDecoder(1024)
    assert decoder.feed(encode(b"x" * 1024)[:4] + b"x" * 10) == []  # a maximal frame, truncated: waits
    assert decoder.buffered == 14


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (b"", "not a link header"),
        (b"XXXX\x06site-a\x02r1", "not a link header"),
        (b"RLK1", "truncated"),
        (b"RLK1\x06site", "truncated"),
        (b"RLK1\x06site-a", "truncated"),
        (b"RLK1\x06site-a\x05r1", "truncated"),
        (b"RLK1\x06site-a\x02r1extra", "trailing"),
        (b"RLK1\x06sit\xe9-a\x02r1", "ASCII"),
    ],
)
def test_a_bad_header_is_a_protocol_error(raw: bytes, complaint: str) -> None:
    with pytest.raises(LinkProtocolError, match=complaint):
        Header.decode(raw)


def test_a_header_round_trips() -> None:
    assert Header.decode(Header("site-a", "r1").encode()) == Header("site-a", "r1")
    with pytest.raises(ValueError):
        Header("s" * 256, "r1").encode()


def test_only_the_cluster_name_passes_the_certificate_check() -> None:
    assert presents_cluster_certificate({"subject": ((("commonName", CLUSTER_NAME),),)})
    assert not presents_cluster_certificate({"subject": ((("commonName", "site-a"),),)})
    assert not presents_cluster_certificate({"subject": ((("commonName", CLUSTER_NAME),), (("commonName", "x"),))})
    assert not presents_cluster_certificate(None)
    assert not presents_cluster_certificate({})


# -- the link server over real mutual TLS ------------------------------------------------------------------


@pytest.fixture
async def link_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[LinkServer, ClusterFiles]]:
    monkeypatch.setattr(directory_module, "SCRYPT_N", 2**10)
    db = Directory(tmp_path / "bridge.sqlite3")
    for name in ("site-a", "site-b"):
        db.add_router(name, "long enough password")
    db.publish("site-b", [Device("site-b", "PACS", "", ("site-a",))])
    servicer = RelayServicer(BridgeConfig(server=ServerSection(insecure=True)), db)
    files = make_cluster_pki(tmp_path / "cluster")
    server = LinkServer(servicer.associations, server_context(files.cert, files.key, files.ca_cert))
    await server.start("127.0.0.1")
    yield server, files
    await server.stop()
    await servicer.directory.aclose()


async def _connect(port: int, context: ssl.SSLContext) -> Link:
    _, link = await asyncio.get_running_loop().create_connection(
        lambda: Link(1 << 20, 4, server_side=False), "127.0.0.1", port, ssl=context, server_hostname=CLUSTER_NAME
    )
    return link


def _open(to_site: str = "site-b") -> bytes:
    op = pb.Open(association_id=ASSOC, to_site=to_site, called_ae_title="PACS", calling_ae_title="WS")
    return pb.Frame(open=op).SerializeToString()


async def _answers(link: Link) -> list[bytes]:
    answers: list[bytes] = []
    while (frame := await asyncio.wait_for(link.read(), 10)) is not grpc.aio.EOF:
        assert isinstance(frame, bytes)
        answers.append(frame)
    return answers


async def test_an_offline_destination_is_refused_over_the_link(link_server: tuple[LinkServer, ClusterFiles]) -> None:
    server, files = link_server
    link = await _connect(server.port, client_context(files.cert, files.key, files.ca_cert))
    await link.write(Header("site-a", "r1").encode())
    await link.write(_open())
    (answer,) = await _answers(link)  # then the end mark: the holder's handler finished
    refused = pb.Frame.FromString(answer).refused
    assert refused.reason == pb.Refused.SITE_OFFLINE and "site-b" in refused.detail
    link.cancel()


async def test_the_share_is_checked_again_at_the_holder(link_server: tuple[LinkServer, ClusterFiles]) -> None:
    server, files = link_server
    link = await _connect(server.port, client_context(files.cert, files.key, files.ca_cert))
    await link.write(Header("site-c", "r1").encode())  # site-c: nothing is shared with it
    await link.write(_open())
    (answer,) = await _answers(link)
    assert pb.Frame.FromString(answer).refused.reason == pb.Refused.NOT_PERMITTED
    link.cancel()


@pytest.mark.parametrize(
    "frames",
    [
        [b"RLK1\x0bnot a site!\x02r1", _open()],  # a header whose site is not a site name
        [b"RLK1\x06site-a\x03r\x1b1", _open()],  # a replica id with a control character
        [b"garbage", _open()],  # no header
        [Header("site-a", "r1").encode(), b"\xff\xff garbage"],  # not a relay.v1.Frame
        [Header("site-a", "r1").encode(), pb.Frame(join=pb.Join(association_id=ASSOC)).SerializeToString()],
        [Header("site-a", "r1").encode(), pb.Frame(open=pb.Open(association_id="short")).SerializeToString()],
    ],
    ids=["bad-site", "bad-replica-id", "no-header", "not-a-frame", "join-not-open", "bad-association-id"],
)
async def test_a_bad_first_frame_cuts_the_link_without_an_answer(
    link_server: tuple[LinkServer, ClusterFiles], frames: list[bytes]
) -> None:
    server, files = link_server
    link = await _connect(server.port, client_context(files.cert, files.key, files.ca_cert))
    for frame in frames:
        await link.write(frame)
    with pytest.raises(LinkClosed):
        await _answers(link)  # cut, not ended: the origin refuses its router's Open as site offline


async def test_an_oversized_or_late_frame_on_the_wire_cuts_the_link(
    link_server: tuple[LinkServer, ClusterFiles],
) -> None:
    server, files = link_server
    context = client_context(files.cert, files.key, files.ca_cert)
    for raw in ((0xFFFFFFF0).to_bytes(4, "big"), END_FRAME + encode(b"late") + b"late"):
        link = await _connect(server.port, context)
        assert link.transport is not None
        link.transport.write(raw)  # below the Link's own checks: what a hostile peer could send
        with pytest.raises(LinkClosed):
            await _answers(link)


async def test_a_truncated_stream_is_a_cut_not_an_end() -> None:
    """A link that closes in the middle of a frame (or without the end mark) raises: the splice aborts."""
    loop = asyncio.get_running_loop()
    received = Link(1 << 20, 4, server_side=False)
    server = await loop.create_server(lambda: received, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, sender = await loop.create_connection(lambda: Link(1 << 20, 4, server_side=False), "127.0.0.1", port)
    assert sender.transport is not None
    sender.transport.write(encode(b"whole") + b"whole" + encode(b"x" * 100) + b"x" * 50)
    sender.transport.close()
    assert await asyncio.wait_for(received.read(), 5) == b"whole"
    with pytest.raises(LinkClosed, match="cut"):
        await asyncio.wait_for(received.read(), 5)
    server.close()


def _certificate_of_the_cluster_ca(files: ClusterFiles, name: str, directory: Path) -> tuple[Path, Path]:
    """A certificate our own cluster CA issued, but for another name (a router's, say)."""
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


async def test_only_the_cluster_certificate_gets_in(
    link_server: tuple[LinkServer, ClusterFiles], tmp_path: Path
) -> None:
    server, files = link_server
    other = make_cluster_pki(tmp_path / "other")  # same name, another CA
    foreign = client_context(other.cert, other.key, files.ca_cert)  # trusts our server, presents a foreign certificate
    with pytest.raises((ssl.SSLError, ConnectionError, LinkClosed)):
        link = await _connect(server.port, foreign)
        await link.write(Header("site-a", "r1").encode())
        await link.write(_open())
        await _answers(link)
    cert, key = _certificate_of_the_cluster_ca(files, "site-a", tmp_path)  # our CA, not the cluster's name
    with pytest.raises((ssl.SSLError, ConnectionError, LinkClosed)):
        link = await _connect(server.port, client_context(cert, key, files.ca_cert))
        await link.write(Header("site-a", "r1").encode())
        await link.write(_open())
        await _answers(link)
    # And the origin checks the holder: a server with a foreign certificate is not spoken to.
    impostor = LinkServer(server.associations, server_context(other.cert, other.key, files.ca_cert))
    await impostor.start("127.0.0.1")
    with pytest.raises(ssl.SSLCertVerificationError):
        await _connect(impostor.port, client_context(files.cert, files.key, files.ca_cert))
    await impostor.stop()


async def test_an_association_id_in_use_is_not_taken_twice(link_server: tuple[LinkServer, ClusterFiles]) -> None:
    server, files = link_server
    server.associations.state.splices[ASSOC] = object()  # type: ignore[assignment]  # running here already
    link = await _connect(server.port, client_context(files.cert, files.key, files.ca_cert))
    await link.write(Header("site-a", "r1").encode())
    await link.write(_open())
    with pytest.raises(LinkClosed):
        await _answers(link)
    del server.associations.state.splices[ASSOC]


async def test_a_reader_that_does_not_read_holds_the_writer_back() -> None:
    """At most `depth` frames queue at the receiver; then TCP flow control stops the sender's writes."""
    loop = asyncio.get_running_loop()
    received = Link(1 << 20, 2, server_side=False)
    server = await loop.create_server(lambda: received, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, sender = await loop.create_connection(lambda: Link(1 << 20, 2, server_side=False), "127.0.0.1", port)
    frame = b"x" * 256 * 1024
    written = 0

    async def write_all() -> None:
        nonlocal written
        for _ in range(400):  # 100 MiB: far more than the socket buffers hold
            await sender.write(frame)
            written += 1
        await sender.done_writing()

    writer = asyncio.create_task(write_all())
    await asyncio.sleep(1.0)
    assert not writer.done(), "the sender wrote 100 MiB to a reader that read nothing"
    assert len(received._frames) <= 2 + 1, "the receiver queued more than its depth (plus one read's worth)"
    stalled_at = written
    count = 0
    while (got := await asyncio.wait_for(received.read(), 10)) is not grpc.aio.EOF:
        assert got == frame
        count += 1
    await writer
    assert count == 400 and stalled_at < 100, (count, stalled_at)
    sender.cancel()
    server.close()


async def test_the_pool_falls_back_when_the_replica_has_no_link_port(
    link_server: tuple[LinkServer, ClusterFiles],
) -> None:
    server, files = link_server
    pool = LinkPool(client_context(files.cert, files.key, files.ca_cert), max_frame_bytes=1 << 20, depth=4)
    asked: list[str] = []

    async def none() -> int | None:
        asked.append("old")
        return None

    assert await pool.take("127.0.0.1:7001", none) is None
    assert await pool.take("127.0.0.1:7001", none) is None
    assert asked == ["old"]  # asked once, remembered

    async def port() -> int | None:
        return server.port

    link = await pool.take("127.0.0.1:7002", port)
    assert link is not None and link.usable
    for _ in range(100):  # the pool warms up to WARM links in the background, a moment later
        if sum(warm.usable for warm in pool._idle.get("127.0.0.1:7002", ())) == WARM:
            break
        await asyncio.sleep(0.1)
    assert sum(warm.usable for warm in pool._idle["127.0.0.1:7002"]) == WARM
    second = await pool.take("127.0.0.1:7002", port)
    assert second is not None and second is not link and second.usable
    link.cancel()
    second.cancel()
    await pool.close()


async def test_a_replica_restarted_on_another_link_port_is_asked_again(
    link_server: tuple[LinkServer, ClusterFiles],
) -> None:
    server, files = link_server
    pool = LinkPool(client_context(files.cert, files.key, files.ca_cert), max_frame_bytes=1 << 20)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    answers = [dead.getsockname()[1], server.port]  # the old port (nothing listens), then the new one
    dead.close()

    async def discover() -> int | None:
        return answers.pop(0)

    assert await pool.take("127.0.0.1:7003", discover) is None  # this association: a Forward call
    link = await pool.take("127.0.0.1:7003", discover)  # the next one asks again and gets a link
    assert link is not None and link.usable and answers == []
    link.cancel()
    await pool.close()


def test_the_link_keys_are_checked(tmp_path: Path) -> None:
    files = {"tls_cert": tmp_path / "c.pem", "tls_key": tmp_path / "c.key", "ca": tmp_path / "ca.pem"}
    section = ClusterSection(listen="0.0.0.0:7443", advertise="10.0.0.5:7443", **files)  # type: ignore[arg-type]
    assert section.links and section.link_port == 0  # links on, the system picks the port
    for bad in (-1, 65536):
        with pytest.raises(InvalidValue) as raised:
            ClusterSection(listen="0.0.0.0:7443", advertise="10.0.0.5:7443", link_port=bad, **files)  # type: ignore[arg-type]
        assert raised.value.key == "link_port"

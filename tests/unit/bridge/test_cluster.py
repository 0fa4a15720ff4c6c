"""relay_bridge.cluster: presence leases on a real SQLite directory, the [cluster] section, and the
internal Forward service over real gRPC with mutual TLS (a certificate of another CA never gets in)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import grpc
import grpc.aio
import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import directory as directory_module
from relay_bridge.admission import Rejection
from relay_bridge.cluster import forward as forward_module
from relay_bridge.cluster import presence as presence_module
from relay_bridge.cluster.forward import (
    EVICT,
    FORWARD,
    FROM_SITE,
    LET_GO_AFTER_S,
    ORIGIN,
    SERVICE,
    SINCE,
    SITE,
    Forwarder,
    ForwardService,
    _splice_through,
    channel_options,
    handlers,
)
from relay_bridge.cluster.link import LinkPool, client_context
from relay_bridge.cluster.pki import ClusterFiles, make_cluster_pki
from relay_bridge.cluster.presence import Location, PresenceKeeper
from relay_bridge.config import BridgeConfig, ClusterSection, ServerSection
from relay_bridge.db.replicas import Replica
from relay_bridge.directory import AsyncDirectory, Device, Directory
from relay_bridge.server import RelayServicer
from relay_bridge.splice import Splice
from relay_common.config import InvalidValue
from tests.support.ports import free_port

ASSOC = "ab" * 16


@pytest.fixture
async def directory(tmp_path: Path) -> AsyncIterator[AsyncDirectory]:
    db = AsyncDirectory(Directory(tmp_path / "bridge.sqlite3"))
    yield db
    await db.aclose()


async def test_a_newer_sign_on_elsewhere_cuts_the_stale_stream(directory: AsyncDirectory) -> None:
    lost: list[str] = []
    changes: list[str] = []
    r1 = PresenceKeeper(directory, "r1", "127.0.0.1:7001", on_lost=lost.append, on_change=lambda: changes.append("r1"))
    taken: list[tuple[str, float, Location]] = []
    r2 = PresenceKeeper(directory, "r2", "127.0.0.1:7002", on_taken=lambda *args: taken.append(args))
    r1._task = r2._task = None  # renewals are driven by hand here
    await directory.register_replica(r1._row(time.time()))
    await directory.register_replica(r2._row(time.time()))

    t = time.time()
    assert await r1.claim("site-a", since=t)
    await r1.renew()
    assert lost == [] and r1.online == {"site-a"} and changes == ["r1"]
    assert await r2.locate("site-a") == Location("r1", "127.0.0.1:7001")
    assert await r1.locate("site-a") is None  # its own row: the caller already knows its sessions

    assert await r2.claim("site-a", since=t + 1)  # the router signed on again, at r2: it wins at once
    assert taken == [("site-a", t + 1, Location("r1", "127.0.0.1:7001"))]  # r2 tells r1 (the Evict call)
    assert await r1.locate("site-a") == Location("r2", "127.0.0.1:7002")
    await r1.renew()
    assert lost == ["site-a"]  # r1 noticed and cuts its stale stream
    await r1.release("site-a", since=t)  # the stale stream's end does not remove r2's row
    assert await r1.locate("site-a") == Location("r2", "127.0.0.1:7002")
    await r1.renew()
    assert lost == ["site-a"]  # noticed once

    assert not await r1.claim("site-a", since=t + 0.5)  # an older sign-on cannot take it back
    await r2.stop()  # clean exit: its rows go at once
    assert await r1.locate("site-a", fresh=True) is None  # the database at once (the map: below)


async def test_the_holder_map_follows_the_renewals_and_a_stale_entry_goes_to_the_database(
    directory: AsyncDirectory,
) -> None:
    now = [1000.0]
    r1 = PresenceKeeper(directory, "r1", "127.0.0.1:7001", renew_s=2.0, clock=lambda: now[0])
    r2 = PresenceKeeper(directory, "r2", "127.0.0.1:7002")
    r3 = PresenceKeeper(directory, "r3", "127.0.0.1:7003")
    for keeper in (r1, r2, r3):
        await directory.register_replica(keeper._row(time.time()))
    t = time.time()
    assert await r2.claim("site-b", since=t)
    assert await r1.claim("site-a", since=t)
    await r1.renew()
    found = await r1.locate("site-b")
    assert found == Location("r2", "127.0.0.1:7002") and found is not None and found.cached  # no query
    assert await r1.locate("site-a") is None  # its own site is never in the map

    assert await r3.claim("site-b", since=t + 1)  # site-b moved to r3; r1's map does not know yet
    found = await r1.locate("site-b")
    assert found == Location("r2", "127.0.0.1:7002") and found.cached  # the caller finds out (see below)
    r1.forget_holder("site-b", Location("r2", "127.0.0.1:7002"))  # r2 refused it: not there
    found = await r1.locate("site-b")
    assert found == Location("r3", "127.0.0.1:7003") and not found.cached  # read from the database...
    found = await r1.locate("site-b")
    assert found == Location("r3", "127.0.0.1:7003") and found.cached  # ...and kept
    r1.forget_holder("site-b", Location("r2", "127.0.0.1:7002"))  # a late word about the old holder
    assert (await r1.locate("site-b")) == Location("r3", "127.0.0.1:7003")  # does not drop the new one

    await r3.release("site-b", since=t + 1)  # the router left r3
    now[0] += 2.5  # more than a renewal later, the entry is not used any more
    assert await r1.locate("site-b") is None
    assert await r2.claim("site-b", since=t + 2)
    await r1.renew()  # a renewal replaces the map whole
    assert await r1.locate("site-b") == Location("r2", "127.0.0.1:7002")
    assert r1.evicted("site-b", t + 3) is False  # an Evict (the site moved) drops the entry too
    assert "site-b" not in r1._holders
    await r2.stop()  # r2's rows are gone at once; so is the entry at the next renewal
    await r1.renew()
    assert r1._holders == {}


async def test_the_holder_map_is_bounded(directory: AsyncDirectory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(presence_module, "MAX_HOLDERS", 3)
    r1 = PresenceKeeper(directory, "r1", "127.0.0.1:7001")
    r2 = PresenceKeeper(directory, "r2", "127.0.0.1:7002")
    for keeper in (r1, r2):
        await directory.register_replica(keeper._row(time.time()))
    for n in range(6):
        assert await r2.claim(f"site-{n}", since=time.time())
    await r1.renew()
    assert len(r1._holders) == 3
    for n in range(6):  # the others are found in the database, and not kept
        assert await r1.locate(f"site-{n}") == Location("r2", "127.0.0.1:7002")
    assert len(r1._holders) == 3


async def test_an_eviction_cuts_only_an_older_stream(directory: AsyncDirectory) -> None:
    lost: list[str] = []
    keeper = PresenceKeeper(directory, "r1", "127.0.0.1:7001", on_lost=lost.append)
    await directory.register_replica(keeper._row(time.time()))
    t = time.time()
    assert await keeper.claim("site-a", since=t)
    assert not keeper.evicted("site-a", t - 1)  # a late message about an older sign-on elsewhere
    assert not keeper.evicted("site-b", t + 1)  # not ours
    assert lost == []
    assert keeper.evicted("site-a", t + 1)
    assert lost == ["site-a"]
    await keeper.renew()
    assert lost == ["site-a"]  # not cut twice


async def test_a_restarted_replica_drops_the_rows_of_its_earlier_life(directory: AsyncDirectory) -> None:
    now = time.time()
    await directory.register_replica(Replica("r1", "127.0.0.1:7001", now - 5, now + 10))
    await directory.claim_presence("site-a", "r1", now - 5, now + 10)  # held before a SIGKILL
    keeper = PresenceKeeper(directory, "r1", "127.0.0.1:7001", renew_s=60)
    await keeper.start()
    try:
        await keeper.renew()
        assert keeper.online == frozenset()  # site-a is not signed on here, nor anywhere
        assert await directory.live_presence(time.time()) == []
    finally:
        await keeper.stop()
    assert await directory.live_replicas(time.time()) == []


async def test_a_row_whose_release_failed_is_removed_at_the_next_renewal(directory: AsyncDirectory) -> None:
    keeper = PresenceKeeper(directory, "r1", "127.0.0.1:7001", renew_s=60)
    await keeper.start()
    try:
        t = time.time()
        assert await keeper.claim("site-a", since=t)
        del keeper._claimed["site-a"]  # as if the stream ended and its release could not reach the database
        await keeper.renew()
        assert keeper.online == frozenset() and await directory.locate("site-a", time.time()) is None
    finally:
        await keeper.stop()


async def test_a_sign_on_whose_claim_is_on_its_way_is_not_cut(directory: AsyncDirectory) -> None:
    lost: list[str] = []
    keeper = PresenceKeeper(directory, "r1", "127.0.0.1:7001", on_lost=lost.append)
    await directory.register_replica(keeper._row(time.time()))
    await keeper.renew()  # a session may be signed on here before its claim is written: not "lost"
    assert lost == []


def test_cluster_section_names_the_key_that_is_wrong(tmp_path: Path) -> None:
    files = {"tls_cert": tmp_path / "c.pem", "tls_key": tmp_path / "c.key", "ca": tmp_path / "ca.pem"}
    assert ClusterSection().listen == ""  # off by default: a single bridge needs none of this
    ClusterSection(listen="0.0.0.0:7443", advertise="10.0.0.5:7443", **files)
    for kwargs, key in [
        ({"listen": "0.0.0.0:7443", **files}, "advertise"),
        ({"listen": "0.0.0.0:7443", "advertise": "0.0.0.0:7443", **files}, "advertise"),
        ({"listen": "0.0.0.0:7443", "advertise": "10.0.0.5:0", **files}, "advertise"),
        ({"listen": "nope", "advertise": "10.0.0.5:7443", **files}, "listen"),
        ({"listen": ":7443", "advertise": "10.0.0.5:7443", "replica_id": "a b", **files}, "replica_id"),
        ({"listen": ":7443", "advertise": "10.0.0.5:7443", "tls_cert": files["tls_cert"]}, "tls_key"),
        ({"listen": ":7443", "advertise": "10.0.0.5:7443", "renew_s": 20.0, **files}, "lease_s"),
    ]:
        with pytest.raises(InvalidValue) as raised:
            ClusterSection(**kwargs)  # type: ignore[arg-type]
        assert raised.value.key == key, (kwargs, raised.value)


async def test_forwarder_refuses_an_address_that_is_not_host_port(tmp_path: Path) -> None:
    forwarder = Forwarder(grpc.ssl_channel_credentials(), "r1", max_frame_bytes=1 << 20, join_timeout_s=1)
    for bad in ("", "host", "host:0", ":7443", "host:99999"):
        with pytest.raises(ValueError):
            forwarder.channel(bad)
    assert forwarder.channel("127.0.0.1:7443") is forwarder.channel("127.0.0.1:7443")  # one channel per replica
    await forwarder.close()


# -- the Forward service over real gRPC with mutual TLS ---------------------------------------------------


def _credentials(files: ClusterFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca_cert.read_bytes(),
        private_key=files.key.read_bytes(),
        certificate_chain=files.cert.read_bytes(),
    )


evictions: list[tuple[str, float]] = []


def _server_credentials(files: ClusterFiles) -> grpc.ServerCredentials:
    """A replica's internal port: the cluster certificate, and callers must present one from the cluster CA."""
    return grpc.ssl_server_credentials(
        [(files.key.read_bytes(), files.cert.read_bytes())],
        root_certificates=files.ca_cert.read_bytes(),
        require_client_auth=True,
    )


@pytest.fixture
async def forward_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[int, ClusterFiles]]:
    monkeypatch.setattr(directory_module, "SCRYPT_N", 2**10)
    db = Directory(tmp_path / "bridge.sqlite3")
    for name in ("site-a", "site-b"):
        db.add_router(name, "long enough password")
    db.publish("site-b", [Device("site-b", "PACS", "", ("site-a",))])
    servicer = RelayServicer(BridgeConfig(server=ServerSection(insecure=True)), db)
    files = make_cluster_pki(tmp_path / "cluster")
    evictions.clear()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [handlers(ForwardService(servicer.associations, lambda site, since: evictions.append((site, since)) is None))]
    )
    port = server.add_secure_port("127.0.0.1:0", _server_credentials(files))
    await server.start()
    yield port, files
    await server.stop(None)
    await servicer.directory.aclose()


async def _forward(port: int, credentials: grpc.ChannelCredentials, *, from_site: str, frame: bytes) -> list[bytes]:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=channel_options(1 << 20)) as channel:
        call = channel.stream_stream(FORWARD)(metadata=((FROM_SITE, from_site),), timeout=10)
        await call.write(frame)
        await call.done_writing()
        answers = []
        while (message := await call.read()) is not grpc.aio.EOF:
            answers.append(message)
        return answers


async def test_evict_reaches_the_holder_with_a_checked_site_and_time(forward_server: tuple[int, ClusterFiles]) -> None:
    port, files = forward_server
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}", _credentials(files), options=channel_options(1 << 20)
    ) as channel:
        evict = channel.unary_unary(EVICT)
        await evict(b"", metadata=((SITE, "site-a"), (SINCE, "1765000000.5")), timeout=5)
        assert evictions == [("site-a", 1765000000.5)]
        for site, since in (("not a site!", "1.0"), ("site-a", "nan"), ("site-a", "soon")):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await evict(b"", metadata=((SITE, site), (SINCE, since)), timeout=5)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(evictions) == 1


def _open(to_site: str = "site-b") -> bytes:
    op = pb.Open(association_id=ASSOC, to_site=to_site, called_ae_title="PACS", calling_ae_title="WS")
    return pb.Frame(open=op).SerializeToString()


async def test_forward_answers_an_offline_destination_with_a_refusal(
    forward_server: tuple[int, ClusterFiles],
) -> None:
    port, files = forward_server
    (answer,) = await _forward(port, _credentials(files), from_site="site-a", frame=_open())
    refused = pb.Frame.FromString(answer).refused
    assert refused.reason == pb.Refused.SITE_OFFLINE and "site-b" in refused.detail


async def test_forward_checks_the_share_again(forward_server: tuple[int, ClusterFiles]) -> None:
    port, files = forward_server
    (answer,) = await _forward(port, _credentials(files), from_site="site-c", frame=_open())
    assert pb.Frame.FromString(answer).refused.reason == pb.Refused.NOT_PERMITTED


async def test_forward_refuses_bad_metadata_and_frames(forward_server: tuple[int, ClusterFiles]) -> None:
    port, files = forward_server
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _forward(port, _credentials(files), from_site="not a site!", frame=_open())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _forward(port, _credentials(files), from_site="site-a", frame=b"\xff\xff garbage")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    join = pb.Frame(join=pb.Join(association_id=ASSOC)).SerializeToString()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _forward(port, _credentials(files), from_site="site-a", frame=join)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_certificate_from_another_ca_never_gets_in(
    forward_server: tuple[int, ClusterFiles], tmp_path: Path
) -> None:
    port, files = forward_server
    other = make_cluster_pki(tmp_path / "other")  # same name, same shape, another CA
    foreign = grpc.ssl_channel_credentials(
        root_certificates=files.ca_cert.read_bytes(),  # it trusts our server...
        private_key=other.key.read_bytes(),  # ...but presents a certificate our CA did not issue
        certificate_chain=other.cert.read_bytes(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _forward(port, foreign, from_site="site-a", frame=_open())
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    no_certificate = grpc.ssl_channel_credentials(root_certificates=files.ca_cert.read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _forward(port, no_certificate, from_site="site-a", frame=_open())
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


class _Origin:
    """The origin's side of a forwarded Open (its association service and router A's call), recorded."""

    def __init__(self) -> None:
        self.written: list[pb.Frame] = []
        self.state = SimpleNamespace(metrics=SimpleNamespace(refused=lambda reason, aid, detail: None))

    async def refuse(self, context: object, rejection: Rejection, aid: str) -> None:
        self.written.append(pb.Frame(refused=pb.Refused(reason=rejection.code)))

    async def write(self, frame: bytes) -> None:
        self.written.append(pb.Frame.FromString(frame))


async def _forward_from_cache(
    port: int, files: ClusterFiles, location: Location, database: list[Location | None]
) -> tuple[list[pb.Frame], list[str], list[tuple[str, Location]]]:
    forwarder = Forwarder(_credentials(files), "r1", max_frame_bytes=1 << 20, join_timeout_s=5)
    lookups: list[str] = []
    forgotten: list[tuple[str, Location]] = []

    async def relocate(site: str) -> Location | None:
        lookups.append(site)
        return database.pop(0)

    forwarder.relocate = relocate
    forwarder.forget_holder = lambda site, where: forgotten.append((site, where))
    origin = _Origin()
    splice = Splice(ASSOC, "site-a", "site-b", "PACS", "WS", depth=2)
    op = pb.Frame.FromString(_open()).open
    try:
        await asyncio.wait_for(forwarder.run(origin, splice, op, origin, location), 10)  # type: ignore[arg-type]
    finally:
        await forwarder.close()
    return origin.written, lookups, forgotten


async def test_a_cached_holder_that_says_not_here_is_looked_up_again(forward_server: tuple[int, ClusterFiles]) -> None:
    """The replica the in-memory map names refuses the Open as site offline (the site moved since the last
    renewal): the database is asked and the Open goes to the replica it names; one answer reaches router A."""
    port, files = forward_server  # this replica does not hold site-b: it always answers site offline
    here = f"127.0.0.1:{port}"
    written, lookups, forgotten = await _forward_from_cache(
        port, files, Location("r2", here, cached=True), [Location("r3", here)]
    )
    assert lookups == ["site-b"] and forgotten == [("site-b", Location("r2", here))]
    assert [f.refused.reason for f in written] == [pb.Refused.SITE_OFFLINE]  # r3's answer, given once
    # The database names the same replica, or none: that replica's refusal is the answer, once.
    for database in ([Location("r2", here)], [None]):
        written, lookups, _ = await _forward_from_cache(port, files, Location("r2", here, cached=True), database)
        assert lookups == ["site-b"] and [f.refused.reason for f in written] == [pb.Refused.SITE_OFFLINE]
    # A holder read from the database for this Open is not asked about again.
    written, lookups, _ = await _forward_from_cache(port, files, Location("r2", here), [])
    assert lookups == [] and [f.refused.reason for f in written] == [pb.Refused.SITE_OFFLINE]


async def test_a_cached_holder_that_is_gone_is_looked_up_again(forward_server: tuple[int, ClusterFiles]) -> None:
    port, files = forward_server
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: the replica the map names was killed
    written, lookups, forgotten = await _forward_from_cache(
        port, files, Location("r2", dead, cached=True), [Location("r3", f"127.0.0.1:{port}")]
    )
    assert lookups == ["site-b"] and forgotten == [("site-b", Location("r2", dead))]
    assert [f.refused.reason for f in written] == [pb.Refused.SITE_OFFLINE]  # from r3, the live one


class SilentReplica(NamedTuple):
    address: str
    forwards: list[str]  # the Forward calls it took (their origin's id)


@pytest.fixture
async def silent_replica(forward_server: tuple[int, ClusterFiles]) -> AsyncIterator[SilentReplica]:
    """A replica that takes a Forward call and never answers it, and whose Link call answers UNAVAILABLE (CI: a
    replica in the middle of a restart)."""
    _, files = forward_server
    forwards: list[str] = []

    async def never_answers(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        forwards.append(str(dict(context.invocation_metadata() or ()).get(ORIGIN, "")))
        async for _ in requests:
            pass
        await asyncio.Event().wait()

    async def unavailable(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return b""

    server = grpc.aio.server()
    methods = {
        "Forward": grpc.stream_stream_rpc_method_handler(never_answers),
        "Link": grpc.unary_unary_rpc_method_handler(unavailable),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, methods)])
    port = server.add_secure_port("127.0.0.1:0", _server_credentials(files))
    await server.start()
    yield SilentReplica(f"127.0.0.1:{port}", forwards)
    await server.stop(None)


async def test_a_holder_that_never_answers_is_left_for_the_one_the_database_names(
    forward_server: tuple[int, ClusterFiles], silent_replica: SilentReplica, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The map names r2, which takes the call and says nothing; the site signed on at r3 meanwhile. The
    database is asked while r2 is silent, and the Open goes to r3 long before the answer timeout."""
    monkeypatch.setattr(forward_module, "HOLDER_CHECK_S", 0.2)
    port, files = forward_server
    live, silent = Location("r3", f"127.0.0.1:{port}"), Location("r2", silent_replica.address)
    started = time.monotonic()
    written, lookups, forgotten = await _forward_from_cache(
        port, files, Location("r2", silent_replica.address, cached=True), [live, live]
    )
    assert time.monotonic() - started < 3, "not the answer timeout (join timeout 5 s + margin)"
    assert silent_replica.forwards == ["r1"]
    assert [f.refused.reason for f in written] == [pb.Refused.SITE_OFFLINE]  # r3's answer, given once
    assert lookups == ["site-b", "site-b"] and forgotten == [("site-b", silent)]


async def test_a_silent_holder_the_database_still_names_is_waited_for(
    forward_server: tuple[int, ClusterFiles], silent_replica: SilentReplica, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its router may take up to the join timeout to join: the Open is not taken elsewhere while the database
    agrees that this replica holds the site; the answer timeout ends it."""
    monkeypatch.setattr(forward_module, "HOLDER_CHECK_S", 0.2)
    monkeypatch.setattr(forward_module, "ANSWER_MARGIN_S", -4.0)  # answer timeout: 5 - 4 = 1 s
    port, files = forward_server
    silent = Location("r2", silent_replica.address)
    written, lookups, _ = await _forward_from_cache(port, files, silent, [silent] * 10)
    assert [f.refused.reason for f in written] == [pb.Refused.SITE_OFFLINE]
    assert silent_replica.forwards == ["r1"], "one Forward call, to the replica the database names"
    assert 3 <= len(lookups) <= 6, "asked every 0.2 s while it waited, then gave up at the answer timeout"


async def test_a_replica_whose_cluster_port_is_unavailable_gets_no_forward_call(
    forward_server: tuple[int, ClusterFiles], silent_replica: SilentReplica
) -> None:
    """Its Link call failed UNAVAILABLE: no Forward call over the same channel (CI saw one wait out the answer
    timeout); the database is asked at once and the Open goes where it says."""
    port, files = forward_server
    forwarder = Forwarder(
        _credentials(files),
        "r1",
        max_frame_bytes=1 << 20,
        join_timeout_s=5,
        links=LinkPool(client_context(files.cert, files.key, files.ca_cert), max_frame_bytes=1 << 20),
    )

    async def relocate(site: str) -> Location | None:
        return Location("r3", f"127.0.0.1:{port}")

    forwarder.relocate = relocate
    forwarder.forget_holder = lambda site, where: None
    origin = _Origin()
    splice = Splice(ASSOC, "site-a", "site-b", "PACS", "WS", depth=2)
    holder = Location("r2", silent_replica.address, cached=True)
    try:
        await asyncio.wait_for(forwarder.run(origin, splice, pb.Frame.FromString(_open()).open, origin, holder), 10)  # type: ignore[arg-type]
    finally:
        await forwarder.close()
    assert silent_replica.forwards == [], "no Forward call to the replica that could not say its link port"
    assert [f.refused.reason for f in origin.written] == [pb.Refused.SITE_OFFLINE]  # r3's answer


# -- the origin's splice through a Forward call (fakes for the two calls) ----------------------------------


class FakeEnd:
    """One end of the origin's splice: `read` hands out queued frames, `write` can be held shut."""

    def __init__(self, frames: list[bytes], *, end: object = grpc.aio.EOF) -> None:
        self.frames = list(frames)
        self.end = end
        self.reads = 0
        self.written: list[bytes] = []
        self.open = asyncio.Event()
        self.open.set()
        self.finished = asyncio.Event()

    async def read(self) -> object:
        if not self.frames:
            await self.finished.wait()
            if isinstance(self.end, BaseException):
                raise self.end
            return self.end
        self.reads += 1
        return self.frames.pop(0)

    async def write(self, frame: bytes) -> None:
        await self.open.wait()
        self.written.append(frame)

    async def done_writing(self) -> None:
        self.finished.set()


def _data(seq: int) -> bytes:
    return pb.Frame(data=pb.Data(payload=b"x" * 100, seq=seq)).SerializeToString()


async def test_a_slow_router_holds_the_replica_call_back() -> None:
    """Frames from the holding replica are read only as fast as the initiating router takes them."""
    splice = Splice(ASSOC, "site-a", "site-b", "PACS", "WS", depth=2)
    router = FakeEnd([])
    router.open.clear()  # router A reads nothing for now
    replica = FakeEnd([_data(i) for i in range(50)])
    task = asyncio.create_task(_splice_through(splice, router, replica))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert replica.reads <= 2 + 2, "more frames read from the replica than the channel and one write hold"
    router.open.set()
    replica.finished.set()  # the replica's call ends after its frames
    router.finished.set()
    await asyncio.wait_for(task, 5)
    assert router.written == [_data(i) for i in range(50)]  # all of them, in order, as sent


async def test_a_failed_replica_call_aborts_the_initiating_router() -> None:
    splice = Splice(ASSOC, "site-a", "site-b", "PACS", "WS", depth=2)
    router = FakeEnd([])
    replica = FakeEnd([_data(0)], end=RuntimeError("replica killed"))
    replica.finished.set()
    await asyncio.wait_for(_splice_through(splice, router, replica), 5)  # type: ignore[arg-type]
    assert router.written[0] == _data(0)
    last = pb.Frame.FromString(router.written[-1])
    assert last.close.reason == pb.Close.ABORTED and "site-b" in last.close.detail


def test_cluster_cert_makes_the_files_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography import x509

    from relay_bridge.cli import main

    assert main(["cluster-cert", "--dir", str(tmp_path)]) == 0
    for name in ("cluster-ca.key", "cluster.key"):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, f"{name} must be owner-only"
    cert = x509.load_pem_x509_certificate((tmp_path / "cluster.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["relay-cluster"]
    before = (tmp_path / "cluster.pem").read_bytes()
    assert main(["cluster-cert", "--dir", str(tmp_path)]) == 1  # never overwritten by accident
    assert "use --force" in capsys.readouterr().err
    assert (tmp_path / "cluster.pem").read_bytes() == before
    assert main(["cluster-cert", "--dir", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "cluster.pem").read_bytes() != before


async def test_after_a_direct_join_the_holder_is_let_go_soon_and_never_after_the_end() -> None:
    """The end mark to the holding replica goes LET_GO_AFTER_S after a direct join, or when the association
    ends if that is sooner: a link closed without it would read as cut there (a failed association)."""
    forwarder = Forwarder(grpc.ssl_channel_credentials(), "r1", max_frame_bytes=1 << 20, join_timeout_s=5)
    op = pb.Frame.FromString(_open()).open
    for lasts, marked_while_running in ((0.0, False), (LET_GO_AFTER_S * 3, True)):
        link = FakeEnd([])
        seen_while_running: list[bool] = []

        async def splice_here(
            splice: Splice,
            context: object,
            lasts: float = lasts,
            link: FakeEnd = link,
            seen: list[bool] = seen_while_running,
        ) -> None:
            await asyncio.sleep(lasts)
            seen.append(link.finished.is_set())

        service = SimpleNamespace(splice_here=splice_here)
        splice = Splice(ASSOC, "site-a", "site-b", "PACS", "WS", depth=2)
        await asyncio.wait_for(
            forwarder._spliced_directly(service, splice, op, None, Location("r2", "127.0.0.1:1"), link),  # type: ignore[arg-type]
            5,
        )
        assert seen_while_running == [marked_while_running]
        assert link.finished.is_set()  # the end mark went, before the caller closes the link

"""The bridge's directory carries service grants: stored per device, sanitised when published,
and each router is sent only the services granted to it (issue 18)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import directory as directory_module
from relay_bridge.config import BridgeConfig, ServerSection
from relay_bridge.control import published, published_grants
from relay_bridge.db import migrations
from relay_bridge.directory import Device, Directory
from relay_bridge.server import RelayServicer

QR = ("verification", "query", "retrieve")


@pytest.fixture
async def servicer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RelayServicer]:
    monkeypatch.setattr(directory_module, "SCRYPT_N", 2**10)
    servicer = RelayServicer(BridgeConfig(server=ServerSection(insecure=True)), Directory(tmp_path / "b.sqlite3"))
    yield servicer
    servicer.directory.close()


async def test_each_site_is_sent_its_own_services_and_nothing_for_a_site_granted_nothing(
    servicer: RelayServicer,
) -> None:
    d = servicer.directory.sync
    for name in ("a", "b", "c", "d", "e"):
        d.add_router(name, "long enough password")
    grants = (("*", QR), ("c", ("storage",)), ("d", ()))
    d.publish("b", [Device("b", "ORTHANC", "archive", ("a", "c", "d"), grants)])
    d.publish("e", [Device("e", "OLD", "", ("*",))])  # a router that predates service groups
    seen = {}
    for site in ("a", "c", "d"):
        listing = await servicer.control.directory_for(site)
        seen[site] = {(x.site, x.ae_title): tuple(x.services) for x in listing.devices}
    assert seen["a"] == {("b", "ORTHANC"): QR, ("e", "OLD"): ()}
    assert seen["c"] == {("b", "ORTHANC"): ("storage",), ("e", "OLD"): ()}
    assert seen["d"] == {("e", "OLD"): ()}  # granted nothing on ORTHANC: not listed


def test_published_grants_are_bounded_and_malformed_ones_only_narrow() -> None:
    device = pb.SharedDevice(
        ae_title="PACS",
        share_with=["*"],
        grants=[
            pb.ServiceGrant(site="*", services=["query", "Bad Name\x1b[31m", "query"]),
            pb.ServiceGrant(site="not a site!", services=["storage"]),
            pb.ServiceGrant(site="*", services=["storage"]),  # a second grant for the same site is ignored
            pb.ServiceGrant(site="c", services=["storage"] * 40),
        ],
    )
    assert published_grants(device) == (("*", ("query",)), ("c", ("storage",)))
    (stored,) = published("b", [device])
    assert stored.services_for("x") == ("query",) and stored.services_for("c") == ("storage",)
    assert Device("b", "OLD", "", ("*",)).services_for("x") is None


def test_grants_survive_the_database_and_an_old_database_gets_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    Directory(path).close()
    db = sqlite3.connect(path)  # back to schema version 2: before service groups
    db.executescript(
        "ALTER TABLE devices DROP COLUMN services; DROP TABLE replicas; DROP TABLE presence;"  # steps 3 and 4
        " DROP TABLE sign_on_failures; DROP TABLE association_leases;"  # step 5
        " DELETE FROM schema_version WHERE version >= 3;"
    )
    db.close()
    d = Directory(path)
    assert d.schema_change == (2, migrations.LATEST)  # migration step 3 added the column (and the later steps ran)
    d.add_router("b", "long enough password")
    d.publish("b", [Device("b", "PACS", "", ("a",), (("*", QR), ("a", ("storage",))))])
    d.close()
    d = Directory(path)
    (device,) = d.devices()
    assert device.grants == (("*", QR), ("a", ("storage",)))
    d.close()

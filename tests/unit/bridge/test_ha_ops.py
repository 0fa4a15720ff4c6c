"""Unit tests of the HA operations pieces: migration script splitting, the replica listing, the
directory watcher's account check, the cluster-limit refusal and the drain's Move."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import admission
from relay_bridge.cluster_status import render_replicas
from relay_bridge.db import migrations
from relay_bridge.db.notify import DirectoryWatcher
from relay_bridge.db.postgres import DatabaseUnavailable
from relay_bridge.directory import Router
from relay_bridge.lifecycle import move
from relay_bridge.sessions import RouterSession


def test_a_semicolon_inside_a_function_body_does_not_end_the_statement() -> None:
    statements = migrations._split(
        "CREATE TABLE t (a INT);\nCREATE FUNCTION f() RETURNS trigger AS $fn$ BEGIN x; y; END $fn$;\nSELECT 1"
    )
    assert statements == [
        "CREATE TABLE t (a INT)",
        "CREATE FUNCTION f() RETURNS trigger AS $fn$ BEGIN x; y; END $fn$",
        "SELECT 1",
    ]
    step5 = next(s for s in migrations.STEPS if s.version == 5)
    assert "pg_notify" not in step5.sqlite and "DOUBLE PRECISION" not in step5.sqlite
    assert sum("CREATE TRIGGER" in s for s in migrations._split(step5.postgresql)) == 4


def test_the_replica_listing_says_live_draining_and_lost() -> None:
    now = 1_000_000.0
    text = render_replicas(
        [
            {"id": "r1", "address": "10.0.0.1:7443", "started": now - 60, "lease_until": now + 10, "sites": ["a", "b"]},
            {"id": "r2", "lease_until": now + 10, "draining": True, "associations": 3},
            {"id": "r3", "lease_until": now - 30, "sites": 0},
            {"id": "r4\x1b[31m", "leased_associations": 2},
        ],
        now=now,
    )
    lines = text.splitlines()
    assert lines[0] == "4 replica(s) in the database:"
    assert "r1  live, up 60 s" in lines[1] and "sites 2 (a, b)" in lines[1]
    assert "r2  draining" in lines[2] and "associations 3" in lines[2]
    assert "r3  LOST (lease ran out 30 s ago)" in lines[3]
    assert "\x1b" not in lines[4] and "associations 2" in lines[4]
    assert render_replicas("cannot read the replicas from the database: refused").startswith("replicas: cannot")


@dataclass
class _Directory:
    accounts: list[Router]
    fail: bool = False

    async def routers(self) -> list[Router]:
        if self.fail:
            raise DatabaseUnavailable("the PostgreSQL database is unavailable: connection refused")
        return self.accounts


@dataclass
class _State:
    directory: _Directory
    sessions: dict[str, RouterSession] = field(default_factory=dict)


async def test_the_watcher_cuts_only_disabled_or_removed_routers_and_survives_the_database() -> None:
    directory = _Directory([Router("on", True, 0.0, None), Router("off", False, 0.0, None)])
    state = _State(directory, {n: RouterSession(n, n, "peer") for n in ("on", "off", "gone")})
    cut: list[str] = []

    async def cut_session(session: RouterSession) -> None:
        cut.append(session.name)
        session.end()

    watcher = DirectoryWatcher(state, refresh=lambda: None, cut=cut_session)  # type: ignore[arg-type]
    await watcher.check_accounts()
    assert sorted(cut) == ["gone", "off"]
    directory.fail = True
    await watcher._guarded(watcher.check_accounts(), "checking the accounts")  # logged, not raised
    assert not state.sessions["on"].ended.is_set()


async def test_notices_wake_the_watcher_once_for_a_burst() -> None:
    refreshed: list[int] = []
    state: Any = _State(_Directory([]))
    watcher = DirectoryWatcher(state, refresh=lambda: refreshed.append(1), cut=lambda s: asyncio.sleep(0))
    task = asyncio.create_task(watcher._react_forever())
    for payload in ("table:devices", "table:shares", "router:a"):
        watcher.notified(payload)
    await asyncio.sleep(0.2)
    task.cancel()
    assert refreshed == [1] and watcher.notices == 3


def test_a_cluster_limit_refusal_is_overloaded_and_names_the_limit() -> None:
    out = admission.over_cluster_limit("site-a", "out")
    assert out.code == pb.Refused.OVERLOADED and "max_associations_per_router" in out.detail
    assert "max_inbound_per_router" in admission.over_cluster_limit("site-b", "in").detail


async def test_move_is_sent_before_the_session_ends() -> None:
    session = RouterSession("site-a", "token", "peer")
    move(session)
    first = session.outbox.get_nowait()
    assert first is not None and first.HasField("move") and first.move.reason == "draining"
    assert session.outbox.get_nowait() is None and session.ended.is_set()

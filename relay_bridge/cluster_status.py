"""`relay-bridge status` on PostgreSQL: every replica of the cluster, read from the database.

The status file describes the replica on this host; the other replicas are in the database:
the `replicas` table (id, address, started, lease, draining, sites held, load; written by each
replica, relay_bridge.cluster) and this module's own `association_leases` (associations each
replica runs, migration step 5). A replica whose lease has run out is shown as lost: it stopped
without deregistering (killed), and its rows expire. Read-only, one short connection; a
database that cannot be reached is reported, not fatal (the local status still prints).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from relay_common.errors import RelayError
from relay_common.metrics import format_age
from relay_common.validate import printable


async def _read(url: str, password_file: Path | None) -> list[dict[str, Any]]:
    from relay_bridge.db.postgres import PostgresDirectory

    db = await PostgresDirectory.open(url, password_file=password_file, max_size=1, check_schema=False)
    try:
        has_replicas = (await db._fetch("SELECT to_regclass('replicas') IS NOT NULL"))[0][0]
        rows: dict[str, dict[str, Any]] = {}
        if has_replicas:
            for (text,) in await db._fetch("SELECT row_to_json(r)::text FROM replicas r ORDER BY id"):
                row = json.loads(text)
                rows[str(row.get("id"))] = row
        has_presence = (await db._fetch("SELECT to_regclass('presence') IS NOT NULL"))[0][0]
        if has_presence:  # the sites each replica holds, by name (the replicas row counts them only)
            held = await db._fetch(
                "SELECT replica, site FROM presence WHERE lease_until > extract(epoch from clock_timestamp())"
                " ORDER BY replica, site"
            )
            for replica, site in held:
                row = rows.setdefault(replica, {"id": replica})
                if not isinstance(row.get("sites"), list):
                    row["sites"] = []
                row["sites"].append(site)
        has_leases = (await db._fetch("SELECT to_regclass('association_leases') IS NOT NULL"))[0][0]
        if has_leases:
            leases = await db._fetch(
                "SELECT replica, count(DISTINCT association_id) FROM association_leases"
                " WHERE lease_until > extract(epoch from clock_timestamp()) GROUP BY replica"
            )
            for replica, count in leases:
                rows.setdefault(replica, {"id": replica})["leased_associations"] = int(count)
        return [rows[k] for k in sorted(rows)]
    finally:
        await db.aclose()


def read_replicas(url: str, password_file: Path | None) -> list[dict[str, Any]] | str:
    """The replicas as rows (dicts), or why they could not be read (one line)."""
    try:
        return asyncio.run(_read(url, password_file))
    except RelayError as exc:
        return f"cannot read the replicas from the database: {exc}"


def _sites(value: object) -> str:
    if isinstance(value, list):
        return f"{len(value)} ({', '.join(printable(v, 20) for v in value[:5])}{', ...' if len(value) > 5 else ''})"
    return printable(value) if value is not None else "-"


def render_replicas(replicas: list[dict[str, Any]] | str, now: float | None = None) -> str:
    """The replicas as a few text lines (health from the lease, draining, sites held, load)."""
    if isinstance(replicas, str):
        return printable(f"replicas: {replicas}")
    if not replicas:
        return "replicas: none registered"
    now = time.time() if now is None else now
    lines = [f"{len(replicas)} replica(s) in the database:"]
    for r in replicas:
        lease = r.get("lease_until")
        if lease is None:
            health = "unregistered (leases only)"
        elif float(lease) > now:
            health = "draining" if r.get("draining") else "live"
        else:
            health = f"LOST (lease ran out {format_age(now - float(lease))} ago)"
        started = r.get("started")
        up = f", up {format_age(now - float(started))}" if started else ""
        load = r.get("associations", r.get("leased_associations", 0))
        lines.append(
            printable(
                f"  {r.get('id')}  {health}{up}; address {r.get('address', '-')}; sites {_sites(r.get('sites'))}; "
                f"associations {load}"
            )
        )
    return "\n".join(lines)

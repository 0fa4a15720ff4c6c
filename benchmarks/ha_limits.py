"""What cluster-wide state costs on PostgreSQL: association leases, the shared sign-on count, NOTIFY.

    .venv/bin/python -m benchmarks.ha_limits [--repeats 300]

A throwaway PostgreSQL cluster (tests/support/postgres.py: initdb, fsync off, loopback) and two
"replicas" (two connection pools, as two bridge processes would have):
- lease: `SharedAssociationLeases.acquire` + `release` per association: what each Open adds to
  setup on PostgreSQL (release runs after the association, off its path; shown apart);
- sign-on: `SharedSignOnCounts.begin` + `succeeded`: what a sign-on adds before and after scrypt;
- notify: a router disabled through one pool until the LISTEN connection of the other replica
  receives the notice (the part of "a change reaches every replica within 2 s" that the database
  decides; the replica then coalesces for 50 ms and re-reads).
Results: benchmarks/results/<date>-ha-limits.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time

import psycopg

from benchmarks.common import summary, write_results
from relay_bridge.db.postgres import PostgresDirectory
from relay_bridge.db.shared_limits import SharedAssociationLeases, SharedSignOnCounts
from tests.support.postgres import PostgresCluster, postgres_bindir


async def _measure(cluster: PostgresCluster, repeats: int) -> dict[str, dict[str, float]]:
    url = cluster.create_database()
    one = await PostgresDirectory.open(url, password_file=cluster.password_file, check_schema=False)
    await one.upgrade()
    two = await PostgresDirectory.open(url, password_file=cluster.password_file)
    try:
        leases = SharedAssociationLeases(one, "replica-1", max_out=10_000, max_in=10_000)
        acquire, release = [], []
        for _ in range(repeats):
            aid = secrets.token_hex(16)
            started = time.perf_counter()
            assert await leases.acquire(aid, "site-a", "site-b") is None
            acquire.append(time.perf_counter() - started)
            started = time.perf_counter()
            await leases.release(aid)
            release.append(time.perf_counter() - started)

        counts = SharedSignOnCounts(one, limit=5, window_s=60)
        sign_on = []
        for i in range(repeats):
            attempt = secrets.token_hex(8)
            started = time.perf_counter()
            assert await counts.begin(attempt, (f"account:site-{i}", f"source:10.0.{i // 250}.{i % 250}"))
            await counts.succeeded(attempt)
            sign_on.append(time.perf_counter() - started)

        await one.add_router("site-n")
        listener = await psycopg.AsyncConnection.connect(url, password=cluster.password, autocommit=True)
        notify = []
        async with listener:
            await listener.execute("LISTEN relay_directory")
            notices = listener.notifies()
            for i in range(min(repeats, 200)):
                started = time.perf_counter()
                await two.set_enabled("site-n", i % 2 == 0)
                notice = await anext(notices)
                assert notice.payload == "router:site-n"
                notify.append(time.perf_counter() - started)
            await notices.aclose()  # it holds the connection: close it before the connection closes
    finally:
        await one.aclose()
        await two.aclose()
    return {
        "lease_acquire_ms": _ms(acquire),
        "lease_release_ms": _ms(release),
        "sign_on_count_ms": _ms(sign_on),
        "notify_ms": _ms(notify),
    }


def _ms(samples: list[float]) -> dict[str, float]:
    return {k: (v * 1000 if k != "n" else v) for k, v in summary(samples).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args(argv)
    bindir = postgres_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL is not installed (Debian: apt-get install -y postgresql)")
    cluster = PostgresCluster(bindir).start()
    try:
        results = asyncio.run(_measure(cluster, args.repeats))
    finally:
        cluster.stop()
    rows = [
        ("lease: acquire (each Open adds this to setup)", "lease_acquire_ms"),
        ("lease: release (after the association)", "lease_release_ms"),
        ("sign-on: shared count begin + succeeded", "sign_on_count_ms"),
        ("NOTIFY: write on one pool -> LISTEN of another", "notify_ms"),
    ]
    table = [
        f"# Cluster-wide state on PostgreSQL (loopback, fsync off), {args.repeats} repeats",
        "",
        "| what | median ms | p90 ms | max ms | n |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, key in rows:
        r = results[key]
        table.append(f"| {label} | {r['median']:.2f} | {r['p90']:.2f} | {r['max']:.2f} | {int(r['n'])} |")
    table += [
        "",
        "One 2-core machine shared with other work runs PostgreSQL and the client (loopback). Across a",
        "network each line pays round trips: a lease is about 6 (the pool's connection check, BEGIN, both",
        "advisory locks, both counts, both rows, COMMIT), so with a 1 ms RTT to a managed database it adds",
        "about 6 ms to association setup.",
    ]
    json_path, md_path = write_results("ha-limits", {"repeats": args.repeats, "results": results}, "\n".join(table))
    print("\n".join(table))
    print(f"\n{json_path}\n{md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

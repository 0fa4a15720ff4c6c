"""``relay-router spool list|retry|purge``: inspect the accelerated routes' spool and replay its dead letters.

``list`` reads the entries from disk, so it works whether the router runs or
not. ``retry`` and ``purge`` change the spool: when no router holds it they
open it and act at once; when the serving router holds it (its lock) they leave
a request in ``<spool>/requests/`` that the router carries out within a second
or two, so the router's own view never goes stale.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from relay_common.validate import printable

if TYPE_CHECKING:  # the spool imports pydicom: loaded only when a spool command runs, not for every CLI call
    import argparse

    from relay_router.accel.spool import SpoolEntry
    from relay_router.config import RouterConfig

__all__ = ["add_spool_parser", "configured_spool", "spool_check", "spool_command", "status_lines"]

SPOOL_WARN_FILL = 0.8  # the monitoring plugin warns from here: senders get A700 at 1.0

STATES = ("received", "sending", "forwarded", "delivered", "retry", "dead")  # EntryState values (a unit test checks)
DEFAULT_SPOOL_SUBDIR = "spool"  # under router.state_dir, unless [accelerate] spool_dir says otherwise


def configured_spool(config: RouterConfig) -> tuple[Path, int | None]:
    """The spool directory and byte limit: ``[accelerate] spool_dir`` / ``spool_max_bytes``, else STATE_DIR/spool."""
    accelerate = getattr(config, "accelerate", None)
    directory = getattr(accelerate, "spool_dir", None)
    limit = getattr(accelerate, "spool_max_bytes", None)
    root = Path(directory) if directory else config.router.state_dir / DEFAULT_SPOOL_SUBDIR
    return root, int(limit) if limit else None


def add_spool_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    spool = sub.add_parser("spool", help="the accelerated routes' spool: list entries, retry or purge dead letters")
    spool.add_argument("--spool-dir", type=Path, help="the spool (default: [accelerate] spool_dir, or STATE_DIR/spool)")
    actions = spool.add_subparsers(dest="spool_action", required=True)
    listing = actions.add_parser("list", help="entries waiting, being delivered or dead (default: all)")
    listing.add_argument("--state", choices=STATES, help="only entries in this state")
    listing.add_argument("--route", help="only entries of this route (the remote device's AE title)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    for name, text in (
        ("retry", "deliver dead entries again (attempts reset)"),
        ("purge", "delete dead entries and their files"),
    ):
        action = actions.add_parser(name, help=text)
        which = action.add_mutually_exclusive_group(required=True)
        which.add_argument("entry_id", nargs="?", help="one entry id (from `spool list`)")
        which.add_argument("--all", action="store_true", help="every dead entry")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _row(entry: SpoolEntry, now: float) -> str:
    from relay_router.accel.spool import EntryState

    waits = ""
    if entry.state is EntryState.RETRY:
        waits = f" next in {_age(max(0.0, entry.next_attempt - now))}"
    error = f"  {printable(entry.last_error)}" if entry.last_error else ""
    return (
        f"{entry.id}  {printable(entry.route):<16} {entry.state:<9} attempts {entry.attempts:<3} "
        f"{entry.size:>10} B  age {_age(now - entry.created):>5}{waits}  {entry.sop_instance_uid}{error}"
    )


def _owner_check(root: Path) -> str | None:
    """A spool changed by another user (root) would hold files the router cannot read: refuse that."""
    try:
        owner = root.stat().st_uid
    except FileNotFoundError:
        return f"no spool at {root}"
    if owner != os.geteuid():
        return f"{root} belongs to uid {owner}: run this as the router's service user"
    return None


def spool_command(config: RouterConfig, args: argparse.Namespace) -> int:
    from relay_router.accel.metrics import spool_status
    from relay_router.accel.spool import Spool, SpoolBusy, SpoolError, read_entries, request_action

    root, limit = configured_spool(config)
    if args.spool_dir is not None:
        root = args.spool_dir
    if args.spool_action == "list":
        if not (root / "entries").is_dir():
            print(f"no spool at {root}", file=sys.stderr)
            return 1
        entries = [
            e
            for e in read_entries(root)
            if (args.state is None or e.state == args.state) and (args.route is None or e.route == args.route)
        ]
        if args.json:
            report = spool_status(root, limit, dead_listed=0)
            report["listed"] = [json.loads(e.to_json()) for e in entries]
            print(json.dumps(report, indent=2, sort_keys=True))
            return 0
        now = time.time()
        for line in status_lines(spool_status(root, limit, dead_listed=0)):
            print(line)
        for entry in entries:
            print(_row(entry, now))
        return 0
    problem = _owner_check(root)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    entry_id = None if args.all else args.entry_id
    logging.getLogger("relay_router.accel.spool").setLevel(logging.WARNING)  # not "spool opened" on the terminal
    try:
        spool = Spool(root, max_bytes=1 << 62, journal=False)  # limit and journal matter to writers only
    except SpoolBusy:
        try:
            request_action(root, args.spool_action, entry_id)
        except SpoolError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"{args.spool_action} of {entry_id or 'every dead entry'} handed to the running router")
        return 0
    try:
        count = spool.retry(entry_id) if args.spool_action == "retry" else spool.purge(entry_id)
    except SpoolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        spool.close()
    done = "will be delivered when the router runs" if args.spool_action == "retry" else "deleted"
    print(f"{count} dead {'entry' if count == 1 else 'entries'} {done}")
    return 0


def status_lines(report: dict[str, object]) -> list[str]:
    """The spool in `relay-router status`: fill, counts by state, the dead letters."""
    counts = report["entries"]
    assert isinstance(counts, dict)
    used, limit = report["bytes_used"], report["max_bytes"]
    fill = f"{used} of {limit} bytes" if limit else f"{used} bytes"
    states = ", ".join(f"{state} {count}" for state, count in counts.items() if count)
    lines = [f"spool {report['dir']}: {fill}; {states or 'empty'}"]
    dead = report.get("dead") or []
    assert isinstance(dead, list)
    if counts.get("dead"):
        lines.append(f"DEAD LETTERS: {counts['dead']} (relay-router spool list --state dead; spool retry|purge)")
    for item in dead:
        lines.append(
            f"  dead {item['id']} {printable(str(item['route']))} {item['sop_instance_uid']}: "
            f"{printable(str(item['error']))}"
        )
    return lines


def spool_check(report: dict[str, object]) -> tuple[bool, str, list[tuple[str, int, int | None]]]:
    """For `relay-router check`: (warn?, text, perfdata (label, value, maximum)) from a spool report."""
    counts = report["entries"]
    assert isinstance(counts, dict)
    dead = int(counts.get("dead", 0))
    used = int(report["bytes_used"])  # type: ignore[call-overload]
    limit = report["max_bytes"]
    limit = int(limit) if isinstance(limit, int) and limit > 0 else None
    texts = []
    if dead:
        texts.append(
            f"{dead} dead letter{'s' if dead != 1 else ''} in the spool (relay-router spool list --state dead)"
        )
    if limit and used >= SPOOL_WARN_FILL * limit:
        texts.append(f"spool {100 * used // limit}% full (A700 to senders at 100%)")
    return bool(texts), "; ".join(texts), [("spool_dead", dead, None), ("spool_bytes", used, limit)]

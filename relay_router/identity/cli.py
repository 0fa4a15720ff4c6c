"""relay-router pix add|list|remove|import: manage the cross-reference table by hand or from CSV.

Each change is audited in the router's own audit trail (the IDs are PHI: they stay in the
hospital). The running router sees a change at its next lookup (SQLite's data_version) and
drops its cached answers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from relay_common.audit import admin_event
from relay_common.daemon import OwnershipError, become_state_owner
from relay_router.identity.model import IdentityError, PatientRef
from relay_router.identity.sources import table_path
from relay_router.identity.xref import XrefError, XrefTable, read_csv

if TYPE_CHECKING:
    from relay_router.config import RouterConfig

MAX_CSV_BYTES = 256 * 1024 * 1024


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pix = sub.add_parser("pix", help="the patient cross-reference table (issue 14): add, list, remove, import")
    actions = pix.add_subparsers(dest="pix_command", required=True)
    add = actions.add_parser("add", help="link one of our patient IDs to the partner's ID for the same person")
    add.add_argument("local_id", help="the Patient ID in this hospital's domain")
    add.add_argument("other_id", help="the same person's Patient ID in the partner's domain")
    add.add_argument("--other-issuer", required=True, help="the partner's Issuer of Patient ID")
    add.add_argument("--local-issuer", help="default: [identity] issuer")
    add.add_argument("--replace", action="store_true", help="replace a link to another ID of the same domain")
    listing = actions.add_parser("list", help="print the links")
    listing.add_argument("--id", default="", help="only links with this Patient ID (either side)")
    listing.add_argument("--issuer", default="", help="only links with this issuer (either side)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    remove = actions.add_parser("remove", help="remove a link, or every link of one of our patients")
    remove.add_argument("local_id")
    remove.add_argument("other_id", nargs="?", help="omit to remove every link of local_id")
    remove.add_argument("--other-issuer", help="the partner's issuer (required with other_id)")
    remove.add_argument("--local-issuer", help="default: [identity] issuer")
    load = actions.add_parser(
        "import", help="add links from CSV (header: local_id,other_id,other_issuer[,local_issuer]); all or none"
    )
    load.add_argument("file", type=Path, help="the CSV file ('-' for standard input)")
    load.add_argument("--replace", action="store_true", help="replace links to other IDs of the same domains")


def run(cfg: RouterConfig, args: argparse.Namespace) -> int:
    path = table_path(cfg.identity, cfg.router.state_dir)
    command: str = args.pix_command
    if command == "list" and not path.exists():
        print("[]" if args.json else f"no cross-reference table yet ({path})")
        return 0
    try:
        notice = become_state_owner(cfg.router.state_dir.resolve(), files=(path,) if path.exists() else ())
    except OwnershipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if notice:
        print(notice, file=sys.stderr)
    table = XrefTable(path)
    try:
        if command == "list":
            return _list(table, args)
        return _change(cfg, table, args)
    except (XrefError, IdentityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        _audit(cfg, f"pix_{command}", "failure", detail=str(exc))
        return 1
    finally:
        table.close()


def _local_issuer(cfg: RouterConfig, args: argparse.Namespace) -> str:
    issuer: str = getattr(args, "local_issuer", None) or cfg.identity.issuer
    if not issuer:
        raise XrefError("no local issuer: set [identity] issuer in router.toml or pass --local-issuer")
    return issuer


def _change(cfg: RouterConfig, table: XrefTable, args: argparse.Namespace) -> int:
    command: str = args.pix_command
    if command == "add":
        local = PatientRef(args.local_id, _local_issuer(cfg, args))
        other = PatientRef(args.other_id, args.other_issuer)
        added = table.add(local, other, origin="cli", replace=args.replace)
        _audit(cfg, "pix_add", "success", patient_id=local.id, issuer=local.issuer, other_id=other.id,
               other_issuer=other.issuer, replace=args.replace or None)  # fmt: skip
        print(f"linked {local} <-> {other}" if added else f"{local} <-> {other} was already linked")
        return 0
    if command == "remove":
        local = PatientRef(args.local_id, _local_issuer(cfg, args))
        partner: PatientRef | None = None
        if args.other_id is not None:
            if not args.other_issuer:
                raise XrefError("--other-issuer is required with other_id")
            partner = PatientRef(args.other_id, args.other_issuer)
        removed = table.remove(local, partner)
        _audit(cfg, "pix_remove", "success", patient_id=local.id, issuer=local.issuer,
               other_id=partner.id if partner else None, other_issuer=partner.issuer if partner else None,
               removed=removed)  # fmt: skip
        print(f"removed {removed} link{'s' if removed != 1 else ''}")
        return 0 if removed else 1
    text = _read_csv_text(args.file)
    links = read_csv(text, local_issuer=cfg.identity.issuer)
    count = table.add_many(links, origin="import", replace=args.replace)
    _audit(cfg, "pix_import", "success", file=str(args.file), rows=len(links), added=count)
    print(f"imported {len(links)} rows from {args.file}: {count} new links")
    return 0


def _read_csv_text(file: Path) -> str:
    raw = sys.stdin.buffer.read(MAX_CSV_BYTES + 1) if str(file) == "-" else _read_limited(file)
    if len(raw) > MAX_CSV_BYTES:
        raise XrefError(f"{file}: larger than {MAX_CSV_BYTES // (1024 * 1024)} MiB; split it")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise XrefError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_limited(file: Path) -> bytes:
    try:
        with file.open("rb") as f:
            return f.read(MAX_CSV_BYTES + 1)
    except OSError as exc:
        raise XrefError(f"cannot read {file}: {exc.strerror}") from None


def _list(table: XrefTable, args: argparse.Namespace) -> int:
    links = table.links(patient_id=args.id, issuer=args.issuer)
    if args.json:
        rows = [
            {"local_id": x.local.id, "local_issuer": x.local.issuer, "other_id": x.other.id,
             "other_issuer": x.other.issuer, "origin": x.origin, "added": x.added}
            for x in links
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return 0
    if not links:
        print("no links")
        return 0
    print(f"{'local':<32} {'other':<32} {'origin':<7} added")
    for x in links:  # every value was checked on its way in: no control characters
        print(f"{x.local!s:<32} {x.other!s:<32} {x.origin:<7} {x.added}")
    return 0


def _audit(cfg: RouterConfig, event: str, outcome: str, **fields: object) -> None:
    admin_event(cfg.audit, app="relay-router", event=event, outcome=outcome, site=cfg.router.name, **fields)

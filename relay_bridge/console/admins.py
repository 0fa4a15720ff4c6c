"""Admin accounts of the bridge console: scrypt hashes in a JSON file beside the database.

The file (`[console] admins_file`; default `<database>.admins.json`, with PostgreSQL
`<state_dir>/bridge.admins.json`) is owner-only and holds, per account,
the scrypt hash (RFC 7914, the cost the router accounts use), its salt and its parameters. It is read
again when it changes, so `relay-bridge admin add|remove` takes effect without a restart.
"""

from __future__ import annotations

import argparse
import getpass
import hmac
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from relay_common.files import write_private

if TYPE_CHECKING:
    from relay_bridge.config import BridgeConfig

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
ADMIN_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
ADMIN_NAME_RULE = "1-63 characters of a-z, 0-9, '.', '_' or '-' (starting with a letter or digit)"
MIN_PASSWORD = 12
MAX_PASSWORD = 1024


class AdminError(ValueError):
    """A refused admin-account change (the message says what to fix)."""


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password.encode("utf-8"))


class AdminAccounts:
    """The accounts file; `verify` is CPU-bound (about 50 ms): call it off the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: tuple[float, dict[str, Any]] | None = None
        # Verifying an unknown name costs as much as a known one: timing does not tell which names exist.
        self._dummy = {"salt": secrets.token_hex(16), "hash": "00" * 32, "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}

    def _load(self) -> dict[str, Any]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return {}
        if self._cache is None or self._cache[0] != mtime:
            data = json.loads(self.path.read_text())
            self._cache = (mtime, dict(data.get("admins", {})))
        return self._cache[1]

    def names(self) -> list[str]:
        return sorted(self._load())

    def verify(self, name: str, password: str) -> bool:
        try:
            accounts = self._load()
        except (OSError, ValueError):
            return False
        record = accounts.get(name, self._dummy)
        if len(password) > MAX_PASSWORD:
            return False
        derived = _derive(password, bytes.fromhex(record["salt"]), record["n"], record["r"], record["p"])
        return hmac.compare_digest(derived, bytes.fromhex(record["hash"])) and name in accounts

    def add(self, name: str, password: str) -> None:
        if not ADMIN_NAME.fullmatch(name):
            raise AdminError(f"admin name {name!r}: {ADMIN_NAME_RULE}")
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise AdminError(f"the password must have {MIN_PASSWORD} to {MAX_PASSWORD} characters")
        accounts = dict(self._load())
        salt = secrets.token_bytes(16)
        accounts[name] = {
            "salt": salt.hex(),
            "hash": _derive(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P).hex(),
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "created": round(time.time()),
        }
        self._save(accounts)

    def remove(self, name: str) -> None:
        accounts = dict(self._load())
        if accounts.pop(name, None) is None:
            raise AdminError(f"no admin account {name!r}")
        self._save(accounts)

    def _save(self, accounts: dict[str, Any]) -> None:
        write_private(self.path, json.dumps({"admins": accounts}, indent=1, sort_keys=True) + "\n")
        self._cache = None


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin = sub.add_parser("admin", help="manage the web console's admin accounts")
    asub = admin.add_subparsers(dest="action", required=True)
    add = asub.add_parser("add", help="create an account or set its password (prompted, or one line on stdin)")
    add.add_argument("name")
    asub.add_parser("remove", help="remove an account").add_argument("name")
    asub.add_parser("list", help="list the accounts")


def _read_new_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("new password: ")
    if getpass.getpass("again: ") != first:
        raise AdminError("the two passwords differ")
    return first


def admin_command(accounts: AdminAccounts, args: argparse.Namespace) -> int:
    """`relay-bridge admin add|remove|list`; raises AdminError with what to fix."""
    if args.action == "list":
        for name in accounts.names():
            print(name)
        return 0
    if args.action == "add":
        accounts.add(args.name, _read_new_password())
        print(f"admin {args.name!r} saved in {accounts.path}", file=sys.stderr)
    elif args.action == "remove":
        accounts.remove(args.name)
        print(f"admin {args.name!r} removed", file=sys.stderr)
    return 0


def default_path(database: Path) -> Path:
    return Path(f"{os.fspath(database)}.admins.json")


def run_admin(config: BridgeConfig, args: argparse.Namespace) -> int:
    """`relay-bridge admin ...` as the CLI runs it: audited, errors printed with what to fix (exit 1)."""
    from relay_common.audit import admin_event

    accounts = AdminAccounts(config.console.admins_file or default_path(config.storage.local_path))
    event = f"admin_{args.action}"
    try:
        status = admin_command(accounts, args)
    except (AdminError, OSError, ValueError) as exc:
        admin_event(
            config.audit,
            app="relay-bridge",
            event=event,
            outcome="failure",
            admin=getattr(args, "name", None),
            detail=str(exc),
        )
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.action != "list":
        admin_event(config.audit, app="relay-bridge", event=event, outcome="success", admin=args.name)
    return status

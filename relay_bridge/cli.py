"""relay-bridge: run and administer the bridge."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import re
import sys
from dataclasses import replace
from pathlib import Path

from relay_bridge import config as bridge_config
from relay_bridge.db.backend import SyncPostgresDirectory, open_admin_directory
from relay_bridge.directory import Directory
from relay_common.audit import AuditLog, admin_event
from relay_common.config import ConfigError
from relay_common.daemon import (
    OwnershipError,
    StartupError,
    announce_ready,
    audit_pem_problems,
    become_state_owner,
    interactive,
    listen_error,
    pem_problems,
    refuse_serve_as_root,
    run_until_signalled,
    spinner,
)
from relay_common.errors import RelayError
from relay_common.logs import setup_logging
from relay_common.metrics import package_version
from relay_common.pki import make_dev_pki
from relay_common.tlsreload import CertificateFilesError, add_reload_hook

log = logging.getLogger("relay_bridge")

CONFIG_TEMPLATE = """\
# dicom-relay bridge configuration (see deploy/bridge.example.toml for every key)
[server]
listen = "{listen}"
tls_cert = "server.pem"
tls_key = "server.key"

[storage]
database = "bridge.sqlite3"
"""
METRICS_TEMPLATE = """
[metrics]
# Prometheus metrics at http://HOST:PORT/metrics ("" turns them off)
listen = "{listen}"
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay-bridge", description="The dicom-relay bridge.")
    parser.add_argument("--version", action="version", version=f"relay-bridge (dicom-relay) {package_version()}")
    parser.add_argument(
        "--config", "-c", type=Path, default=Path("bridge.toml"), help="bridge.toml (default: %(default)s)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a development CA, a server certificate and bridge.toml")
    init.add_argument("--dir", type=Path, default=Path("."), help="where to write the files")
    init.add_argument("--hostname", action="append", default=[], help="DNS name in the certificate (repeatable)")
    init.add_argument("--ip", action="append", default=[], help="IP address in the certificate (repeatable)")
    init.add_argument("--listen", default="0.0.0.0:443", help="listen address written to bridge.toml")
    init.add_argument(
        "--metrics-listen",
        help='Prometheus endpoint written to bridge.toml ("" = off; default: none written, 127.0.0.1:9465 applies)',
    )
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.add_argument("--cluster", action="store_true", help="also make the cluster CA and certificate (replicas)")
    cluster_cert = sub.add_parser(
        "cluster-cert", help="make the cluster CA and the certificate replicas present to each other (mutual TLS)"
    )
    cluster_cert.add_argument("--dir", type=Path, default=Path("."), help="where to write the files")
    cluster_cert.add_argument("--force", action="store_true", help="overwrite existing files")

    serve = sub.add_parser("serve", help="run the bridge")
    serve.add_argument("--listen", help="override server.listen (HOST:PORT; port 0 picks one)")
    serve.add_argument("--insecure", action="store_true", help="plain-text gRPC (needs insecure = true too)")
    serve.add_argument("--ready-file", type=Path, help="write {'port': N} here once serving")

    sub.add_parser("check-config", help="validate bridge.toml and exit")
    status = sub.add_parser("status", help="routers signed on, devices and links, recent associations (a map)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("check", help="monitoring plugin (Nagios/Icinga): exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN")

    router = sub.add_parser("router", help="manage router accounts")
    rsub = router.add_subparsers(dest="action", required=True)
    add = rsub.add_parser("add", help="create an account; print its password and a one-time enrollment token")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument("--json", action="store_true", help="print {name, password, enrollment_token} as JSON")
    token = rsub.add_parser("enroll-token", help="issue a new one-time enrollment token (e.g. after reset-identity)")
    token.add_argument("name")
    rsub.add_parser("list", help="list accounts").add_argument("--json", action="store_true")
    for action in ("disable", "enable", "remove", "reset-identity"):
        rsub.add_parser(action, help=f"{action} an account").add_argument("name")
    pw = rsub.add_parser("passwd", help="set a new password (printed when generated)")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true")

    db = sub.add_parser("db", help="the directory database: schema status, upgrade, copy SQLite into PostgreSQL")
    dsub = db.add_subparsers(dest="action", required=True)
    dsub.add_parser("status", help="backend and schema version").add_argument("--json", action="store_true")
    dsub.add_parser("upgrade", help="apply the schema migrations this relay-bridge knows")
    copy = dsub.add_parser("copy", help="copy a SQLite directory into PostgreSQL (one transaction)")
    copy.add_argument("--from", dest="source", type=Path, required=True, help="the SQLite file")
    copy.add_argument("--to", help="postgresql://... URL (default: [storage] database)")
    copy.add_argument("--force", action="store_true", help="replace the rows of a non-empty target")

    share = sub.add_parser("share", help="inspect shared devices")
    ssub = share.add_subparsers(dest="action", required=True)
    ssub.add_parser("list", help="devices and who may reach them").add_argument("--json", action="store_true")
    from relay_bridge.console.admins import add_parser as add_admin_parser

    add_admin_parser(sub)  # relay-bridge admin add|remove|list: the web console's accounts
    return parser


def _read_password(from_stdin: bool) -> str | None:
    if not from_stdin:
        return None
    return sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass("password: ")


def _init(args: argparse.Namespace) -> int:
    directory: Path = args.dir.resolve()
    target = directory / "bridge.toml"
    if target.exists() and not args.force:
        print(f"{target} exists; use --force to overwrite", file=sys.stderr)
        return 1
    notice = become_state_owner(directory)  # as root in a directory of the service user: its files
    if notice:
        print(notice, file=sys.stderr)
    named = bool(args.hostname or args.ip)
    with spinner("generating the CA and the server certificate", enabled=interactive()):
        files = make_dev_pki(
            directory,
            hostnames=args.hostname if named else ["localhost"],
            ips=args.ip if named else ["127.0.0.1"],
        )
    config = CONFIG_TEMPLATE.format(listen=args.listen)
    if args.metrics_listen is not None:
        config += METRICS_TEMPLATE.format(listen=args.metrics_listen)
    target.write_text(config)
    print(f"wrote {files.ca_cert} (give this to every router), {files.server_cert}, {files.server_key}, {target}")
    print(f"keep {files.ca_key} off the bridge host once certificates are issued", file=sys.stderr)
    if args.cluster:
        return _cluster_cert(args)
    return 0


def _cluster_cert(args: argparse.Namespace) -> int:
    """The cluster CA and certificate (relay_bridge.cluster.pki), for the [cluster] section of every replica."""
    from relay_bridge.cluster.pki import make_cluster_pki

    directory: Path = args.dir.resolve()
    if (directory / "cluster.pem").exists() and not args.force:
        print(f"{directory / 'cluster.pem'} exists; use --force to overwrite", file=sys.stderr)
        return 1
    files = make_cluster_pki(directory)
    print(
        f"wrote {files.ca_cert}, {files.cert} and {files.key}:"
        " copy them to every replica ([cluster] ca, tls_cert, tls_key)"
    )
    print(f"keep {files.ca_key} off the replicas (it only makes new cluster certificates)", file=sys.stderr)
    return 0


async def _serve(cfg: bridge_config.BridgeConfig, args: argparse.Namespace) -> None:
    from relay_bridge.check import service_status_line
    from relay_bridge.lifecycle import drain, reload_certificates, shutdown_step
    from relay_bridge.server import start  # grpc is only needed to serve
    from relay_bridge.status import StatusWriter, status_path

    holder: dict[str, object] = {}

    async def begin() -> None:
        try:
            server, port, servicer = await start(cfg, insecure=args.insecure)
        except CertificateFilesError as exc:
            raise StartupError(f"cannot use the server certificate: {exc}") from exc
        except RelayError as exc:  # the database: unreachable, or a schema this bridge cannot use
            raise StartupError(str(exc)) from exc
        except (OSError, RuntimeError) as exc:
            bound = re.search(r"Failed to bind to address (\S+?);", str(exc))
            if bound is None and not isinstance(exc, OSError):
                raise
            raise listen_error(bound[1] if bound else cfg.server.listen, exc) from exc
        holder["server"], holder["servicer"] = server, servicer
        add_reload_hook(lambda: reload_certificates(servicer))  # SIGHUP
        log.info("bridge serving on %s (port %d, %s)", cfg.server.listen, port, "INSECURE" if args.insecure else "TLS")
        await servicer.metrics.start(cfg.metrics.listen)
        holder["metrics"] = servicer.metrics
        holder["status"] = writer = StatusWriter(servicer, status_path(cfg), port=port)
        await writer.start()
        from relay_bridge.console.app import BridgeConsole  # the web console ([console] listen; off by default)

        holder["console"] = console = BridgeConsole(servicer.state, port=port)
        await console.start()
        holder["audit"] = servicer.audit
        servicer.audit.event("start", "success", listen=cfg.server.listen)  # DICOM Application Activity
        announce_ready(
            args.ready_file, port=port, metrics_port=servicer.metrics.server.port, console_port=console.server.port
        )

    async def end() -> None:
        server = holder.get("server")
        if server is not None:
            # Refuse new work, let running associations finish, then stop (relay_bridge.lifecycle).
            # A single bridge has no other replica a load balancer could send routers to: no notice period.
            notice_s = cfg.server.drain_notice_s if cfg.cluster.listen else 0.0
            await drain(server, holder["servicer"], cfg.server.drain_grace_s, notice_s)  # type: ignore[arg-type]
        for part, name in (
            ("status", "the status file"),
            ("metrics", "the metrics server"),
            ("console", "the console"),
        ):
            if part in holder:
                await shutdown_step(name, holder[part].stop())  # type: ignore[attr-defined]
        cluster = holder["servicer"].state.cluster if "servicer" in holder else None  # type: ignore[attr-defined]
        if cluster is not None:  # after the drain: its rows go, the other replicas stop forwarding here
            await shutdown_step("leaving the cluster", cluster.stop())
        if "servicer" in holder:
            await shutdown_step("closing the directory", holder["servicer"].directory.aclose())  # type: ignore[attr-defined]
        if "audit" in holder:
            audit: AuditLog = holder["audit"]  # type: ignore[assignment]
            audit.event("stop", "success")
            # the collector's spool keeps what it could not send
            await shutdown_step("closing the audit log", asyncio.to_thread(audit.close))
        log.info("stopped")

    await run_until_signalled(begin, end, status=lambda: service_status_line(holder["servicer"]))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "init":
        return _init(args)
    if args.command == "cluster-cert":
        return _cluster_cert(args)
    try:
        cfg = bridge_config.load(args.config)
        if getattr(args, "listen", None):
            cfg = replace(cfg, server=replace(cfg.server, listen=args.listen))
        if getattr(args, "insecure", False) and not cfg.server.insecure:
            raise ConfigError(str(args.config), "server.insecure", "--insecure needs insecure = true in the file too")
        if args.command == "serve" and cfg.server.insecure and not args.insecure:
            raise ConfigError(
                str(args.config), "server.insecure", "insecure = true also needs --insecure on the command line"
            )
        files = []
        if not cfg.server.insecure:
            files += [("server.tls_cert", cfg.server.tls_cert, "certificate")]
            files += [("server.tls_key", cfg.server.tls_key, "private key")]
        problems = []
        if args.command in ("serve", "check-config"):  # the service's own files (status needs none of these)
            files += [("enrollment.ca_cert", cfg.enrollment.ca_cert, "certificate")]
            files += [("enrollment.ca_key", cfg.enrollment.ca_key, "private key")]
            if not cfg.server.insecure:
                files += [("server.client_ca", cfg.server.client_ca, "certificate")]
            files += [("cluster.tls_cert", cfg.cluster.tls_cert, "certificate")]
            files += [("cluster.tls_key", cfg.cluster.tls_key, "private key")]
            files += [("cluster.ca", cfg.cluster.ca, "certificate")]
            problems += audit_pem_problems(str(args.config), cfg.audit)
        problems = pem_problems(str(args.config), files) + problems
        if problems:
            raise ConfigError.several(problems)  # all of them at once
    except ConfigError as exc:
        if args.command == "check":  # monitoring plugins report their own failure as UNKNOWN
            print(f"DICOM-RELAY UNKNOWN - configuration error: {exc}")
            return 3
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.logging.level, cfg.logging.format)
    if args.command == "check-config":
        from relay_bridge.db.admin import database_problem

        problem = database_problem(cfg.storage.database, cfg.storage.password_file)
        if problem:
            print(f"configuration error: {args.config}: storage.database: {problem}", file=sys.stderr)
            return 2
        print(f"{args.config}: OK")
        return 0
    if args.command == "serve":
        try:
            refuse_serve_as_root(cfg.storage.local_path.parent, "relay-bridge")
        except OwnershipError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            asyncio.run(_serve(cfg, args))
        except StartupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # a failing serve says why in one line; the traceback is in the log
            log.debug("serve failed", exc_info=True)
            print(f"error: the bridge stopped: {exc.__class__.__name__}: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "check":
        from relay_bridge.check import check_command

        return check_command(cfg)
    if args.command == "status":
        from relay_bridge.status import status_command

        return status_command(cfg, args.json, color=sys.stdout.isatty())
    # As root: become the owner of the state directory, so the database stays the service's. The path is
    # made absolute first: the current directory may be one the service user cannot enter.
    if not cfg.storage.postgres:
        database = Path(cfg.storage.database).resolve()
        cfg = replace(cfg, storage=replace(cfg.storage, database=database))
        try:
            notice = become_state_owner(database.parent, files=_database_files(database))
        except OwnershipError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if notice:
            print(notice, file=sys.stderr)
    if args.command == "admin":
        from relay_bridge.console.admins import run_admin

        return run_admin(cfg, args)
    event = f"{args.command}_{args.action.replace('-', '_')}"  # router_add, router_passwd, share_list, ...
    name = getattr(args, "name", None)
    try:
        if args.command == "db":
            from relay_bridge.db.admin import db_command

            status = db_command(args.action, cfg.storage.database, cfg.storage.password_file, args)
        else:
            db = open_admin_directory(cfg.storage.database, cfg.storage.password_file)
            try:
                status = _admin(args, db, cfg)
            finally:
                db.close()
    except RelayError as exc:  # DirectoryError, an unreachable database, a schema it cannot use
        admin_event(cfg.audit, app="relay-bridge", event=event, outcome="failure", router=name, detail=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    admin_event(cfg.audit, app="relay-bridge", event=event, outcome="success", router=name)
    return status


def _database_files(database: Path) -> tuple[Path, ...]:
    return tuple(Path(f"{database}{suffix}") for suffix in ("", "-wal", "-shm", "-journal"))


def _admin(args: argparse.Namespace, db: Directory | SyncPostgresDirectory, cfg: bridge_config.BridgeConfig) -> int:
    if args.command == "router":
        ttl_s = cfg.enrollment.token_ttl_h * 3600
        if args.action == "add":
            password = db.add_router(args.name, _read_password(args.password_stdin))
            token = db.issue_enrollment_token(args.name, ttl_s)
            if args.json:
                shown = None if args.password_stdin else password
                print(json.dumps({"name": args.name, "password": shown, "enrollment_token": token}))
            else:
                if not args.password_stdin:
                    print(f"password:         {password}")
                print(f"enrollment token: {token}")
                print(
                    f"router {args.name!r} added; the token is valid {cfg.enrollment.token_ttl_h:g} h, once "
                    "(relay-router enroll --token ...)",
                    file=sys.stderr,
                )
        elif args.action == "enroll-token":
            print(db.issue_enrollment_token(args.name, ttl_s))
        elif args.action == "passwd":
            password = _read_password(args.password_stdin) or __import__("secrets").token_urlsafe(18)
            db.set_password(args.name, password)
            if not args.password_stdin:
                print(password)
        elif args.action in ("disable", "enable"):
            db.set_enabled(args.name, args.action == "enable")
            print(f"router {args.name!r} {args.action}d")
        elif args.action == "reset-identity":
            db.reset_identity(args.name)
            print(f"router {args.name!r}: identity forgotten; the next sign-on records a new one")
        elif args.action == "remove":
            db.remove_router(args.name)
            print(f"router {args.name!r} removed")
        elif args.action == "list":
            rows = [r.__dict__ for r in db.routers()]
            if args.json:
                print(json.dumps(rows))
            else:
                for r in rows:
                    print(f"{r['name']:<24} {'enabled' if r['enabled'] else 'DISABLED'}")
        return 0
    if args.command == "share":
        devices = db.devices()
        if args.json:
            rows = [{k: v for k, v in d.__dict__.items() if k != "grants"} for d in devices]
            for row, d in zip(rows, devices, strict=True):
                if d.grants:  # published by a router that knows service groups (issue 18)
                    row["services"] = {site: list(groups) for site, groups in d.grants}
            print(json.dumps(rows))
        else:
            for d in devices:
                print(f"{d.router:<20} {d.ae_title:<16} shared with: {', '.join(d.share_with) or 'nobody'}")
                # Service groups per site ("*": every site in share_with without a grant of its own).
                for site, groups in d.grants:
                    print(f"{'':<37} services for {site}: {', '.join(groups) or 'none'}")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())

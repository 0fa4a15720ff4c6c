"""relay-router: run the router and inspect its configuration."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from relay_common.audit import admin_event
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
from relay_common.logs import setup_logging
from relay_common.metrics import package_version
from relay_common.validate import printable
from relay_router import config as router_config

log = logging.getLogger("relay_router")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay-router", description="The dicom-relay router (one per hospital).")
    parser.add_argument("--version", action="version", version=f"relay-router (dicom-relay) {package_version()}")
    parser.add_argument(
        "--config", "-c", type=Path, default=Path("router.toml"), help="router.toml (default: %(default)s)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the router")
    serve.add_argument("--listen", help="override dicom.listen (HOST:PORT; port 0 picks one)")
    serve.add_argument("--ready-file", type=Path, help="write {'port': N} here once listening")
    serve.add_argument(
        "--status-file", type=Path, help="keep the router's state here as JSON (default: STATE_DIR/status.json)"
    )
    sub.add_parser("check-config", help="validate router.toml and exit")
    enroll = sub.add_parser("enroll", help="register this router's identity with the bridge (one-time token)")
    enroll.add_argument("--token", required=True, help="the enrollment token `relay-bridge router add` printed")
    sub.add_parser("fingerprint", help="print this router's identity fingerprint (for peers to pin)")
    peers = sub.add_parser("peers", help="peer sites: approved, pending approval; approve or reject them")
    peers_sub = peers.add_subparsers(dest="peers_command", required=True)
    peers_sub.add_parser("list", help="approved, pinned and pending sites").add_argument(
        "--json", action="store_true", help="machine-readable output"
    )
    approve = peers_sub.add_parser("approve", help="approve SITE's key, after comparing its fingerprint")
    approve.add_argument("site")
    approve.add_argument(
        "--fingerprint", required=True, help="the fingerprint SITE's operator read you from `relay-router fingerprint`"
    )
    peers_sub.add_parser("reject", help="drop SITE's pending request or approval").add_argument("site")
    pacs = sub.add_parser("pacs-config", help="print the entries local archives need to reach remote devices")
    pacs.add_argument("--format", choices=["table", "orthanc", "json"], default="table")
    pacs.add_argument("--host", help="the router's address as the archive sees it (default: from dicom.listen)")
    pacs.add_argument(
        "--status-file", type=Path, help="the serving router's --status-file, for the services each device offers"
    )
    for name, text in (
        ("status", "is the router running and signed on; devices; recent associations"),
        ("devices", "the routing table: local AE title -> site/title, online or not"),
        ("check", "monitoring plugin (Nagios/Icinga): one line, exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN"),
    ):
        command = sub.add_parser(name, help=text)
        if name != "check":
            command.add_argument("--json", action="store_true", help="machine-readable output")
        command.add_argument(
            "--status-file", type=Path, help="the serving router's --status-file (default: STATE_DIR/status.json)"
        )
    from relay_router.accel.cli import add_spool_parser

    add_spool_parser(sub)  # relay-router spool list|retry|purge (accelerated routes)
    devices = sub.choices["devices"]
    devices.add_argument(
        "--echo", action="store_true", help="C-ECHO each remote device through the running router (exit 4 if one fails)"
    )
    devices.add_argument("--calling-ae", default="ECHOSCU", help="calling AE title for --echo (default: %(default)s)")
    devices.add_argument("--timeout", type=float, default=20.0, help="seconds per C-ECHO (default: %(default)s)")
    from relay_router.identity import cli as identity_cli

    identity_cli.add_parser(sub)  # relay-router pix add|list|remove|import
    return parser


def _pacs_config(cfg: router_config.RouterConfig, fmt: str, host: str | None, status_file: Path | None = None) -> str:
    from relay_common.config import parse_host_port
    from relay_router.status import granted_services

    _, port = parse_host_port(cfg.dicom.listen)
    host = host or router_config.advertised_host(cfg)  # on 0.0.0.0: this machine's name; --host overrides
    entries = sorted((r.ae_title, r.site, r.target) for r in cfg.remote)
    granted = granted_services(
        cfg, status_file
    )  # what each remote device offers us, if the router has seen the directory
    if fmt == "orthanc":
        modalities = {title: [title, host, port] for title, _, _ in entries}
        return json.dumps({"DicomModalities": modalities}, indent=2)
    if fmt == "json":
        rows: list[dict[str, object]] = [
            {"ae_title": t, "host": host, "port": port, "site": s, "remote_ae_title": r} for t, s, r in entries
        ]
        for row, (_, s, r) in zip(rows, entries, strict=True):
            if (s, r) in granted:
                row["services"] = granted[(s, r)]
        return json.dumps(rows, indent=2)
    lines = [f"{'AE title':<17} {'host':<16} {'port':>5}  reaches", "-" * 60]
    for t, s, r in entries:
        offers = f"  ({', '.join(granted[(s, r)])})" if (s, r) in granted else ""
        lines.append(f"{t:<17} {host:<16} {port:>5}  {r} at {s}{offers}")
    if cfg.dicom.expose_all:
        lines.append("(expose_all = true: more titles appear as the directory grows; see the router log)")
    return "\n".join(lines)


def _share_warnings(cfg: router_config.RouterConfig) -> list[str]:
    """share_with names that look wrong: this router itself, or sites not in the last directory seen."""
    from relay_router.status import default_status_file

    try:
        status = json.loads(default_status_file(cfg).read_text())
        known = {str(d.get("site")) for d in status.get("directory", [])}
    except (OSError, ValueError, AttributeError, TypeError):
        known = None  # never ran, or unreadable: only the self-check
    warnings = []
    for device in cfg.shared:
        for i, site in enumerate(device.share_with):
            key = f"shared ({device.ae_title}).share_with[{i}]"
            if site == cfg.router.name:
                warnings.append(f"{key}: {site!r} is this router itself")
            elif site != "*" and known is not None and site not in known:
                warnings.append(
                    f"{key}: {site!r} is not among the sites in the directory this router last received "
                    "(a typo? sites that share nothing with this router are not listed there)"
                )
    return warnings


def _peers(cfg: router_config.RouterConfig, args: argparse.Namespace) -> int:
    """`relay-router peers list|approve|reject`: the running router reads the result at its next use."""
    from relay_router.approvals import ApprovalError, ApprovalStore, format_listing, peers_listing
    from relay_router.seal import Identity

    state = cfg.router.state_dir.resolve()
    store = ApprovalStore(state)
    pins = {p.site: p.fingerprint for p in cfg.pin}
    if args.peers_command == "list":
        try:
            rows = peers_listing(store, pins)
        except ValueError as exc:  # e.g. run as a user who cannot read the state directory
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        key = state / "identity.key"
        own = Identity.load_or_create(key).public.fingerprint if key.exists() else None
        print(format_listing(cfg.router.name, own, rows))
        return 0
    if args.site in pins:
        print(f"error: {args.site} is pinned in {args.config} ([[pin]]), which wins: change it there", file=sys.stderr)
        return 1
    try:
        notice = become_state_owner(state, files=(store.known_file, store.pending_file))
    except OwnershipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if notice:
        print(notice, file=sys.stderr)
    event = "peer_approve" if args.peers_command == "approve" else "peer_reject"
    try:
        if args.peers_command == "approve":
            done = store.approve(args.site, args.fingerprint)
        else:
            done = store.reject(args.site)
    except ApprovalError as exc:
        admin_event(cfg.audit, app="relay-router", event=event, outcome="failure", site=args.site, detail=str(exc))
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 1
    fingerprint = store.known().get(args.site)
    admin_event(cfg.audit, app="relay-router", event=event, outcome="success", site=args.site, fingerprint=fingerprint)
    print(done)
    return 0


async def _serve(
    cfg: router_config.RouterConfig,
    ready_file: Path | None,
    status_file: Path | None,
    config_path: Path | None = None,
    file_config: router_config.RouterConfig | None = None,
) -> None:
    from relay_router.check import service_status_line
    from relay_router.service import RouterService
    from relay_router.status import default_status_file, write_now, write_stopped

    service = RouterService(
        cfg,
        status_file=status_file or default_status_file(cfg),
        config_path=config_path,  # SIGHUP re-reads it (RouterService.reload_config)
        file_config=file_config,
    )
    from relay_router.console import RouterConsole  # the web console ([console] listen; off by default)

    console = RouterConsole(service)

    async def begin() -> None:
        await service.metrics.start(cfg.metrics.listen)
        try:
            await service.start()
        except OSError as exc:
            raise listen_error(cfg.dicom.listen, exc) from exc
        write_now(service)
        await console.start()
        service.audit.event("start", "success", listen=cfg.dicom.listen)  # DICOM Application Activity
        announce_ready(
            ready_file, port=service.port, metrics_port=service.metrics.server.port, console_port=console.server.port
        )

    async def end() -> None:
        await service.stop(cfg.dicom.shutdown_grace_s)
        await console.stop()
        await service.metrics.stop()
        write_stopped(service)
        service.audit.event("stop", "success")
        await asyncio.to_thread(service.audit.close)  # the collector's spool keeps what it could not send

    await run_until_signalled(begin, end, status=lambda: service_status_line(service))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = file_cfg = router_config.load(args.config)
        if getattr(args, "listen", None):
            cfg = replace(cfg, dicom=replace(cfg.dicom, listen=args.listen))
        if args.command in ("serve", "check-config", "enroll"):  # pacs-config needs no secrets
            source = str(args.config)
            problems = pem_problems(source, [("bridge.ca_file", cfg.bridge.ca_file, "certificate")])
            problems += audit_pem_problems(source, cfg.audit)
            try:
                cfg.bridge.resolve_password()
            except ValueError as exc:
                problems.append(ConfigError(source, "bridge.password", str(exc)))
            try:
                cfg.bridge.proxy_settings()
            except ValueError as exc:
                problems.append(ConfigError(source, "bridge.proxy_password_file", str(exc)))
            if problems:
                raise ConfigError.several(problems)  # all of them at once
    except ConfigError as exc:
        if args.command == "check":  # monitoring plugins report their own failure as UNKNOWN
            print(f"DICOM-RELAY UNKNOWN - configuration error: {exc}")
            return 3
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"configuration error: {args.config}: bridge.password: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.logging.level, cfg.logging.format)
    if args.command == "check-config":
        for warning in _share_warnings(cfg):
            print(f"warning: {args.config}: {warning}", file=sys.stderr)
        if cfg.router.trust_first_use and not cfg.router.require_pin:
            print(
                f"warning: {args.config}: router.trust_first_use is on: the first key the bridge offers for a site is "
                'believed, so a malicious bridge can invent a site that reaches devices shared with "*". Approve '
                "partners with `relay-router peers approve` and turn it off (docs/security.md)",
                file=sys.stderr,
            )
        print(f"{args.config}: OK ({len(cfg.shared)} shared devices, {len(cfg.remote)} remote devices)")
        return 0
    if args.command == "enroll":
        from relay_router.enroll import CLIENT_CERT, CLIENT_KEY, EnrollError, enroll

        state = cfg.router.state_dir.resolve()
        try:
            # Read the password while we may (a root-only file), then, as root, become the owner of
            # the state directory: the identity key and client key must be the service's. Paths are
            # made absolute first: the current directory may be one the service user cannot enter.
            ca_file = cfg.bridge.ca_file.resolve() if cfg.bridge.ca_file is not None else None
            password = cfg.bridge.resolve_password()
            bridge = replace(cfg.bridge, password=password, password_file=None, ca_file=ca_file)
            cfg = replace(cfg, bridge=bridge, router=replace(cfg.router, state_dir=state))
            keys = tuple(state / name for name in ("identity.key", CLIENT_KEY, CLIENT_CERT))
            notice = become_state_owner(state, files=keys)
        except OwnershipError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if notice:
            print(notice, file=sys.stderr)
        address = cfg.bridge.enroll_address or cfg.bridge.address
        try:
            with spinner(f"enrolling {cfg.router.name} with the bridge at {address}", enabled=interactive()):
                identity, certified = enroll(cfg, args.token)
        except (EnrollError, ValueError) as exc:
            admin_event(
                cfg.audit, app="relay-router", event="enroll", outcome="failure", site=cfg.router.name, detail=str(exc)
            )
            print(f"enrollment failed: {printable(exc)}", file=sys.stderr)  # the bridge's text: escaped
            return 1
        admin_event(
            cfg.audit,
            app="relay-router",
            event="enroll",
            outcome="success",
            site=cfg.router.name,
            fingerprint=identity.public.fingerprint,
        )
        print(f"enrolled {cfg.router.name}; identity fingerprint {identity.public.fingerprint}")
        if certified:
            print(f"client certificate written to {cfg.router.state_dir / 'client.pem'}")
        return 0
    if args.command == "fingerprint":
        from relay_router.seal import Identity

        key = cfg.router.state_dir / "identity.key"
        if not key.exists():  # never create it here: run as another user, it would be unreadable by the service
            print(f"no identity yet at {key}: it is created by `serve` or `enroll`", file=sys.stderr)
            return 1
        print(Identity.load_or_create(key).public.fingerprint)
        return 0
    if args.command == "peers":
        return _peers(cfg, args)
    if args.command == "pacs-config":
        print(_pacs_config(cfg, args.format, args.host, args.status_file))
        return 0
    if args.command == "spool":
        from relay_router.accel.cli import spool_command

        return spool_command(cfg, args)
    if args.command == "check":
        from relay_router.check import check_command

        return check_command(cfg, args.status_file)
    if args.command == "pix":
        from relay_router.identity import cli as identity_cli

        return identity_cli.run(cfg, args)
    if args.command in ("status", "devices"):
        from relay_router import status as router_status

        if args.command == "status":
            return router_status.status_command(cfg, args.status_file, args.json)
        return router_status.devices_command(
            cfg,
            args.status_file,
            args.json,
            echo=args.echo,
            calling=args.calling_ae,
            timeout_s=args.timeout,
            show_progress=interactive(args.json),
        )
    try:
        refuse_serve_as_root(cfg.router.state_dir, "relay-router")
    except OwnershipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(_serve(cfg, args.ready_file, args.status_file, Path(args.config), file_cfg))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a failing serve says why in one line; the traceback is in the log
        log.debug("serve failed", exc_info=True)
        print(f"error: the router stopped: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

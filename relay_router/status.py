"""`relay-router status` and `relay-router devices`: read the status file a running router keeps.

The router rewrites its status file (default `<state_dir>/status.json`) about
once a second while it runs, and a last time when it stops. These commands
only read that file, so they answer at once and need neither the bridge
password nor the network. Exit codes: 0 running and signed on to the bridge;
1 running but not signed on; 3 not running (no status file, stopped, or the
file has gone stale); 2 is a configuration error, as for every command;
`devices --echo` exits 4 when a device did not answer its C-ECHO through the relay.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay_common.metrics import (
    format_age,
    format_bytes,
    format_time,
    liveness,
    process_facts,
    write_json_atomically,
)
from relay_common.validate import terminal_safe
from relay_router.services import ordered

if TYPE_CHECKING:
    from relay_router.config import RouterConfig
    from relay_router.service import RouterService

log = logging.getLogger("relay_router.status")
EXIT_OK, EXIT_DISCONNECTED, EXIT_NOT_RUNNING, EXIT_ECHO_FAILED = 0, 1, 3, 4
SHOW_RECENT = 10


def default_status_file(config: RouterConfig) -> Path:
    return config.router.state_dir / "status.json"


def status_extra(service: RouterService) -> dict[str, object]:
    """What the router adds to its status file for these commands (merged into RouterService.status)."""
    try:
        return _status_extra(service)
    except Exception:  # the status file must keep being written
        log.exception("cannot build the status details")
        return {**process_facts(), "running": True}


def _status_extra(service: RouterService) -> dict[str, object]:
    config = service.config
    facts = process_facts()
    facts["updated"] = int(time.time())  # whole seconds: the file is rewritten about once a second
    metrics = getattr(service, "metrics", None)
    return {
        **facts,
        "running": True,
        "bridge": config.bridge.address,
        "shared": [
            {
                "ae_title": d.ae_title,
                "host": d.host,
                "port": d.port,
                "share_with": list(d.share_with),
                "description": d.description,
            }
            for d in config.shared
        ],
        "configured_remote": sorted(r.ae_title for r in config.remote),
        # Shared device -> site ("*": every site in share_with without a grant) -> service groups (issue 18).
        "shared_services": {
            d.ae_title: {"*": list(d.services)} | {g.site: list(d.services_for(g.site)) for g in d.grant}
            for d in config.shared
        },
        **(metrics.status() if metrics is not None else {}),
    }


def stopped_status(status: dict[str, object]) -> dict[str, object]:
    """The last status, marked as stopped (written when the router shuts down cleanly)."""
    return {**status, "running": False, "stopped": round(time.time(), 3), "connected": False, "active_associations": 0}


def write_now(service: RouterService) -> None:
    """Write the status file at once (before readiness is announced; the service then keeps it current)."""
    if service.status_file is None:
        return
    try:
        write_json_atomically(service.status_file, json.dumps(service.status(), sort_keys=True), 0o644)
    except OSError:
        pass


def write_stopped(service: RouterService) -> None:
    """Leave the status file saying the router stopped (so `status` need not wait for it to go stale)."""
    if service.status_file is None:
        return
    try:
        write_json_atomically(service.status_file, json.dumps(stopped_status(service.status()), sort_keys=True), 0o644)
    except OSError:
        pass


# -- reading ---------------------------------------------------------------------------


def read_status(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(status, None) or (None, why it cannot be read)."""
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, f"no status file at {path} (the router is not running, or runs with another --status-file)"
    except PermissionError:
        return None, f"cannot read {path}: permission denied (run as the router's user, e.g. sudo -u dicom-relay)"
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"


def remote_devices(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The routing table with each device's state in the directory."""
    directory = {(d["site"], d["ae_title"]): d for d in status.get("directory", [])}
    configured = set(status.get("configured_remote", [])) if "configured_remote" in status else None
    rows = []
    for title, route in sorted(status.get("routes", {}).items()):
        entry = directory.get((route["site"], route["ae_title"]))
        rows.append(
            {
                "ae_title": title,
                "site": route["site"],
                "remote_ae_title": route["ae_title"],
                "source": "remote" if configured is None or title in configured else "expose_all",
                "in_directory": entry is not None,
                "online": bool(entry and entry.get("online")),
                "description": entry.get("description", "") if entry else "",
                # Service groups the owner granted us; [] = not published (the owner checks anyway).
                "services": list(ordered(entry.get("services") or ())) if entry else [],
            }
        )
    return rows


def evaluate(status: dict[str, Any] | None, problem: str | None, now: float | None = None) -> dict[str, Any]:
    """The status as the commands report it: the file's content plus running/problem/exit code."""
    if status is None:
        return {"running": False, "problem": problem, "exit_code": EXIT_NOT_RUNNING}
    dead = liveness(status, now=now)
    running = dead is None
    if not running:
        code = EXIT_NOT_RUNNING
    elif status.get("connected"):
        code = EXIT_OK
    else:
        code = EXIT_DISCONNECTED
    return {
        **status,
        "running": running,
        "problem": dead,
        "exit_code": code,
        "remote_devices": remote_devices(status),
    }


# -- rendering -------------------------------------------------------------------------


def _device_state(row: dict[str, Any]) -> str:
    if row["online"]:
        return "online"
    if row["in_directory"]:
        return "OFFLINE (its site is not signed on to the bridge)"
    return f"UNKNOWN (not in the directory: {row['site']} does not share it with this site, or is unknown)"


def render_status(report: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    site = report.get("site", "?")
    if "site" not in report:
        return terminal_safe(f"relay-router: NOT RUNNING: {report.get('problem')}")
    lines: list[str] = []
    if not report["running"]:
        lines.append(f"relay-router {site}: NOT RUNNING: {report['problem']}")
        lines.append(f"  (what follows is the last state it recorded, at {format_time(report.get('updated'))})")
    elif report.get("connected"):
        since = report.get("connected_since")
        lines.append(
            f"relay-router {site}: running (pid {report.get('pid')}), signed on to the bridge at "
            f"{report.get('bridge')} since {format_time(since)} ({format_age(now - since) if since else '?'})"
        )
    else:
        lines.append(
            f"relay-router {site}: running (pid {report.get('pid')}), NOT signed on to the bridge at "
            f"{report.get('bridge')}"
        )
    lines.append(
        f"  last error: {report.get('last_error') or 'none'}; reconnect attempts since start: "
        f"{report.get('reconnects', 0)}"
    )
    if report.get("config_loaded_at"):  # at start, and again on each valid reload (SIGHUP)
        lines.append(f"  configuration loaded at {format_time(report['config_loaded_at'])}")
    if report["running"] and not report.get("connected"):
        lines.append('  (each last error and its fix: docs/operations.md, "The router does not sign on")')
    metrics = report.get("metrics") or {}
    where = (
        f"http://{metrics['listen']}/metrics"
        if metrics.get("listen")
        else (metrics.get("error") or 'disabled ([metrics] listen = "")')
    )
    if report["running"]:
        lines.append(f"  DICOM port {report.get('dicom_port')}; metrics: {where}")

    lines.append("")
    shared = report.get("shared", [])
    lines.append(f"Shared devices ({len(shared)}): other sites reach these through this router")
    for d in shared:
        who = ", ".join(d["share_with"]) or "nobody"
        lines.append(f"  {d['ae_title']:<16}  {d['host']}:{d['port']:<6}  shared with {who}")
        for site, groups in (report.get("shared_services") or {}).get(d["ae_title"], {}).items():
            lines.append(f"  {'':<16}  services for {site}: {', '.join(groups) or 'none'}")
    rows = report.get("remote_devices", [])
    online = sum(1 for r in rows if r["online"])
    lines.append("")
    lines.append(f"Remote devices ({online} of {len(rows)} online): local devices call these AE titles here")
    for r in rows:
        lines.append(f"  {r['ae_title']:<16}  -> {r['remote_ae_title']} at {r['site']:<20} {_device_state(r)}")
    lines += accelerated_route_lines(report)

    recent = report.get("recent") or {}
    counts = recent.get("counts", {})
    lines.append("")
    breakdown = ", ".join(f"{k} {v}" for k, v in counts.items())
    lines.append(
        f"Associations in the last hour: {recent.get('total', 0)}"
        + (f" ({breakdown})" if breakdown else "")
        + f"; {report.get('active_associations', 0)} active now"
    )
    last = recent.get("last", [])[-SHOW_RECENT:]
    if last:
        lines.append(f"Last {len(last)} (newest last):")
        for a in last:
            arrow = "out" if a["direction"] == "outbound" else "in "
            detail = a.get("detail") or ""
            if a.get("reason"):
                detail = f"{a['reason']}: {detail}" if detail else a["reason"]
            titles = f"{a['calling_ae'] or '?'} -> {a['called_ae'] or '?'}"
            lines.append(
                f"  {time.strftime('%H:%M:%S', time.localtime(a['time']))}  {a['association'][:12]}  {arrow}  "
                f"{a['site'] or '-':<14} "
                f"{titles:<36} {a['result']:<8} "
                f"{format_bytes(a['bytes_to_remote'])} out, {format_bytes(a['bytes_to_local'])} in, "
                f"{a['seconds']:.1f} s" + (f"  {detail}" if detail and a["result"] not in ("released",) else "")
            )
    # Titles, site names, errors and details came from the bridge or a peer: no control character
    # of theirs reaches the terminal.
    return terminal_safe("\n".join(lines))


def accelerated_route_lines(report: dict[str, Any]) -> list[str]:
    """One line per accelerated [[remote]] title (relay_router.accel): the transfer to the far router."""
    routes = (report.get("accelerate") or {}).get("routes") or {}
    lines = []
    for title, r in sorted(routes.items()):
        state = "transfer open" if r.get("connected") else "no transfer open"
        known = (
            "capabilities learned"
            if r.get("capabilities_known")
            else "capabilities NOT learned yet (relayed transparently)"
        )
        error = f"; last error: {r['last_error']}" if r.get("last_error") else ""
        lines.append(f"  {title:<16}  accelerated: {state}, {known}, {r.get('in_flight', 0)} in flight{error}")
    commitment = (report.get("accelerate") or {}).get("commitment")
    if commitment and routes:  # relay_router.accel.commitment: requests waiting for the destination's outcomes
        lines.append(
            f"  storage commitment: {commitment.get('pending', 0)} pending, "
            f"{commitment.get('answered', 0)} answered since start"
        )
    return lines


def render_devices(report: dict[str, Any]) -> str:
    rows = report.get("remote_devices", [])
    echoed = any("echo" in r for r in rows)
    header = f"{'local AE title':<16}  {'site':<20} {'remote AE title':<16}  {'state':<26}" + (
        "C-ECHO" if echoed else ""
    )
    lines = [header.rstrip(), "-" * (100 if echoed else 72)]
    for r in rows:
        state = "online" if r["online"] else ("offline" if r["in_directory"] else "not in directory")
        if r["source"] == "expose_all":
            state += " (expose_all)"
        line = f"{r['ae_title']:<16}  {r['site']:<20} {r['remote_ae_title']:<16}  {state}"
        if "echo" in r:
            echo = r["echo"]
            line = f"{line:<84}" + (f"ok, {echo['ms']:.0f} ms" if echo["ok"] else f"FAILED: {echo['detail']}")
        lines.append(line.rstrip())
        if r.get("in_directory"):  # what the owner granted us (issue 18); its router checks it again
            lines.append(f"{'':<18}services: {', '.join(r.get('services') or ()) or 'not published by its owner'}")
    if not report.get("running"):
        lines.append(f"(router not running: {report.get('problem')}; online states are unknown)")
    return terminal_safe("\n".join(lines))


def granted_services(config: RouterConfig, status_file: Path | None = None) -> dict[tuple[str, str], list[str]]:
    """(site, remote AE title) -> service groups granted to us, from the running router's last directory
    (empty when the router is not running or the owners published none)."""
    status, _ = read_status(status_file or default_status_file(config))
    if status is None:
        return {}
    return {
        (d["site"], d["ae_title"]): list(ordered(d.get("services") or ()))
        for d in status.get("directory", [])
        if d.get("services")
    }


def devices_from_config(config: RouterConfig, problem: str | None) -> dict[str, Any]:
    """The routing table from router.toml alone, for when the router is not running."""
    rows = [
        {
            "ae_title": r.ae_title,
            "site": r.site,
            "remote_ae_title": r.target,
            "source": "remote",
            "in_directory": False,
            "online": False,
            "description": "",
        }
        for r in sorted(config.remote, key=lambda r: r.ae_title)
    ]
    return {"running": False, "problem": problem, "remote_devices": rows, "exit_code": EXIT_NOT_RUNNING}


def status_command(config: RouterConfig, status_file: Path | None, as_json: bool) -> int:
    path = status_file or default_status_file(config)
    report = evaluate(*read_status(path))
    report["status_file"] = str(path)
    spool = spool_report(config)
    if spool is not None:
        report["spool"] = spool
    report["peers_pending"] = pending_peers(config)
    text = render_status(report)
    if report["peers_pending"]:
        names = ", ".join(terminal_safe(site) for site in report["peers_pending"])
        text += f"\nwaiting for your approval: {names} (relay-router peers list)"
    print(json.dumps(report, indent=2, sort_keys=True) if as_json else text)
    if spool is not None and not as_json:
        from relay_router.accel.cli import status_lines

        print("\n".join(status_lines(spool)))
    return int(report["exit_code"])


def spool_report(config: RouterConfig) -> dict[str, Any] | None:
    """The accelerated routes' spool, read from disk, when there is one (usage, counts, dead letters)."""
    from relay_router.accel.cli import configured_spool

    root, limit = configured_spool(config)
    if not (root / "entries").is_dir():
        return None
    from relay_router.accel.metrics import spool_status

    return spool_status(root, limit)


def pending_peers(config: RouterConfig) -> list[str]:
    """Sites refused until this router's operator approves their key (relay_router.approvals); [] if unreadable."""
    from relay_router.approvals import ApprovalStore

    store = ApprovalStore(config.router.state_dir)
    try:
        known = store.known()
        pinned = {pin.site for pin in config.pin}  # changed in router.toml, not approved
        return sorted(
            site
            for site, waiting in store.pending().items()
            if known.get(site) != waiting.fingerprint and site not in pinned
        )
    except (OSError, ValueError):
        return []


def echo_device(host: str, port: int, called: str, calling: str, timeout_s: float) -> dict[str, Any]:
    """One C-ECHO through this router to a remote device: {"ok", "ms", "detail"}."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    rejection: list[str] = []

    def on_acse(event: Any) -> None:
        primitive = event.primitive
        if getattr(primitive, "result", None) in (0x01, 0x02):
            rejection.append(f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}")

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    started = time.monotonic()
    assoc = ae.associate(host, port, ae_title=called, evt_handlers=[(evt.EVT_ACSE_RECV, on_acse)])
    try:
        if assoc.is_established:
            status = assoc.send_c_echo()
            ms = (time.monotonic() - started) * 1000
            code = getattr(status, "Status", None)
            if code == 0:
                return {"ok": True, "ms": round(ms, 1), "detail": "Success"}
            return {"ok": False, "ms": round(ms, 1), "detail": "no C-ECHO response" if code is None else f"{code:#06x}"}
        if rejection:
            detail = f"rejected ({rejection[0]})"
        elif assoc.is_aborted:
            detail = "aborted"
        else:
            detail = f"no answer from the router at {host}:{port}"
        return {"ok": False, "ms": round((time.monotonic() - started) * 1000, 1), "detail": detail}
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def echo_all(
    config: RouterConfig, report: dict[str, Any], *, calling: str, timeout_s: float, show_progress: bool
) -> None:
    """C-ECHO every remote device through the running router; adds an "echo" entry to each row."""
    from relay_common.config import parse_host_port

    host, _ = parse_host_port(config.dicom.listen)
    host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    port = int(report["dicom_port"])
    rows = report["remote_devices"]
    quiet = logging.getLogger("pynetdicom")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the result goes in the table; pynetdicom's own errors would repeat it
    try:
        if not show_progress:
            for row in rows:
                row["echo"] = echo_device(host, port, row["ae_title"], calling, timeout_s)
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task("C-ECHO", total=len(rows))
            for row in rows:
                progress.update(
                    task, description=f"C-ECHO {row['ae_title']} ({row['remote_ae_title']} at {row['site']})"
                )
                row["echo"] = echo_device(host, port, row["ae_title"], calling, timeout_s)
                progress.advance(task)
    finally:
        quiet.setLevel(level)


def devices_command(
    config: RouterConfig,
    status_file: Path | None,
    as_json: bool,
    *,
    echo: bool = False,
    calling: str = "ECHOSCU",
    timeout_s: float = 20.0,
    show_progress: bool = False,
) -> int:
    path = status_file or default_status_file(config)
    report = evaluate(*read_status(path))
    if not report["running"]:
        report = devices_from_config(config, report["problem"])
    elif echo:
        echo_all(config, report, calling=calling, timeout_s=timeout_s, show_progress=show_progress)
        if not all(r["echo"]["ok"] for r in report["remote_devices"]):
            report["exit_code"] = EXIT_ECHO_FAILED
    if as_json:
        print(json.dumps(report["remote_devices"], indent=2))
    else:
        print(render_devices(report))
    return int(report["exit_code"])

"""The bridge's status file and `relay-bridge status`.

While it serves, the bridge rewrites `<database>.status.json` (mode 0640, next
to the database) about once a second: which routers are signed on (since when,
from which address), what each shares with whom, the active associations and
the last hour's outcomes; a last time, marked stopped, when it shuts down.
`relay-bridge status` reads only that file, so it answers at once. Exit codes:
0 running, 3 not running (no file, stopped, or stale), 2 configuration error.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay_bridge.db.backend import is_postgres_url
from relay_common.metrics import (
    format_age,
    format_bytes,
    format_time,
    liveness,
    package_version,
    process_facts,
    write_json_atomically,
)
from relay_common.validate import printable

if TYPE_CHECKING:
    from relay_bridge.config import BridgeConfig
    from relay_bridge.server import RelayServicer

log = logging.getLogger("relay_bridge.status")
EXIT_OK, EXIT_NOT_RUNNING = 0, 3
INTERVAL_S = 1.0


def status_path(config: BridgeConfig) -> Path:
    return Path(f"{config.storage.local_path}.status.json")


async def read_directory(servicer: RelayServicer) -> tuple[list[Any], list[Any]]:
    """Accounts and published devices (read off the event loop, by the directory's own thread)."""
    return await servicer.directory.routers(), await servicer.directory.devices()


def build_status(
    servicer: RelayServicer,
    *,
    port: int | None,
    started: float,
    directory: tuple[list[Any], list[Any]],
    signed_off: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The bridge's state now; call it on the event loop (`directory` from read_directory)."""
    accounts, devices = directory
    sessions = dict(servicer.sessions)
    devices_by_router: dict[str, list[dict[str, Any]]] = {}
    for d in devices:
        devices_by_router.setdefault(d.router, []).append(
            {"ae_title": d.ae_title, "description": d.description, "share_with": list(d.share_with)}
        )
    routers = []
    for account in accounts:
        session = sessions.get(account.name)
        routers.append(
            {
                "name": account.name,
                "enabled": account.enabled,
                "signed_on": session is not None,
                "since": session.since if session else None,
                "source": session.peer if session else None,
                "last_sign_on": account.last_seen,
                "signed_off": None if session else (signed_off or {}).get(account.name),
                "active_associations": len(session.associations) if session else 0,
                "devices": devices_by_router.get(account.name, []),
            }
        )
    facts = process_facts()
    facts["updated"] = int(time.time())
    metrics = servicer.metrics
    return {
        "app": "relay-bridge",
        "version": package_version(),
        **facts,
        "running": True,
        "started": started,
        "listen": _bound(servicer.config.server.listen, port),
        "port": port,
        "metrics": {
            "listen": metrics.server.address,
            "error": metrics.server.error,
        },
        "signed_on": len(sessions),
        "active_associations": len(servicer.splices),
        # Which replica this is, and whether it is draining (SIGTERM; docs/high-availability.md).
        "replica": _state(servicer).replica_id,
        "draining": _state(servicer).draining,
        "routers": routers,
        "recent": metrics.recent.summary(),
    }


def _state(servicer: Any) -> Any:
    """The BridgeState: the servicer's, or the one the console passes in its place."""
    return getattr(servicer, "state", servicer)


def _bound(listen: str, port: int | None) -> str:
    host = listen.rpartition(":")[0] or "0.0.0.0"
    return f"{host}:{port}" if port else listen


class StatusWriter:
    """Keeps the status file current while the bridge serves."""

    def __init__(self, servicer: RelayServicer, path: Path, *, port: int | None) -> None:
        self.servicer, self.path, self.port = servicer, path, port
        self.started = time.time()
        self._task: asyncio.Task[None] | None = None
        self._last: dict[str, Any] | None = None
        self._signed_off: dict[str, float] = {}  # when this bridge saw each router's session end
        self._on: set[str] = set()

    async def start(self) -> None:
        """Write the file once (so it exists when the bridge announces readiness), then keep it current."""
        await self._write_logged()
        self._task = asyncio.create_task(self._run())

    async def write_once(self) -> None:
        directory = await read_directory(self.servicer)
        on = set(self.servicer.sessions)
        for name in self._on - on:
            self._signed_off[name] = time.time()
        self._on = on
        status = build_status(
            self.servicer, port=self.port, started=self.started, directory=directory, signed_off=self._signed_off
        )
        self._last = status
        await asyncio.to_thread(write_json_atomically, self.path, json.dumps(status, sort_keys=True), 0o640)

    async def _write_logged(self) -> None:
        try:
            await self.write_once()
        except Exception as exc:  # the status file must never stop the bridge
            log.warning("cannot write the status file %s: %s", self.path, exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_S)
            await self._write_logged()

    async def stop(self) -> None:
        """Stop the updates and leave the file saying the bridge stopped."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._last is not None:
            final = {**self._last, "running": False, "stopped": round(time.time(), 3), "signed_on": 0}
            final["active_associations"] = 0
            for router in final["routers"]:
                if router["signed_on"]:
                    router["signed_off"] = final["stopped"]
                router.update(signed_on=False, since=None, source=None, active_associations=0)
            with contextlib.suppress(OSError):
                write_json_atomically(self.path, json.dumps(final, sort_keys=True), 0o640)


# -- reading and rendering -------------------------------------------------------------


def read_status(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, f"no status file at {path} (the bridge is not running, or never ran with this configuration)"
    except PermissionError:
        return None, f"cannot read {path}: permission denied (run as the bridge's user or root)"
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"


def evaluate(status: dict[str, Any] | None, problem: str | None, now: float | None = None) -> dict[str, Any]:
    if status is None:
        return {"running": False, "problem": problem, "exit_code": EXIT_NOT_RUNNING}
    dead = liveness(status, now=now)
    return {
        **status,
        "running": dead is None,
        "problem": dead,
        "exit_code": EXIT_OK if dead is None else EXIT_NOT_RUNNING,
        "links": links(status),
    }


def links(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Who may call whom: one link per (caller, owner) pair with the devices shared; up when both are on."""
    routers = {r["name"]: r for r in status.get("routers", [])}
    pairs: dict[tuple[str, str], list[str]] = {}
    for owner in routers.values():
        for device in owner["devices"]:
            callers = set(routers) if "*" in device["share_with"] else set(device["share_with"])
            for caller in sorted(callers - {owner["name"]}):
                pairs.setdefault((caller, owner["name"]), []).append(device["ae_title"])
    result = []
    for (caller, owner), titles in sorted(pairs.items()):
        down = [s for s in (caller, owner) if not routers.get(s, {}).get("signed_on")]
        result.append(
            {
                "from": caller,
                "to": owner,
                "devices": sorted(titles),
                "up": not down,
                "down_sites": down,
            }
        )
    return result


def render_status(report: dict[str, Any], *, color: bool = False, width: int = 100) -> str:
    """The text report: a header, a tree of sites and devices (the network map), and the links."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.tree import Tree

    out = io.StringIO()
    console = Console(
        file=out, width=width, color_system="standard" if color else None, highlight=False, soft_wrap=True
    )
    now = time.time()
    if "routers" not in report:
        console.print(printable(f"relay-bridge: NOT RUNNING: {report.get('problem')}"), markup=False)
        return out.getvalue().rstrip("\n")
    routers = report["routers"]
    if report["running"]:
        metrics = report.get("metrics") or {}
        where = f"http://{metrics['listen']}/metrics" if metrics.get("listen") else (metrics.get("error") or "off")
        console.print(
            f"relay-bridge: running (pid {report.get('pid')}) on {report.get('listen')} (port {report.get('port')}), "
            f"up {format_age(now - report.get('started', now))}; metrics: {where}",
            markup=False,
        )
    else:
        console.print(printable(f"relay-bridge: NOT RUNNING: {report['problem']}"), markup=False)
        console.print(f"  (the map below is the last state it recorded, at {format_time(report.get('updated'))})")
    recent = report.get("recent") or {}
    counts = ", ".join(f"{k} {v}" for k, v in (recent.get("counts") or {}).items())
    console.print(
        f"{report.get('signed_on', 0)} of {len(routers)} routers signed on; "
        f"{report.get('active_associations', 0)} associations active; "
        f"last hour: {recent.get('total', 0)}" + (f" ({counts})" if counts else ""),
        markup=False,
    )
    console.print()

    def safe(value: object) -> str:
        """A value from the database or a router: control characters and Rich markup escaped."""
        return escape(printable(value))

    def site_label(r: dict[str, Any]) -> str:
        name = safe(r["name"])
        if not r["enabled"]:
            return f"[red]x {name}[/]  DISABLED"
        if r["signed_on"]:
            return (
                f"[green]● {name}[/]  up since {format_time(r['since'])} ({format_age(now - r['since'])}) "
                f"from {safe(r['source'])}; {r['active_associations']} active"
            )
        if r.get("signed_off"):
            return f"[red]○ {name}[/]  down since {format_time(r['signed_off'])} ({format_age(now - r['signed_off'])})"
        return f"[red]○ {name}[/]  down (last sign-on {format_time(r.get('last_sign_on'))})"

    tree = Tree(f"[bold]bridge[/] {safe(report.get('listen', ''))}")
    for r in routers:
        branch = tree.add(site_label(r))
        if not r["devices"]:
            branch.add("[dim](shares no devices)[/]")
        for d in r["devices"]:
            who = d["share_with"]
            shared = "every site" if "*" in who else (safe(", ".join(who)) or "nobody")
            label = f"{safe(d['ae_title'])}  [dim]shared with[/] {shared}"
            branch.add(label + (f"  [dim]({safe(d['description'])})[/]" if d["description"] else ""))
    console.print(tree)

    link_rows = report.get("links", [])
    if link_rows:
        console.print()
        table = Table(title=None, box=None, show_edge=False, pad_edge=False)
        for column in ("link (caller -> owner)", "devices", "state"):
            table.add_column(column)
        for link in link_rows:
            state = "[green]up[/]" if link["up"] else f"[red]down[/] ({safe(', '.join(link['down_sites']))} offline)"
            table.add_row(safe(f"{link['from']} -> {link['to']}"), safe(", ".join(link["devices"])), state)
        console.print(table)
    last = recent.get("last") or []
    if last:
        console.print()
        console.print(f"Last {min(len(last), 10)} associations (newest last):")
        for a in last[-10:]:
            when = time.strftime("%H:%M:%S", time.localtime(a["time"]))
            route = f"{a['from_site']} -> {a['to_site']}" if a.get("from_site") else ""
            if a["outcome"] == "refused":
                console.print(
                    printable(f"  {when}  {route:<34} refused ({a['reason']}): {a.get('detail', '')}"), markup=False
                )
            else:
                sent = format_bytes(a.get("bytes_from_initiator"))
                back = format_bytes(a.get("bytes_from_destination"))
                console.print(
                    printable(
                        f"  {when}  {route:<34} {a['outcome']:<9} {a.get('calling_ae')} -> {a.get('called_ae')}  "
                        f"{sent} / {back}, {a.get('seconds', 0):.1f} s"
                    ),
                    markup=False,
                )
    return out.getvalue().rstrip("\n")


def status_command(config: BridgeConfig, as_json: bool, *, color: bool = False) -> int:
    path = status_path(config)
    report = evaluate(*read_status(path))
    report["status_file"] = str(path)
    cluster = ""
    if is_postgres_url(config.storage.database):  # every replica, from the database
        from relay_bridge.cluster_status import read_replicas, render_replicas

        report["replicas"] = replicas = read_replicas(str(config.storage.database), config.storage.password_file)
        cluster = "\n\n" + render_replicas(replicas)
    width = shutil.get_terminal_size((120, 24)).columns if color else 120
    text = render_status(report, color=color, width=width) + cluster
    print(json.dumps(report, indent=2, sort_keys=True) if as_json else text)
    return int(report["exit_code"])

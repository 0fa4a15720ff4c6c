"""Running a daemon's asyncio main (signals, readiness), and what its command-line tools share:
switching to the state owner when run as root, progress on a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import pwd
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path

from relay_common.allocator import keep_frame_buffers
from relay_common.config import AuditSection, ConfigError
from relay_common.tlsreload import run_reload_hooks

log = logging.getLogger("relay_common.daemon")


def announce_ready(ready_file: Path | None, **facts: object) -> None:
    """Tell supervisors we are serving: a JSON file for tests, sd_notify for systemd."""
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(facts))
        tmp.replace(ready_file)
    ServiceNotifier().send("READY=1")


# -- the service manager (sd_notify(3)) ---------------------------------------------------
#
# Type=notify units get NOTIFY_SOCKET; with WatchdogSec= they also get WATCHDOG_USEC (and
# WATCHDOG_PID, the process meant). The watchdog ping is sent from a task on the daemon's own event
# loop: a loop stuck in blocking code stops pinging, and systemd restarts the service.

STATUS_POLL_S = 1.0  # how often a changed STATUS= line is noticed


class ServiceNotifier:
    """Datagrams to the service manager's notification socket; does nothing without NOTIFY_SOCKET."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        socket_path = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket; anything else must be an absolute path.
        if socket_path.startswith("@"):
            self.address: str | None = "\0" + socket_path[1:]
        elif socket_path.startswith("/"):
            self.address = socket_path
        else:
            self.address = None
        self.watchdog_s = _watchdog_interval(env)
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send one datagram of newline-separated KEY=VALUE fields; False if nobody listens."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)  # called on the event loop: a full queue drops the datagram, never waits
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:  # the manager went away or is not reading: the service keeps serving
            log.debug("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def status(self, text: str) -> None:
        """STATUS=<text>, only when it changed (systemctl status shows the latest)."""
        text = " ".join(text.split())[:200]  # one line, bounded
        if text != self._last_status and self.send(f"STATUS={text}"):
            self._last_status = text

    async def run(self, status: Callable[[], str] | None = None) -> None:
        """Until cancelled: WATCHDOG=1 at half the watchdog interval, STATUS= whenever `status()` changes."""
        if not self.enabled or (self.watchdog_s is None and status is None):
            return
        loop = asyncio.get_running_loop()
        period = STATUS_POLL_S if self.watchdog_s is None else min(STATUS_POLL_S, self.watchdog_s / 2)
        next_ping = loop.time()
        while True:
            if self.watchdog_s is not None and loop.time() >= next_ping:
                self.send("WATCHDOG=1")
                next_ping = loop.time() + self.watchdog_s / 2
            if status is not None:
                try:
                    self.status(status())
                except Exception:  # a status line bug must not stop the watchdog
                    log.exception("cannot build the service status line")
            await asyncio.sleep(period)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """WatchdogSec in seconds if it is meant for this process (sd_watchdog_enabled(3)), else None."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid.strip() != str(os.getpid())):
        return None
    return usec / 1_000_000


def _reload_requested() -> None:
    log.info("SIGHUP: re-reading certificate files")
    run_reload_hooks()


async def run_until_signalled(
    start: Callable[[], Awaitable[object]],
    stop: Callable[[], Awaitable[object]],
    status: Callable[[], str] | None = None,
) -> None:
    """Start, wait for SIGTERM or SIGINT, then stop gracefully; SIGHUP runs the reload hooks. While
    serving, the service manager gets watchdog pings and `status()` as STATUS= lines (when NOTIFY_SOCKET is set)."""
    keep_frame_buffers()  # before the first frame: large buffers are reused, not mapped per frame
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    # SIGHUP (systemctl reload): re-read certificate files now (relay_common.tlsreload hooks); it no
    # longer ends the process.
    loop.add_signal_handler(signal.SIGHUP, _reload_requested)
    await start()
    notifier = ServiceNotifier()
    keepalive = asyncio.create_task(notifier.run(status), name="sd-notify")
    try:
        await stopping.wait()
        log.info("shutting down")
        notifier.send("STOPPING=1", "STATUS=shutting down")
        await stop()
    finally:
        keepalive.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keepalive


# -- administrative commands run as root ---------------------------------------------------
#
# On an installed system the state directory (/var/lib/dicom-relay) belongs to the service user.
# An administrator who runs `sudo relay-bridge router add ...` would otherwise create the database,
# its -wal/-shm files or a router's identity key as root, and the service could no longer open
# them. Administrative commands therefore become the owner of the state directory before they touch
# it (as `sudo -u dicom-relay ...` would); `serve` refuses instead, because a daemon belongs under
# systemd (and the bridge may need root for port 443 before it could switch).


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def state_owner(state_dir: Path) -> tuple[int, int, str] | None:
    """(uid, gid, name) of the user owning `state_dir` (or its nearest existing parent) if we run
    as root and that user is not root; None otherwise. The gid is the user's primary group."""
    if os.geteuid() != 0:
        return None
    st = _nearest_existing(state_dir).stat()
    if st.st_uid == 0:
        return None
    try:
        entry = pwd.getpwuid(st.st_uid)
    except KeyError:
        return st.st_uid, st.st_gid, f"uid {st.st_uid}"
    return st.st_uid, entry.pw_gid, entry.pw_name


class OwnershipError(Exception):
    """Running as root would leave files the service user cannot read."""


def _mismatch(state_dir: Path, files: tuple[Path, ...], uid: int, name: str) -> None:
    for path in files:
        try:
            owner = path.stat().st_uid
        except FileNotFoundError:
            continue
        if owner != uid:
            raise OwnershipError(
                f"{path} belongs to uid {owner} but its state directory {state_dir} to {name}: the service "
                f"cannot use it. Fix the owner first: chown {name if not name.startswith('uid ') else uid} {path}"
            )


def become_state_owner(state_dir: Path, *, files: tuple[Path, ...] = ()) -> str | None:
    """As root, switch to the user owning `state_dir` (supplementary groups included) so that every
    file this command creates is theirs; returns a notice for stderr, or None if nothing changed.
    `files` are existing state files that must already belong to that user."""
    owner = state_owner(state_dir)
    if owner is None:
        return None
    uid, gid, name = owner
    _mismatch(state_dir, files, uid, name)
    groups = [gid] if name.startswith("uid ") else os.getgrouplist(name, gid)
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    where = _nearest_existing(state_dir)
    return f"running as {name} (the owner of {where}), so that the service can read what this creates"


def refuse_serve_as_root(state_dir: Path, program: str) -> None:
    """Raise OwnershipError when root is about to serve with a state directory that belongs to the service user."""
    owner = state_owner(state_dir)
    if owner is None:
        return
    name = owner[2]
    sudo = f"sudo -u {name} " if not name.startswith("uid ") else ""
    raise OwnershipError(
        f"refusing to serve as root: {_nearest_existing(state_dir)} belongs to {name}, and files created now "
        f"(database, keys, status, audit) would belong to root, which the service cannot read. Start the service "
        f"(systemctl start {program}), or run it as that user ({sudo}{program} ... serve)."
    )


# -- progress on a terminal ------------------------------------------------------------------


def interactive(as_json: bool = False) -> bool:
    """Progress is drawn only for a person at a terminal: never with --json, never into a pipe or file."""
    return not as_json and sys.stdout.isatty() and sys.stderr.isatty()


@contextlib.contextmanager
def spinner(text: str, *, enabled: bool) -> Iterator[None]:
    """A rich spinner on stderr while the block runs (nothing at all when not `enabled`)."""
    if not enabled:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text):
        yield


# -- startup checks shared by check-config and serve ------------------------------------------


class StartupError(Exception):
    """The daemon cannot start (for example its port is taken); the message says why and what to do."""


def unreadable_pem(path: Path, kind: str) -> str | None:
    """Why `path` cannot serve as a PEM `kind` ("certificate" or "private key") for this user, or None.

    `check-config` runs as the service user under systemd (ExecStartPre), so a key left 0600 root
    is reported there, before the daemon starts, rather than as a TLS failure later.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return f"cannot read {path}"  # (no such file)
    except PermissionError:
        try:
            st = path.stat()
            owner = f"owner uid {st.st_uid}, group gid {st.st_gid}, mode {st.st_mode & 0o777:04o}"
        except OSError:
            owner = "its directory is not accessible"
        user = pwd.getpwuid(os.geteuid()).pw_name if _has_passwd_entry(os.geteuid()) else f"uid {os.geteuid()}"
        return f"cannot read {path}: permission denied for {user} ({owner}); make it readable by the service's group"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    marker = b"-----BEGIN CERTIFICATE-----" if kind == "certificate" else b"PRIVATE KEY-----"
    if marker not in data:
        return f"{path} is not a PEM {kind} (expected a '{marker.decode().strip('-')}' block)"
    return None


def _has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def listen_error(address: str, exc: BaseException) -> StartupError:
    """A clear message for a port that cannot be bound (grpc raises RuntimeError, asyncio OSError)."""
    port = address.rpartition(":")[2]
    if isinstance(exc, OSError) and exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    elif isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL:
        why = "this host has no such address"
    else:
        why = f"the address is in use or not available (see what listens there: ss -ltnp 'sport = :{port}')"
    return StartupError(f"cannot listen on {address}: {why}")


def pem_problems(source: str, files: list[tuple[str, Path | None, str]]) -> list[ConfigError]:
    """ConfigErrors for each (dotted key, path, "certificate" or "private key") whose file cannot serve."""
    problems = []
    for key, path, kind in files:
        problem = unreadable_pem(path, kind) if path is not None else None
        if problem:
            problems.append(ConfigError(source, key, problem))
    return problems


def audit_pem_problems(source: str, audit: AuditSection) -> list[ConfigError]:
    """The [audit] collector's CA, client certificate and key, when a collector is configured."""
    if not (audit.enabled and audit.collector):
        return []
    return pem_problems(
        source,
        [
            ("audit.ca_file", audit.ca_file, "certificate"),
            ("audit.cert_file", audit.cert_file, "certificate"),
            ("audit.key_file", audit.key_file, "private key"),
        ],
    )

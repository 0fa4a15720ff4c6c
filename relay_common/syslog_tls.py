"""Audit messages to a collector: RFC 5424 syslog over TLS (RFC 5425), spooled on disk.

Loss behaviour (docs/operations.md, "Audit export"):
- `submit` never blocks: it puts the message on a bounded in-memory queue and returns.
  The daemon's event loop, which relays associations, is never held by the collector.
- One thread owns everything else: it writes each message to the spool directory
  (one file per message, mode 0600, named by a sequence number so order survives a
  restart), then sends the oldest spooled message and deletes its file once the TLS
  write returned. So when the collector is down, messages wait on disk and are sent,
  in order, when it is back; after a restart too.
- The spool is bounded by `limit_bytes`. A message that does not fit (or finds the
  in-memory queue full) is dropped, counted in `overflowed`, and logged (a warning at
  the first drop of an outage, then every 100th), never silently.
- RFC 5425 has no acknowledgement. Before each write the thread checks whether the
  collector closed the connection (it never sends anything, so a readable socket
  means EOF), so a collector that was stopped does not swallow the next message into
  a dead connection. A collector that vanishes without closing can still lose the
  messages written in that window (TCP buffers); that is the protocol's limit.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import logging
import os
import queue
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger("relay_common.syslog_tls")

FACILITY_AUDIT = 13  # RFC 5424 "log audit"
_SPOOL_NAME = re.compile(r"^(\d{12})\.msg\Z")
IDLE_WAIT_S = 5.0  # an idle sender sleeps on its queue this long at a time (stop() wakes it at once)
MAX_MESSAGE = 64 * 1024  # a syslog message larger than this is truncated by many collectors


def parse_collector(url: str) -> tuple[str, int]:
    """ "tls://host:port" -> (host, port); ValueError names what is wrong."""
    parts = urlsplit(url)
    if parts.scheme != "tls":
        raise ValueError(f'expected "tls://HOST:PORT" (RFC 5425 syslog over TLS), got {url!r}')
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or not 0 < port < 65536 or parts.path not in ("", "/"):
        raise ValueError(f'expected "tls://HOST:PORT" with a port from 1 to 65535, got {url!r}')
    return parts.hostname, port


def format_rfc5424(
    message: bytes, *, app: str, msgid: str, severity: int, hostname: str | None = None, when: dt.datetime | None = None
) -> bytes:
    """One RFC 5424 syslog message (HEADER SP "-" SP MSG) carrying `message` as MSG.

    The MSG is UTF-8 XML, so it starts with the UTF-8 BOM as RFC 5424 6.4 asks. Header
    fields are printable US-ASCII without spaces, cut to their RFC lengths.
    """

    def field(text: str, limit: int) -> str:
        clean = "".join(c for c in text if 33 <= ord(c) <= 126)[:limit]
        return clean or "-"

    when = when or dt.datetime.now(dt.UTC)
    pri = FACILITY_AUDIT * 8 + severity
    header = (
        f"<{pri}>1 {when.isoformat(timespec='milliseconds').replace('+00:00', 'Z')} "
        f"{field(hostname or socket.gethostname(), 255)} {field(app, 48)} {os.getpid()} {field(msgid, 32)} -"
    )
    return header.encode("ascii") + b" \xef\xbb\xbf" + message


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting framing: MSG-LEN SP SYSLOG-MSG."""
    return str(len(message)).encode("ascii") + b" " + message


@dataclass(frozen=True)
class CollectorSettings:
    url: str  # tls://host:port
    ca_file: Path | None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""  # TLS name to verify when the URL's host is an address
    spool_dir: Path = Path("audit-spool")
    limit_bytes: int = 64 * 1024 * 1024
    queue_messages: int = 10_000  # in memory, between the event loop and the sender thread
    retry_s: float = 2.0
    connect_timeout_s: float = 10.0


class SyslogTlsSender:
    """A thread that spools messages on disk and sends them, in order, to a TLS syslog collector."""

    def __init__(self, settings: CollectorSettings) -> None:
        self.settings = settings
        self.host, self.port = parse_collector(settings.url)
        self.sent = 0
        self.overflowed = 0
        self._overflow_lock = threading.Lock()  # counted from the event loop (queue full) and the thread
        self.connected = False
        self.last_error = ""
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=settings.queue_messages)
        self._stop = threading.Event()
        self._sock: ssl.SSLSocket | None = None
        self._context = self._tls_context()
        settings.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Messages spooled by an earlier run go first, in their order.
        self._files: collections.deque[Path] = collections.deque(
            sorted(p for p in settings.spool_dir.iterdir() if _SPOOL_NAME.match(p.name))
        )
        self._next = (int(self._files[-1].name[:12]) + 1) if self._files else 0
        self._spool_bytes = sum(p.stat().st_size for p in self._files)
        self._thread = threading.Thread(target=self._run, name="audit-syslog-tls", daemon=True)

    def _tls_context(self) -> ssl.SSLContext:
        # BCP 195 as the bridge link: TLS 1.2 at least, certificate and name verified.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.settings.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.settings.cert_file is not None:
            context.load_cert_chain(self.settings.cert_file, self.settings.key_file)
        return context

    def start(self) -> None:
        self._thread.start()

    def submit(self, message: bytes) -> bool:
        """Queue one syslog message (RFC 5424, unframed); False when it had to be dropped."""
        try:
            self._queue.put_nowait(message[:MAX_MESSAGE])
        except queue.Full:
            self._overflow("the in-memory audit queue is full")
            return False
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Spool what is queued, try to send for up to `timeout_s`, then stop (the rest stays spooled)."""
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def spooled(self) -> int:
        return len(self._files)

    @property
    def spooled_bytes(self) -> int:
        return self._spool_bytes

    # -- the thread ---------------------------------------------------------------------
    def _overflow(self, why: str) -> None:
        with self._overflow_lock:
            self.overflowed += 1
            count = self.overflowed
        if count == 1 or count % 100 == 0:
            log.warning(
                "audit message dropped (%d so far): %s; collector %s, spool limit %d bytes",
                self.overflowed,
                why,
                self.settings.url,
                self.settings.limit_bytes,
            )

    def _spool(self, message: bytes) -> None:
        if self._spool_bytes + len(message) > self.settings.limit_bytes:
            self._overflow("the audit spool is full (collector unreachable?)")
            return
        while True:
            path = self.settings.spool_dir / f"{self._next:012d}.msg"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process (an admin command) spools here too
                self._next += 1
                continue
            except OSError as exc:
                self._overflow(f"cannot write to the spool: {exc}")
                return
            break
        try:
            os.write(fd, message)
        finally:
            os.close(fd)
        self._next += 1
        self._spool_bytes += len(message)
        self._files.append(path)

    def _drain(self, wait_s: float) -> bool:
        """Move queued messages to the spool (waiting up to `wait_s` for the first); False on stop."""
        try:
            item = self._queue.get(timeout=wait_s) if wait_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            self._spool(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True

    def _run(self) -> None:
        stopping = False
        while True:
            if not self._drain(0 if self._files or stopping else IDLE_WAIT_S):
                stopping = True
            if not self._files:
                if stopping:
                    break
                continue
            try:
                self._send(self._files[0])
            except OSError as exc:
                self._disconnect()
                error = f"{exc.__class__.__name__}: {exc}"
                if self.connected or not self.last_error:
                    log.warning(
                        "audit collector %s unreachable: %s (messages wait in the spool)", self.settings.url, error
                    )
                self.connected = False
                self.last_error = error
                if stopping or not self._drain(self.settings.retry_s):
                    break
        self._disconnect()

    def _send(self, path: Path) -> None:
        sock = self._connection()
        message = path.read_bytes()
        sock.sendall(frame(message))
        path.unlink()
        self._files.popleft()
        self._spool_bytes -= len(message)
        self.sent += 1

    def _connection(self) -> ssl.SSLSocket:
        if self._sock is not None and self._peer_closed(self._sock):
            self._disconnect()
        if self._sock is None:
            raw = socket.create_connection((self.host, self.port), timeout=self.settings.connect_timeout_s)
            try:
                name = self.settings.server_name or self.host
                self._sock = self._context.wrap_socket(raw, server_hostname=name)
            except BaseException:
                raw.close()
                raise
            self._sock.settimeout(self.settings.connect_timeout_s)  # a stuck collector must not hold us forever
            if not self.connected:
                log.info("audit collector %s connected", self.settings.url)
            self.connected = True
        return self._sock

    @staticmethod
    def _peer_closed(sock: ssl.SSLSocket) -> bool:
        """Whether the collector closed the connection (it never sends data, so readable means EOF).

        A readable socket may also hold TLS 1.3 session tickets: reading them non-blocking
        raises SSLWantReadError, and the connection is still good.
        """
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return False
            timeout = sock.gettimeout()
            sock.setblocking(False)
            try:
                return sock.recv(4096) == b""
            finally:
                sock.settimeout(timeout)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except (OSError, ValueError):
            return True

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None


def wait_until(predicate: object, timeout_s: float) -> bool:
    """Poll `predicate()` until true or `timeout_s` passes (tests and shutdown)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return bool(predicate())  # type: ignore[operator]

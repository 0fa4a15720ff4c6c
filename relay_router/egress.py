"""The router's outbound HTTP: which proxy to use, which spill URLs to open, and a bounded client.

A router opens two kinds of outbound connections: its gRPC link to the bridge, and, for the
cloud spill, presigned URLs of the blob store. Both may have to go through the hospital's HTTP
proxy (`[bridge] proxy`, else the standard `https_proxy`/`http_proxy` variables), except for
hosts listed in `no_proxy` (matched as curl and requests do).

Spill URLs come from the bridge, which is not trusted (docs/security.md). So a router opens
only URLs under a blob store endpoint it was configured with (`[dicom] spill_endpoints`), never
follows a redirect, reads at most `MAX_STORED_PART` bytes of an answer, and keeps the failure's
wording in its own log: a bridge that hands out a URL on the hospital's LAN learns nothing.

The HTTP client (`HttpClient`) keeps connections alive: at 100 ms to the store, a new
connection per 1 MiB part cost its TCP (and TLS) handshake and a fresh slow start every time.
It is urllib3's (already in the lock file through boto3 and requests): a pool manager per proxy
(`ProxyManager`: CONNECT for https, absolute form for http, basic proxy authentication from the
proxy URL's user info), and in it a pool per origin (scheme, host, port), so a connection is only
ever reused for the same store through the same proxy. Redirects are not followed, urllib3's own
retries are off, content is never decoded, and a connection goes back to its pool only when its
answer was read to the end (an answer cut short, refused or over the limit closes it).
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import urllib3
import urllib3.connection
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ProxyError as Urllib3ProxyError

PRESIGNED_SCHEME = "file+presigned"  # the bridge's own store: URLs are capabilities for its blob RPCs
MAX_PART_BYTES = 8 * 1024 * 1024  # the largest spill_part_bytes a router may be configured with
# A stored part is the part (compressed only when that makes it smaller) plus a flag byte and the
# AEAD tag; the slack also covers zstd's frame header on data that barely compresses.
MAX_STORED_PART = MAX_PART_BYTES + 64 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}
# Idle connections kept per origin (and proxy). More may be open at once (the router's thread pool
# runs a handful of transfers side by side); those close after their request instead of waiting.
POOL_CONNECTIONS = 8
# Origins (scheme, host, port) with a pool, per proxy: a router reaches one store, maybe two.
POOL_ORIGINS = 4
# Requests that may be sent again once when their connection broke (the peer closed or reset it,
# typically a kept-alive connection the store had just closed): both are idempotent here, a GET of a
# part, and a PUT of a part's exact bytes to its presigned key (the bridge charged the part's quota
# when it signed the URL, by blob and part, so a second PUT charges nothing).
RETRIED_ONCE = frozenset({"GET", "PUT"})


class EgressError(Exception):
    """An outbound HTTP request failed; `status` is the HTTP status when there was one."""

    def __init__(self, detail: str, *, status: int | None = None, phrase: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.phrase = phrase  # the HTTP reason phrase, when there was an answer


class UrlRefused(EgressError):
    """A URL this router will not open (not under a configured endpoint, or a scheme it does not use)."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Endpoint:
    """A normalised blob store endpoint: scheme, host, port and path prefix (always ending in '/')."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, url: str, *, allow_insecure_http: bool = False) -> Endpoint:
        """The endpoint `url` names; ValueError (naming what is wrong) if it is not acceptable."""
        parts = urllib.parse.urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"{url!r} must be an https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"{url!r} must not contain a user or password")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r} must not have a query or fragment")
        host = (parts.hostname or "").lower()
        if not host:
            raise ValueError(f"{url!r} has no host")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise ValueError(f"{url!r} has an invalid port") from None
        if scheme == "http" and not (allow_insecure_http and _is_loopback(host)):
            raise ValueError(
                f"{url!r}: http:// is accepted only for a loopback host with spill_allow_insecure_http = true"
            )
        path = parts.path or "/"
        if not path.endswith("/"):
            path += "/"  # a prefix "bucket" must not match "bucket-other"
        if _has_dot_segments(path):
            raise ValueError(f"{url!r} has '.' or '..' path segments")
        return cls(scheme, host, port, path)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


def _has_dot_segments(path: str) -> bool:
    return any(segment in (".", "..") for segment in urllib.parse.unquote(path).replace("\\", "/").split("/"))


class UrlPolicy:
    """Which spill URLs from the bridge this router opens (docs/security.md, "Spill URLs")."""

    def __init__(self, endpoints: Iterable[Endpoint] = ()) -> None:
        self.endpoints = tuple(endpoints)

    def check(self, url: str) -> str:
        """'presigned' for the bridge's own store, 'http' for one under an endpoint; UrlRefused otherwise.

        The refusal's text names the URL's origin, never its path or query (which may hold a signature).
        """
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme == PRESIGNED_SCHEME:
            return "presigned"  # a capability for the bridge's own RPCs: no connection is opened
        if scheme not in DEFAULT_PORTS:
            raise UrlRefused(f"a spill URL with scheme {scheme!r} (only https or {PRESIGNED_SCHEME})")
        try:
            host = (parts.hostname or "").lower()
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise UrlRefused("a spill URL with an invalid port") from None
        origin = f"{scheme}://{host}:{port}"
        if not self.endpoints:
            raise UrlRefused(
                f"a spill URL at {origin}, and [dicom] spill_endpoints is empty "
                "(this router opens only the bridge's own store unless endpoints are configured)"
            )
        if "@" in parts.netloc or parts.fragment or _has_dot_segments(parts.path) or "\\" in url:
            raise UrlRefused(f"a malformed spill URL at {origin}")
        for endpoint in self.endpoints:
            if (scheme, host, port) == (endpoint.scheme, endpoint.host, endpoint.port) and parts.path.startswith(
                endpoint.path
            ):
                return "http"
        raise UrlRefused(f"a spill URL at {origin}, outside [dicom] spill_endpoints")


# -- proxies ---------------------------------------------------------------------------------


def _env(environ: Mapping[str, str], *names: str) -> str:
    for name in names:
        value = environ.get(name) or environ.get(name.upper())
        if value:
            return value
    return ""


def no_proxy_match(host: str, port: int, entries: Iterable[str]) -> bool:
    """Whether `no_proxy` exempts host:port, as curl reads it.

    Entries are separated by commas; "*" matches every host; "example.org" and ".example.org"
    match that domain and its subdomains; an IP address matches itself and a CIDR network its
    addresses; an entry with ":port" matches that port only.
    """
    host = host.lower().strip("[]")
    for raw in entries:
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_port: int | None = None
        if entry.count(":") == 1 and entry.rsplit(":", 1)[1].isdigit():  # host:port (not an IPv6 address)
            entry, digits = entry.rsplit(":", 1)
            entry_port = int(digits)
        entry = entry.strip("[]")
        if entry_port is not None and entry_port != port:
            continue
        if "/" in entry:
            try:
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.removeprefix("*").removeprefix(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False


def split_no_proxy(value: str | Iterable[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in v.split(",")]
    return tuple(p.strip() for p in items if p.strip())


def redact(proxy_url: str) -> str:
    """The proxy URL without its password (for logs and status)."""
    parts = urllib.parse.urlsplit(proxy_url)
    if parts.password is None:
        return proxy_url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def with_password(proxy_url: str, password: str) -> str:
    """`proxy_url` with its user's password set to `password` (percent-encoded)."""
    parts = urllib.parse.urlsplit(proxy_url)
    if not parts.username:
        raise ValueError("proxy_password_file needs a user name in the proxy URL (http://user@host:port)")
    host = parts.hostname or ""
    netloc = f"{parts.username}:{urllib.parse.quote(password, safe='')}@{host}" + (
        f":{parts.port}" if parts.port else ""
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_proxy_url(url: str) -> None:
    """ValueError unless `url` is an http:// proxy with a host (the CONNECT proxy both clients use)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ValueError(f"{redact(url)!r} must look like http://[user:password@]host:port")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError(f"{redact(url)!r} has an invalid port") from None


@dataclass(frozen=True)
class ProxySettings:
    """The proxy (with credentials) for https and http targets, and the hosts that bypass it."""

    https: str = ""
    http: str = ""
    no_proxy: tuple[str, ...] = ()
    from_environment: bool = False

    @classmethod
    def resolve(
        cls, proxy: str, no_proxy: str | Iterable[str] | None, environ: Mapping[str, str] | None = None
    ) -> ProxySettings:
        """The configured proxy, else the standard variables (https_proxy, http_proxy, no_proxy)."""
        environ = os.environ if environ is None else environ
        exempt = split_no_proxy(no_proxy) if no_proxy is not None else split_no_proxy(_env(environ, "no_proxy"))
        if proxy:
            return cls(https=proxy, http=proxy, no_proxy=exempt)
        https = _env(environ, "https_proxy", "http_proxy")
        http = _env(environ, "http_proxy")
        return cls(https=https, http=http, no_proxy=exempt, from_environment=bool(https or http))

    def for_target(self, scheme: str, host: str, port: int) -> str:
        """The proxy URL for a connection to host:port ('' for a direct connection)."""
        proxy = self.https if scheme == "https" else self.http
        if not proxy or no_proxy_match(host, port, self.no_proxy):
            return ""
        return proxy


# -- the bounded HTTP client -------------------------------------------------------------------


class _Connections:
    """A count of the TCP connections a client made (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.made = 0

    def add(self) -> None:
        with self._lock:
            self.made += 1


def _counting_pools(count: _Connections) -> dict[str, type[urllib3.HTTPConnectionPool]]:
    """Pool classes whose connections count each TCP connection they make: a pooled connection object
    that was closed (by the store, or by us after an unread answer) connects again on its next use."""

    class Connection(urllib3.connection.HTTPConnection):
        def connect(self) -> None:
            count.add()
            super().connect()

    class TlsConnection(urllib3.connection.HTTPSConnection):
        def connect(self) -> None:
            count.add()
            super().connect()

    class Pool(urllib3.HTTPConnectionPool):
        ConnectionCls = Connection

    class TlsPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = TlsConnection

    return {"http": Pool, "https": TlsPool}


def _proxy_manager(proxy: str, count: _Connections) -> urllib3.PoolManager:
    """A pool manager for connections through `proxy` ('' for direct ones)."""
    common: dict[str, object] = {"num_pools": POOL_ORIGINS, "maxsize": POOL_CONNECTIONS, "block": False}
    if not proxy:
        manager = urllib3.PoolManager(**common)  # type: ignore[arg-type]
        manager.pool_classes_by_scheme = _counting_pools(count)
        return manager
    parts = urllib.parse.urlsplit(proxy)
    headers = {}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        headers = urllib3.make_headers(proxy_basic_auth=f"{user}:{password}")
    bare = f"http://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    proxied = urllib3.ProxyManager(bare, proxy_headers=headers, **common)  # type: ignore[arg-type]
    proxied.pool_classes_by_scheme = _counting_pools(count)
    return proxied


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and what it wraps (urllib3 nests the socket's error in its own), outermost first."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        inner = current.__cause__ or current.__context__
        if inner is None and current.args and isinstance(current.args[-1], BaseException):
            inner = current.args[-1]
        current = inner
    return seen


_BROKEN = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.RemoteDisconnected)


def _broken_connection(exc: BaseException) -> bool:
    """The connection broke under the request (closed or reset by the peer, or its answer cut short):
    not a timeout, a refused connection, a TLS or proxy failure, or an answer."""
    chain = _chain(exc)
    if any(isinstance(e, TimeoutError | Urllib3ProxyError) or "Tunnel connection failed" in str(e) for e in chain):
        return False
    return any(isinstance(e, (*_BROKEN, http.client.IncompleteRead)) for e in chain)


class HttpClient:
    """Requests to URLs already checked by UrlPolicy, over kept-alive connections; thread-safe.

    One per router (relay_router.spill_store.BridgeBlobTransport), used from worker threads. The proxy
    of each request is `proxies.for_target(...)`; each proxy ('' = direct) has its own pool manager,
    so a connection made through one proxy, or directly, is never used for another. `opened` counts
    the connections made (a measure of reuse).
    """

    def __init__(self, proxies: ProxySettings) -> None:
        self.proxies = proxies
        self._lock = threading.Lock()
        self._managers: dict[str, urllib3.PoolManager] = {}
        self._closed = False
        self._connections = _Connections()

    def _manager(self, proxy: str) -> urllib3.PoolManager:
        with self._lock:
            if self._closed:
                raise EgressError("the HTTP client is closed")
            manager = self._managers.get(proxy)
            if manager is None:
                manager = self._managers[proxy] = _proxy_manager(proxy, self._connections)
            return manager

    @property
    def opened(self) -> int:
        """TCP connections made so far (to stores, or to proxies): a measure of reuse."""
        return self._connections.made

    def close(self) -> None:
        """Close every kept connection; later requests fail."""
        with self._lock:
            self._closed = True
            managers = list(self._managers.values())
            self._managers.clear()
        for manager in managers:
            manager.clear()

    def request(
        self, method: str, url: str, data: bytes | None, *, limit: int = MAX_STORED_PART, timeout_s: float = 60.0
    ) -> bytes:
        """The body (at most `limit` bytes) or EgressError; sent again once if its connection broke."""
        try:
            return self._once(method, url, data, limit, timeout_s)
        except _Broken as broken:
            if method not in RETRIED_ONCE:
                raise broken.error from None
        try:
            return self._once(method, url, data, limit, timeout_s)
        except _Broken as broken:
            raise broken.error from None

    def _once(self, method: str, url: str, data: bytes | None, limit: int, timeout_s: float) -> bytes:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname or ""
        proxy = self.proxies.for_target(scheme, host, parts.port or DEFAULT_PORTS.get(scheme, 443))
        via = f" through the proxy {redact(proxy)}" if proxy else ""
        what = f"{method} {scheme}://{host}" + (f":{parts.port}" if parts.port else "")
        headers = {"Content-Type": "application/octet-stream"} if data is not None else {}
        try:
            response = self._manager(proxy).request(
                method,
                url,
                body=data,
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,
                decode_content=False,
                timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
            )
        except (Urllib3Error, OSError, ValueError) as exc:
            error = _request_error(exc, what, via, proxy)
            if _broken_connection(exc):
                raise _Broken(error) from None
            raise error from None
        complete = False
        try:
            status = response.status
            if status == 407:
                raise EgressError(
                    f"{what}{via}: the proxy requires authentication or refused the credentials (HTTP 407)", status=407
                )
            if 300 <= status < 400:
                raise EgressError(f"{what}{via}: redirect refused (HTTP {status})", status=status)
            if not 200 <= status < 300:
                raise EgressError(
                    f"{what}{via}: HTTP {status} {response.reason}", status=status, phrase=response.reason or ""
                )
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise EgressError(f"{what}{via}: the answer announces {length} bytes (limit {limit})")
            body = bytearray()
            while chunk := response.read(min(1 << 20, limit + 1 - len(body)), decode_content=False):
                body += chunk
                if len(body) > limit:
                    raise EgressError(f"{what}{via}: the answer is longer than {limit} bytes")
            complete = True
            return bytes(body)
        except (Urllib3Error, OSError, ValueError) as exc:
            error = EgressError(f"{what}{via}: {_reason(exc)}")
            if _broken_connection(exc):
                raise _Broken(error) from None
            raise error from None
        finally:
            if not complete:
                response.close()  # the rest of the answer is unread: the connection is not reused
            response.release_conn()


class _Broken(Exception):
    """A request whose connection broke: `error` is what the caller sees if it is not sent again."""

    def __init__(self, error: EgressError) -> None:
        super().__init__(error.detail)
        self.error = error


def _reason(exc: BaseException) -> str:
    """The innermost useful text of an error urllib3 wrapped (the socket's own words)."""
    chain = _chain(exc)
    for error in reversed(chain):
        text = str(error)
        if text and not isinstance(error, Urllib3Error):
            return text
    return str(exc)


def _request_error(exc: BaseException, what: str, via: str, proxy: str) -> EgressError:
    """EgressError for a request that got no answer: the proxy's refusal or absence named as such."""
    chain = _chain(exc)
    tunnel = next((str(e) for e in chain if "Tunnel connection failed" in str(e)), "")
    if proxy and tunnel:
        code = tunnel.split(":", 1)[-1].strip()
        return EgressError(
            f"{what}{via}: the proxy refused the tunnel ({code})"
            + (" - check the proxy user and password" if code.startswith("407") else ""),
            status=int(code[:3]) if code[:3].isdigit() else None,
        )
    text = _reason(exc)
    if proxy and isinstance(exc, Urllib3ProxyError) and "ssl" not in text.lower():
        return EgressError(f"{what}: the proxy {redact(proxy)} is unreachable ({text})")
    return EgressError(f"{what}{via}: {text}")


def http_request(
    method: str,
    url: str,
    data: bytes | None,
    *,
    proxies: ProxySettings,
    limit: int = MAX_STORED_PART,
    timeout_s: float = 60.0,
) -> bytes:
    """One request on a connection of its own (a router's transfers use its `HttpClient`)."""
    client = HttpClient(proxies)
    try:
        return client.request(method, url, data, limit=limit, timeout_s=timeout_s)
    finally:
        client.close()

"""The router's outbound HTTP: which proxy to use, which spill URLs to open, and a bounded client.

A router opens two kinds of outbound connections: its gRPC link to the bridge, and, for the
cloud spill, presigned URLs of the blob store. Both may have to go through the hospital's HTTP
proxy (`[bridge] proxy`, else the standard `https_proxy`/`http_proxy` variables), except for
hosts listed in `no_proxy` (matched as curl and requests do).

Spill URLs come from the bridge, which is not trusted (docs/security.md). So a router opens
only URLs under a blob store endpoint it was configured with (`[dicom] spill_endpoints`), never
follows a redirect, reads at most `MAX_STORED_PART` bytes of an answer, and keeps the failure's
wording in its own log: a bridge that hands out a URL on the hospital's LAN learns nothing.

The HTTP client is urllib from the standard library with a custom opener (ProxyHandler for the
proxy, CONNECT for https and absolute-form for http, basic proxy authentication from the
proxy URL's user info; a redirect handler that refuses): it does everything needed here, so no
extra dependency.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PRESIGNED_SCHEME = "file+presigned"  # the bridge's own store: URLs are capabilities for its blob RPCs
MAX_PART_BYTES = 8 * 1024 * 1024  # the largest spill_part_bytes a router may be configured with
# A stored part is the part (compressed only when that makes it smaller) plus a flag byte and the
# AEAD tag; the slack also covers zstd's frame header on data that barely compresses.
MAX_STORED_PART = MAX_PART_BYTES + 64 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}


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


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx is an error: a spill URL must not send the router anywhere else."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _opener(proxy: str) -> urllib.request.OpenerDirector:
    proxies = {"http": proxy, "https": proxy} if proxy else {}
    return urllib.request.build_opener(urllib.request.ProxyHandler(proxies), _RefuseRedirects())


def http_request(
    method: str,
    url: str,
    data: bytes | None,
    *,
    proxies: ProxySettings,
    limit: int = MAX_STORED_PART,
    timeout_s: float = 60.0,
) -> bytes:
    """One request to a URL already checked by UrlPolicy: the body (at most `limit` bytes) or EgressError."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    proxy = proxies.for_target(scheme, host, parts.port or DEFAULT_PORTS.get(scheme, 443))
    via = f" through the proxy {redact(proxy)}" if proxy else ""
    origin = f"{scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/octet-stream")
    try:
        with _opener(proxy).open(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise EgressError(f"{method} {origin}{via}: the answer announces {length} bytes (limit {limit})")
            body: bytes = response.read(limit + 1)
            if len(body) > limit:
                raise EgressError(f"{method} {origin}{via}: the answer is longer than {limit} bytes")
            return body
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 407:
            raise EgressError(
                f"{method} {origin}{via}: the proxy requires authentication or refused the credentials (HTTP 407)",
                status=407,
            ) from None
        if 300 <= exc.code < 400:
            raise EgressError(f"{method} {origin}{via}: redirect refused (HTTP {exc.code})", status=exc.code) from None
        raise EgressError(
            f"{method} {origin}{via}: HTTP {exc.code} {exc.reason}", status=exc.code, phrase=str(exc.reason)
        ) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = str(reason)
        if proxy and "Tunnel connection failed" in text:
            code = text.split(":", 1)[-1].strip()
            raise EgressError(
                f"{method} {origin}{via}: the proxy refused the tunnel ({code})"
                + (" - check the proxy user and password" if code.startswith("407") else ""),
                status=int(code[:3]) if code[:3].isdigit() else None,
            ) from None
        if proxy and isinstance(reason, ConnectionRefusedError | TimeoutError | OSError) and "ssl" not in text.lower():
            raise EgressError(f"{method} {origin}: the proxy {redact(proxy)} is unreachable ({text})") from None
        raise EgressError(f"{method} {origin}{via}: {text}") from None
    except (OSError, ValueError) as exc:
        raise EgressError(f"{method} {origin}{via}: {exc}") from None

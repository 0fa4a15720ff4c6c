"""relay_router.egress: which spill URLs a router opens, which proxy it uses, and a bounded HTTP client.

The HTTP tests use real sockets on 127.0.0.1 (http.server): a redirect is refused without the
redirect's target being asked anything, an answer longer than the limit is refused, and a
request through a proxy is sent in absolute form with the proxy's basic credentials.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from relay_common.config import ConfigError
from relay_router import config as router_config
from relay_router.egress import (
    EgressError,
    Endpoint,
    ProxySettings,
    UrlPolicy,
    UrlRefused,
    http_request,
    no_proxy_match,
    redact,
    with_password,
)
from relay_router.spill import SpillFailed, SpillReceiver, SpillUnavailable
from relay_router.spill_store import FETCH_FAILED, URL_REFUSED, BridgeBlobTransport
from relay_router.wire.features import SPILL, Features
from tests.unit.router.test_spill import AID, MemoryTransport, sent_blob

S3 = "https://s3.eu-west-1.amazonaws.com/bucket/"


# -- endpoints and the URL policy -----------------------------------------------------------------


def test_endpoints_are_normalised() -> None:
    assert (
        str(Endpoint.parse("HTTPS://S3.eu-west-1.amazonaws.com/bucket"))
        == "https://s3.eu-west-1.amazonaws.com:443/bucket/"
    )
    assert Endpoint.parse("http://127.0.0.1:9000", allow_insecure_http=True).path == "/"


@pytest.mark.parametrize(
    ("url", "insecure", "why"),
    [
        ("http://127.0.0.1:9000/", False, "only for a loopback host with spill_allow_insecure_http"),
        ("http://10.1.2.3:9000/", True, "only for a loopback host"),
        ("ftp://store.example.org/", False, "must be an https:// URL"),
        ("https://user:pw@store.example.org/", False, "must not contain a user or password"),
        ("https://store.example.org/a?b=1", False, "must not have a query"),
        ("https://store.example.org/a/../b/", False, "'..' path segments"),
    ],
)
def test_bad_endpoints_are_refused_with_the_reason(url: str, insecure: bool, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Endpoint.parse(url, allow_insecure_http=insecure)


def test_the_bridge_own_store_is_always_accepted_and_nothing_else_without_endpoints() -> None:
    policy = UrlPolicy()
    assert policy.check("file+presigned:///spill%2Fx?method=GET&sig=abc") == "presigned"
    with pytest.raises(UrlRefused, match="spill_endpoints is empty"):
        policy.check(S3 + "key?X-Amz-Signature=secret")


@pytest.mark.parametrize(
    "url",
    [
        "https://s3.eu-west-1.amazonaws.com/bucket-other/key",  # a prefix is a path prefix, not a string prefix
        "https://s3.eu-west-1.amazonaws.com/other/key",
        "https://s3.eu-west-1.amazonaws.com:8443/bucket/key",
        "http://s3.eu-west-1.amazonaws.com/bucket/key",
        "https://s3.eu-west-1.amazonaws.com.evil.org/bucket/key",
        "https://10.0.0.5/bucket/key",
        "https://s3.eu-west-1.amazonaws.com/bucket/../admin",
        "https://s3.eu-west-1.amazonaws.com/bucket/%2e%2e/admin",
        "https://x@s3.eu-west-1.amazonaws.com/bucket/key",
        "gopher://s3.eu-west-1.amazonaws.com/bucket/key",
        "file:///etc/passwd",
    ],
)
def test_urls_outside_the_endpoints_are_refused(url: str) -> None:
    policy = UrlPolicy([Endpoint.parse(S3)])
    with pytest.raises(UrlRefused) as refused:
        policy.check(url)
    assert "secret" not in refused.value.detail


def test_urls_under_an_endpoint_are_accepted_whatever_the_case_of_scheme_and_host() -> None:
    policy = UrlPolicy([Endpoint.parse(S3)])
    assert policy.check("https://S3.eu-west-1.amazonaws.com:443/bucket/spill/a/b/000001?X-Amz-Signature=1") == "http"


def test_a_refusal_names_the_origin_never_the_path_or_signature() -> None:
    with pytest.raises(UrlRefused) as refused:
        UrlPolicy([Endpoint.parse(S3)]).check("https://10.0.0.5:8080/admin/secret-path?sig=signature")
    assert refused.value.detail == "a spill URL at https://10.0.0.5:8080, outside [dicom] spill_endpoints"


# -- proxies --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "entries", "bypass"),
    [
        ("bridge.example.org", 443, ["*"], True),
        ("bridge.example.org", 443, ["example.org"], True),
        ("bridge.example.org", 443, [".example.org"], True),
        ("bridge.example.org", 443, ["*.example.org"], True),
        ("example.org", 443, [".example.org"], True),
        ("badexample.org", 443, ["example.org"], False),
        ("bridge.example.org", 443, ["other.org", " "], False),
        ("10.1.2.3", 443, ["10.0.0.0/8"], True),
        ("11.1.2.3", 443, ["10.0.0.0/8"], False),
        ("127.0.0.1", 9000, ["127.0.0.1"], True),
        ("bridge.example.org", 443, ["bridge.example.org:8443"], False),
        ("bridge.example.org", 8443, ["bridge.example.org:8443"], True),
        ("BRIDGE.example.org", 443, ["Example.ORG"], True),
    ],
)
def test_no_proxy_is_read_as_curl_does(host: str, port: int, entries: list[str], bypass: bool) -> None:
    assert no_proxy_match(host, port, entries) is bypass


def test_the_configured_proxy_wins_over_the_environment() -> None:
    env = {"HTTPS_PROXY": "http://env-proxy:3128", "no_proxy": "internal.org"}
    settings = ProxySettings.resolve("http://cfg-proxy:3128", ["bridge.example.org"], env)
    assert settings.for_target("https", "store.example.org", 443) == "http://cfg-proxy:3128"
    assert settings.for_target("https", "bridge.example.org", 443) == ""
    assert settings.for_target("https", "x.internal.org", 443) == "http://cfg-proxy:3128"


def test_the_standard_variables_are_the_fallback() -> None:
    env = {"https_proxy": "http://s:1", "http_proxy": "http://h:2", "NO_PROXY": "localhost,.lan"}
    settings = ProxySettings.resolve("", None, env)
    assert settings.from_environment
    assert settings.for_target("https", "bridge.example.org", 443) == "http://s:1"
    assert settings.for_target("http", "127.0.0.2", 9000) == "http://h:2"
    assert settings.for_target("https", "pacs.lan", 443) == ""
    assert ProxySettings.resolve("", None, {}).for_target("https", "x", 443) == ""


def test_proxy_credentials_never_appear_in_what_is_shown() -> None:
    assert redact("http://user:s3cret@proxy:3128") == "http://user:***@proxy:3128"
    assert with_password("http://user@proxy:3128", "p@ss:word") == "http://user:p%40ss%3Aword@proxy:3128"
    with pytest.raises(ValueError, match="needs a user name"):
        with_password("http://proxy:3128", "x")


# -- the bounded HTTP client ----------------------------------------------------------------------


class Server(http.server.ThreadingHTTPServer):
    """Answers by path: /redirect (302 to /target), /big (limit + 1 bytes, no Content-Length), /missing (404)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []  # method, request target, Proxy-Authorization
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                server.seen.append((self.command, self.path, self.headers.get("Proxy-Authorization", "")))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("://", 1)[-1].split("/", 1)[-1]  # absolute form through a "proxy"
                if path.startswith("redirect"):
                    self.send_response(302)
                    self.send_header("Location", "/target")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path.startswith("big"):
                    self.send_response(200)
                    self.end_headers()  # no Content-Length: the client must cap what it reads
                    self.wfile.write(b"x" * 1001)
                    self.close_connection = True
                elif path.startswith("missing"):
                    self.send_error(404)
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")

            do_GET = do_PUT = _answer

            def do_CONNECT(self) -> None:  # as a proxy that wants other credentials
                server.seen.append((self.command, self.path, self.headers.get("Proxy-Authorization", "")))
                self.send_response(407, "Proxy Authentication Required")
                self.send_header("Proxy-Authenticate", 'Basic realm="test"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.shutdown()
    s.server_close()


DIRECT = ProxySettings()


def test_a_redirect_is_refused_and_its_target_never_asked(server: Server) -> None:
    with pytest.raises(EgressError, match=r"redirect refused \(HTTP 302\)") as refused:
        http_request("GET", server.url + "/redirect", None, proxies=DIRECT)
    assert refused.value.status == 302
    assert [path for _, path, _ in server.seen] == ["/redirect"]


def test_an_answer_longer_than_the_limit_is_refused(server: Server) -> None:
    with pytest.raises(EgressError, match="longer than 1000 bytes"):
        http_request("GET", server.url + "/big", None, proxies=DIRECT, limit=1000)
    assert http_request("GET", server.url + "/ok", None, proxies=DIRECT, limit=1000) == b"ok"


def test_an_http_error_keeps_its_status(server: Server) -> None:
    with pytest.raises(EgressError, match="HTTP 404") as failure:
        http_request("GET", server.url + "/missing", None, proxies=DIRECT)
    assert failure.value.status == 404


def test_requests_go_through_the_proxy_with_its_credentials(server: Server) -> None:
    """The test server plays the proxy: an http URL is sent to it in absolute form, with basic auth."""
    proxies = ProxySettings.resolve(server.url.replace("http://", "http://user:pw@"), [], {})
    assert http_request("PUT", "http://store.invalid:9000/bucket/key", b"data", proxies=proxies) == b"ok"
    method, target, auth = server.seen[0]
    assert (method, target) == ("PUT", "http://store.invalid:9000/bucket/key")
    assert auth == "Basic " + base64.b64encode(b"user:pw").decode()


def test_a_proxy_refusing_the_tunnel_to_an_https_store_says_so(server: Server) -> None:
    proxies = ProxySettings.resolve(server.url.replace("http://", "http://user:wrong@"), [], {})
    with pytest.raises(EgressError, match=r"the proxy refused the tunnel \(407 .*check the proxy user and password"):
        http_request("GET", "https://store.invalid/bucket/key", None, proxies=proxies)
    method, target, auth = server.seen[0]
    assert (method, target) == ("CONNECT", "store.invalid:443")
    assert auth == "Basic " + base64.b64encode(b"user:wrong").decode()


def test_an_unreachable_proxy_is_named(server: Server) -> None:
    dead = server.url.rsplit(":", 1)[0] + ":1"
    proxies = ProxySettings.resolve(dead, [], {})
    with pytest.raises(EgressError, match=r"the proxy http://127.0.0.1:1 is unreachable"):
        http_request("GET", "http://store.invalid/bucket/key", None, proxies=proxies, timeout_s=5)


# -- the transport: policy before any request, fixed texts across the bridge ------------------------


class Link:
    """The bridge's blob RPCs, answering every slot with `url`."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def blob_slot(self, request: object, *, timeout_s: float) -> object:
        from protos.relay.v1 import relay_pb2 as pb

        return pb.BlobSlotResponse(blob_id="ab" * 16, url=self.url)


async def test_a_url_outside_the_endpoints_is_a_security_failure_with_a_fixed_remote_text() -> None:
    policy = UrlPolicy([Endpoint.parse(S3)])
    transport = BridgeBlobTransport(Link("http://10.0.0.7:8080/admin"), policy=policy, proxies=DIRECT)  # type: ignore[arg-type]
    with pytest.raises(SpillFailed) as refused:
        await transport.slot(AID, "", 0, download=False)
    assert refused.value.security
    assert (
        refused.value.detail == "SECURITY: refused a spill URL at http://10.0.0.7:8080, outside [dicom] spill_endpoints"
    )
    assert refused.value.remote_detail == URL_REFUSED


async def test_without_endpoints_an_http_url_means_no_spill_not_an_alert() -> None:
    transport = BridgeBlobTransport(Link(S3 + "key"), proxies=DIRECT)  # type: ignore[arg-type]
    with pytest.raises(SpillUnavailable, match="spill_endpoints is empty"):
        await transport.slot(AID, "", 0, download=False)


async def test_a_fetch_failure_crosses_the_bridge_as_a_fixed_text(server: Server) -> None:
    transport, rx, frames = await sent_blob()

    async def get(url: str) -> bytes:
        raise SpillUnavailable("GET http://10.0.0.7:8080: [Errno 111] Connection refused")

    transport.get = get  # type: ignore[method-assign]
    receiver = SpillReceiver(transport, AID, rx, parallel=2)  # type: ignore[arg-type]
    blob, _, _ = receiver.accept(frames[0], rx.open(frames[0].payload, frames[0].seq, frames[0].flags))
    with pytest.raises(SpillFailed) as failure:
        async for _ in blob.plaintext():
            pass
    assert "Errno 111" in failure.value.detail  # the local log has it ...
    assert failure.value.remote_detail == FETCH_FAILED  # ... Close.detail does not


# -- memory: parts held by all receiving associations together are bounded --------------------------


async def test_parts_held_by_several_receivers_stay_within_the_routers_bound() -> None:
    blobs = [await sent_blob([os.urandom(60_000) for _ in range(6)]) for _ in range(3)]
    slots = asyncio.Semaphore(2)
    held = peak = 0

    def counting(transport: MemoryTransport) -> MemoryTransport:
        transport.download_slots = slots  # type: ignore[attr-defined]
        original = transport.get

        async def get(url: str) -> bytes:
            nonlocal held, peak
            data = await original(url)
            held += 1
            peak = max(peak, held)
            return data

        transport.get = get  # type: ignore[method-assign]
        return transport

    async def receive_all(transport: MemoryTransport, rx: object, frames: list[object]) -> int:
        nonlocal held
        receiver = SpillReceiver(counting(transport), AID, rx, parallel=4)  # type: ignore[arg-type]
        assert receiver.slots is slots
        opened = [receiver.accept(f, rx.open(f.payload, f.seq, f.flags))[0] for f in frames]  # type: ignore[attr-defined]
        total = 0
        async for plain in opened[0].plaintext():
            total += len(plain)
            held -= 1  # delivered
            await asyncio.sleep(0.01)  # a slow local device
        return total

    totals = await asyncio.gather(*(receive_all(t, rx, f) for t, rx, f in blobs))  # type: ignore[arg-type]
    assert totals == [360_000] * 3
    assert peak <= 2, f"{peak} parts were held at once with 2 slots"
    assert not slots.locked()


# -- configuration and features -------------------------------------------------------------------


def _router_toml(tmp_path: Path, bridge: str = "", dicom: str = "") -> Path:
    path = tmp_path / "router.toml"
    path.write_text(
        f'[router]\nname = "site-a"\n[bridge]\naddress = "bridge.example.org:443"\ninsecure = true\n{bridge}\n'
        f"[dicom]\n{dicom}\n"
    )
    return path


def test_configuration_of_proxy_and_endpoints(tmp_path: Path) -> None:
    (tmp_path / "proxy-password").write_text("from-file\n")
    config = router_config.load(
        _router_toml(
            tmp_path,
            'proxy = "http://hospital@proxy.example.org:3128"\nproxy_password_file = "proxy-password"\n'
            'no_proxy = ["pacs.lan"]',
            f'spill_endpoints = ["{S3}"]\nspill = false',
        )
    )
    settings = config.bridge.proxy_settings()
    assert settings.for_target("https", "bridge.example.org", 443) == "http://hospital:from-file@proxy.example.org:3128"
    assert settings.for_target("https", "pacs.lan", 443) == ""
    assert config.dicom.spill is False
    assert config.dicom.spill_policy().check(S3 + "k") == "http"


@pytest.mark.parametrize(
    ("bridge", "dicom", "message"),
    [
        ('proxy = "socks5://proxy:1080"', "", "proxy"),
        ('proxy_password_file = "x"', "", "proxy_password_file"),
        ("", 'spill_endpoints = ["http://s3.example.org/b/"]', "spill_endpoints"),
    ],
)
def test_bad_proxy_or_endpoint_configuration_names_the_key(
    tmp_path: Path, bridge: str, dicom: str, message: str
) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        router_config.load(_router_toml(tmp_path, bridge, dicom))


def test_a_router_with_spill_off_neither_offers_nor_accepts_it() -> None:
    assert SPILL not in Features.offer(compression=True, spill=False).names()
    offered = Features.offer(compression=True).names()
    assert SPILL in offered
    assert not Features.answer(offered, compression=True, spill=False).spill
    assert Features.answer(offered, compression=True).spill


# -- the bridge link's errors through a proxy (the text grpc gives, as seen with squid) --------------


GRPC = "failed to connect to all addresses; last error: "


def _link_error(details: str) -> str:
    import grpc
    import grpc.aio

    from relay_router.tunnel import BridgeLink

    link = SimpleNamespace(
        proxy="http://hospital:s3cret@proxy.lan:3128",
        config=SimpleNamespace(bridge=SimpleNamespace(address="relay.example.org:443")),
    )
    error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)
    return BridgeLink._describe(link, error)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        (
            GRPC + "UNKNOWN: ipv4:10.0.0.1:3128: HTTP proxy returned response code 407",
            "refused the tunnel to the bridge: HTTP 407, check the proxy user and password",
        ),
        (
            GRPC + "UNKNOWN: ipv4:10.0.0.1:3128: HTTP proxy returned response code 403",
            "HTTP 403, it does not allow CONNECT to relay.example.org:443",
        ),
        (
            GRPC + "UNAVAILABLE: ipv4:10.0.0.1:3128: Failed to connect to remote host: Connection refused",
            "is unreachable or closed the tunnel",
        ),
        (
            GRPC + "UNAVAILABLE: ipv4:10.0.0.1:3128: Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
            "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
            "a TLS-inspecting proxy must exempt the bridge",
        ),
        (
            GRPC + "UNAVAILABLE: ipv4:10.0.0.1:3128: Ssl handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL",
            "its certificate does not verify against ca_file",
        ),
    ],
)
def test_proxy_failures_of_the_bridge_link_say_what_to_check(details: str, expected: str) -> None:
    text = _link_error(details)
    assert expected in text and "http://hospital:***@proxy.lan:3128" in text
    assert "s3cret" not in text


async def test_a_router_with_spill_off_asks_for_no_blob_slot() -> None:
    link = Link(S3 + "key")
    link.spill_enabled = False  # type: ignore[attr-defined]
    with pytest.raises(SpillUnavailable, match=r"spill is off on this router \(\[dicom\] spill = false\)"):
        await BridgeBlobTransport(link, proxies=DIRECT).slot(AID, "", 0, download=False)  # type: ignore[arg-type]

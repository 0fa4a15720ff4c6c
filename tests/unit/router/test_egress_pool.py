"""relay_router.egress.HttpClient: kept-alive connections to the blob store, and when they are not reused.

Real sockets on 127.0.0.1 (http.server speaking HTTP/1.1, so it keeps connections open); the server
counts the connections it accepted and the requests it saw on each. A connection is reused for the
same origin through the same proxy only; one whose answer was not read to the end, or that broke, is
dropped; a GET or PUT whose kept-alive connection broke is sent once more on a new connection, a
timeout or another method never.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from relay_router.egress import EgressError, HttpClient, ProxySettings

DIRECT = ProxySettings()


class Server(http.server.ThreadingHTTPServer):
    """Answers by path: /ok ("ok"), /big (Content-Length 5000), /missing (404), /slow (after 3 s),
    /drop-second (answers a connection's first request; closes the connection on its second, unanswered)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.connections = 0
        self.sockets: list[socket.socket] = []  # the server's side of each connection
        self.requests: list[tuple[int, str, str, bytes]] = []  # connection number, method, target, body
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive unless the handler closes

            def setup(self) -> None:
                super().setup()
                with server.lock:
                    server.connections += 1
                    server.sockets.append(self.request)
                    self.number = server.connections
                self.served = 0

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with server.lock:
                    server.requests.append((self.number, self.command, self.path, body))
                self.served += 1
                path = self.path.split("://", 1)[-1].split("/", 1)[-1]  # absolute form through a "proxy"
                if path.startswith("drop-second") and self.served >= 2:
                    self.close_connection = True  # no answer: as a store that closed an idle connection
                    return
                if path.startswith("big"):
                    self._send(200, b"x" * 5000)
                elif path.startswith("missing"):
                    self._send(404, b"no such key")
                elif path.startswith("slow"):
                    time.sleep(3)
                    self._send(200, b"late")
                else:
                    self._send(200, b"ok:" + body)

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # /slow's answer to a client that gave up: a broken pipe, expected

    def connections_of(self, target: str) -> set[int]:
        with self.lock:
            return {number for number, _, path, _ in self.requests if path == target}


def _serving() -> Iterator[Server]:
    s = Server()
    yield s
    s.shutdown()
    s.server_close()


server = pytest.fixture(_serving, name="server")
other = pytest.fixture(_serving, name="other")  # a second origin


@pytest.fixture
def client() -> Iterator[HttpClient]:
    c = HttpClient(DIRECT)
    yield c
    c.close()


def test_requests_to_one_store_share_one_connection(server: Server, client: HttpClient) -> None:
    for i in range(5):
        assert client.request("PUT", f"{server.url}/bucket/part-{i}", b"part %d" % i) == b"ok:part %d" % i
        assert client.request("GET", f"{server.url}/bucket/part-{i}", None) == b"ok:"
    assert server.connections == 1
    assert client.opened == 1
    assert [(method, path, body) for _, method, path, body in server.requests[:2]] == [
        ("PUT", "/bucket/part-0", b"part 0"),
        ("GET", "/bucket/part-0", b""),
    ]


def test_a_connection_is_never_reused_for_another_origin(server: Server, other: Server, client: HttpClient) -> None:
    for _ in range(3):
        client.request("GET", f"{server.url}/a", None)
        client.request("GET", f"{other.url}/b", None)
    assert (server.connections, other.connections) == (1, 1)
    # Same host and port, other scheme: https to a plain-http listener fails; the http connection survives.
    with pytest.raises(EgressError):
        client.request("GET", server.url.replace("http://", "https://") + "/a", None, timeout_s=5)
    client.request("GET", f"{server.url}/a", None)
    assert server.connections_of("/a") == {1}


def test_a_connection_through_the_proxy_is_never_used_directly_or_the_other_way(server: Server) -> None:
    """The test server is both the proxy (for store.invalid) and, exempted by no_proxy, a store reached
    directly: the same address and port, so only the client's keying keeps the two apart."""
    proxies = ProxySettings.resolve(server.url.replace("http://", "http://user:pw@"), ["127.0.0.1"], {})
    client = HttpClient(proxies)
    try:
        for _ in range(3):
            assert client.request("GET", "http://store.invalid:9000/bucket/k", None) == b"ok:"
            assert client.request("GET", f"{server.url}/direct", None) == b"ok:"
    finally:
        client.close()
    proxied = server.connections_of("http://store.invalid:9000/bucket/k")
    direct = server.connections_of("/direct")
    assert len(proxied) == 1 and len(direct) == 1 and proxied != direct, server.requests
    assert server.connections == 2


def test_an_answer_not_read_to_its_end_closes_its_connection(server: Server, client: HttpClient) -> None:
    client.request("GET", f"{server.url}/ok", None)
    with pytest.raises(EgressError, match="announces 5000 bytes"):
        client.request("GET", f"{server.url}/big", None, limit=1000)
    client.request("GET", f"{server.url}/ok", None)
    assert server.connections == 2  # the unread 5000 bytes went with the first connection
    with pytest.raises(EgressError, match="HTTP 404") as missing:
        client.request("GET", f"{server.url}/missing", None)
    assert missing.value.status == 404
    client.request("GET", f"{server.url}/ok", None)
    assert server.connections == 3  # an error answer is not read either: its connection is dropped
    assert client.opened == 3  # the client counts the connections it made again, too


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_a_kept_connection_that_broke_is_dropped_and_the_part_sent_again(
    server: Server, client: HttpClient, method: str
) -> None:
    data = b"part" if method == "PUT" else None
    assert client.request(method, f"{server.url}/drop-second", data) == b"ok:" + (data or b"")
    # The kept connection is closed by the server without an answer when the request arrives on it:
    # the request goes again, once, on a new connection, and succeeds.
    assert client.request(method, f"{server.url}/drop-second", data) == b"ok:" + (data or b"")
    assert [number for number, *_ in server.requests] == [1, 1, 2]
    assert server.connections == 2


def test_a_broken_connection_is_not_retried_for_a_method_that_is_not_idempotent(
    server: Server, client: HttpClient
) -> None:
    client.request("POST", f"{server.url}/drop-second", b"x")
    with pytest.raises(EgressError, match="POST http://127.0.0.1"):
        client.request("POST", f"{server.url}/drop-second", b"x")
    assert len(server.requests) == 2


def test_a_timeout_is_not_retried(server: Server, client: HttpClient) -> None:
    with pytest.raises(EgressError, match="timed out"):
        client.request("GET", f"{server.url}/slow", None, timeout_s=0.5)
    assert len(server.requests) == 1


def test_threads_share_the_pool_safely(server: Server, client: HttpClient) -> None:
    threads, rounds = 6, 10
    results: list[bytes] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(rounds):
                results.append(client.request("PUT", f"{server.url}/t{n}/{i}", b"%d-%d" % (n, i)))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not errors, errors
    assert sorted(results) == sorted(b"ok:%d-%d" % (n, i) for n in range(threads) for i in range(rounds))
    assert server.connections <= threads, "each thread's request reuses a kept connection"


def test_a_closed_client_refuses_requests(server: Server) -> None:
    client = HttpClient(DIRECT)
    client.request("GET", f"{server.url}/ok", None)
    client.close()
    with pytest.raises(EgressError, match="closed"):
        client.request("GET", f"{server.url}/ok", None)


def test_a_store_that_closes_idle_connections_costs_a_new_connection_not_an_error(
    server: Server, client: HttpClient
) -> None:
    """The common case of a stale connection: closed by the store while idle, noticed before use."""
    client.request("GET", f"{server.url}/ok", None)
    # Close the server's side of every open connection (as an idle timeout would).
    for sock in server.sockets:
        sock.shutdown(socket.SHUT_RDWR)
    assert client.request("GET", f"{server.url}/ok", None) == b"ok:"
    assert server.connections == 2 and client.opened == 2

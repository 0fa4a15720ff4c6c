"""The bridge console through aiohttp's test client: sign-in required, throttled, escaped, no PHI fields."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from relay_bridge import directory as directory_module
from relay_bridge.config import BridgeConfig, ConsoleSection, LimitsSection, ServerSection, StorageSection
from relay_bridge.console import admins as admins_module
from relay_bridge.console.app import BridgeConsole
from relay_bridge.directory import Device, Directory
from relay_bridge.server import RelayServicer
from relay_bridge.sessions import RouterSession
from relay_bridge.splice import Splice

PASSWORD = "correct horse battery"
HOSTILE = "<script>alert('x')</script>\x1b[31mred\x1b[0m"


@pytest.fixture
async def console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[BridgeConsole, TestClient]]:
    monkeypatch.setattr(directory_module, "SCRYPT_N", 2**10)
    monkeypatch.setattr(admins_module, "SCRYPT_N", 2**10)
    config = BridgeConfig(
        server=ServerSection(insecure=True),
        storage=StorageSection(database=tmp_path / "bridge.sqlite3"),
        limits=LimitsSection(login_failures=3),
        console=ConsoleSection(listen="127.0.0.1:0"),
    )
    directory = Directory(config.storage.database)
    directory.add_router("site-a", "pw-a-123456789")
    directory.add_router("site-b", "pw-b-123456789")
    directory.publish("site-b", [Device("site-b", "ARCHIVE_B", HOSTILE, ("site-a",))])
    servicer = RelayServicer(config, directory)
    console = BridgeConsole(servicer.state)
    console.admins.add("ops", PASSWORD)
    client = TestClient(TestServer(console.server.app))
    await client.start_server()
    try:
        yield console, client
    finally:
        await client.close()
        await console.stop()
        servicer.directory.close()


async def sign_in(client: TestClient, name: str = "ops", password: str = PASSWORD, status: int = 303) -> str:
    response = await client.post("/login", data={"name": name, "password": password}, allow_redirects=False)
    assert response.status == status, await response.text()
    return await response.text()


async def test_every_page_but_sign_in_needs_an_admin(console: tuple[BridgeConsole, TestClient]) -> None:
    _, client = console
    response = await client.get("/", allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/login"
    page = await (await client.get("/login")).text()
    assert "Sign in" in page and "site-b" not in page
    client.session.cookie_jar.update_cookies({"relay_console": "b3Bz.9999999999.forged"})
    assert (await client.get("/", allow_redirects=False)).status == 303


async def test_sign_in_sets_a_strict_http_only_cookie_and_shows_the_sites(
    console: tuple[BridgeConsole, TestClient],
) -> None:
    bridge, client = console
    response = await client.post("/login", data={"name": "ops", "password": PASSWORD}, allow_redirects=False)
    assert response.status == 303
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "relay_console=" in cookie
    page = await client.get("/")
    html = await page.text()
    assert page.status == 200
    assert "script-src" not in page.headers["Content-Security-Policy"]  # default-src 'none': no script at all
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert re.search(r'id="site-site-a".*?offline', html, re.S)
    assert "never patient data" in html
    assert "<code>ARCHIVE_B</code> with site-a" in html
    # Sign out: the cookie goes, the page with it.
    await client.post("/logout")
    assert (await client.get("/", allow_redirects=False)).status == 303
    # An account removed while signed in is out at once.
    await sign_in(client)
    bridge.admins.remove("ops")
    assert (await client.get("/", allow_redirects=False)).status == 303


async def test_a_hostile_description_is_shown_as_text(console: tuple[BridgeConsole, TestClient]) -> None:
    _, client = console
    await sign_in(client)
    html = await (await client.get("/")).text()
    assert "<script>" not in html and "\x1b" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;\\x1b[31mred\\x1b[0m" in html


async def test_wrong_passwords_are_refused_then_throttled(console: tuple[BridgeConsole, TestClient]) -> None:
    bridge, client = console
    for _ in range(3):
        page = await sign_in(client, password="wrong password!", status=401)
        assert "Wrong account name or password." in page
    # The limit is reached: even the right password waits now.
    page = await sign_in(client, status=429)
    assert "Too many failed sign-ins" in page
    # ... and so does another account from the same address (failures count per account and per source).
    await sign_in(client, name="nobody", password="also wrong", status=429)
    assert bridge.throttle.blocked("account:ops") and bridge.throttle.blocked("source:127.0.0.1")


async def test_running_associations_refusals_and_alerts_are_listed(console: tuple[BridgeConsole, TestClient]) -> None:
    bridge, client = console
    state = bridge.state
    state.audit.observers.append(bridge.events.observe)
    state.sessions["site-a"] = RouterSession("site-a", "token", "127.0.0.1", since=time.time() - 300)
    splice = Splice("a1", "site-a", "site-b", "ARCHIVE_B", "WS_A")
    splice.bytes_from_initiator = 5_000_000
    state.splices["a1"] = splice
    state.metrics.refused(3, "a0", "site-b is offline")
    state.audit.event("access_refused", "alert", router="site-a", to_site="site-b", called_ae=HOSTILE, calling_ae="X")
    await sign_in(client)
    html = await (await client.get("/")).text()
    assert re.search(r'id="site-site-a".*?up since \d\d:\d\d:\d\d UTC \(5 min\)', html, re.S)
    assert "from 127.0.0.1" not in html and "<td>127.0.0.1</td>" in html
    assert '<td class="num bytes">5.0 MB</td>' in html
    assert "<code>WS_A</code> &rarr; <code>ARCHIVE_B</code>" in html
    assert "site_offline" in html and "site-b is offline" in html and "Association rejected" in html
    assert "SECURITY ALERT" in html and "access_refused" in html and "<script>" not in html


async def test_beyond_loopback_the_console_is_served_over_tls_with_secure_cookies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a public address (the test stays on 127.0.0.1 and tells the console it is not loopback)."""
    import ssl

    import aiohttp

    from relay_bridge.console import app as app_module
    from relay_common.pki import make_dev_pki

    monkeypatch.setattr(directory_module, "SCRYPT_N", 2**10)
    monkeypatch.setattr(admins_module, "SCRYPT_N", 2**10)
    monkeypatch.setattr(app_module, "is_loopback", lambda host: False)
    files = make_dev_pki(tmp_path, hostnames=["localhost"], ips=["127.0.0.1"])
    config = BridgeConfig(
        server=ServerSection(tls_cert=files.server_cert, tls_key=files.server_key),
        storage=StorageSection(database=tmp_path / "bridge.sqlite3"),
        console=ConsoleSection(listen="127.0.0.1:0"),
    )
    servicer = RelayServicer(config, Directory(config.storage.database))
    console = BridgeConsole(servicer.state)
    console.admins.add("ops", PASSWORD)
    assert await console.start()
    try:
        assert console.server.url == f"https://{console.server.address}/"
        trust = ssl.create_default_context(cafile=str(files.ca_cert))
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):  # plain HTTP gets nothing
                await http.get(f"http://{console.server.address}/login")
            response = await http.post(
                f"{console.server.url}login",
                data={"name": "ops", "password": PASSWORD},
                ssl=trust,
                allow_redirects=False,
            )
            assert response.status == 303 and "Secure" in response.headers["Set-Cookie"]
    finally:
        await console.stop()
        servicer.directory.close()

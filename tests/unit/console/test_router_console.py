"""The router console through aiohttp's test client: devices, errors with their troubleshooting entry, auth."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from relay_common.config import ConfigError, parse_config
from relay_common.console import printable, since
from relay_common.console.troubleshooting import sections
from relay_common.errors import Reason
from relay_router.config import RouterConfig
from relay_router.console import RouterConsole
from relay_router.outcome import Outcome, Result
from relay_router.service import RouterService
from relay_router.tunnel import DirectoryEntry

HOSTILE = "<script>alert(1)</script>\x1b[2J"
OPERATIONS = Path(__file__).resolve().parents[3] / "docs" / "operations.md"


def make_service(tmp_path: Path, console: dict[str, object] | None = None) -> RouterService:
    doc = {
        "router": {"name": "hospital-a"},
        "bridge": {"address": "bridge:443", "insecure": True, "password": "correct horse battery"},
        "dicom": {"listen": "127.0.0.1:0"},
        "shared": [{"ae_title": "PACS_A", "host": "10.0.0.5", "port": 104, "share_with": ["site-b"]}],
        "remote": [{"ae_title": "ARCHIVE_B", "site": "site-b"}, {"ae_title": "ARCHIVE_C", "site": "site-c"}],
        "console": console or {"listen": "127.0.0.1:0"},
    }
    return RouterService(parse_config(doc, RouterConfig, base_dir=tmp_path))


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[RouterService, TestClient]]:
    service = make_service(tmp_path)
    console = RouterConsole(service)
    async with TestClient(TestServer(console.server.app)) as client:
        yield service, client


async def test_devices_and_their_online_state(client: tuple[RouterService, TestClient]) -> None:
    service, http = client
    service.link.directory = [
        DirectoryEntry("site-b", "ARCHIVE_B", HOSTILE, True),
        DirectoryEntry("site-c", "ARCHIVE_C", "", False),
    ]
    response = await http.get("/")
    html = await response.text()
    assert response.status == 200 and "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert re.search(r'id="remote-ARCHIVE_B".*?class="up">online', html, re.S)
    assert re.search(r'id="remote-ARCHIVE_C".*?class="down">offline', html, re.S)
    assert "<code>PACS_A</code></td><td>10.0.0.5:104</td><td>site-b</td>" in html
    assert "<script>" not in html and "\x1b" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;\\x1b[2J" in html
    assert "NOT signed on to the bridge at bridge:443" in html


async def test_a_recent_error_points_to_its_troubleshooting_entry(client: tuple[RouterService, TestClient]) -> None:
    service, http = client
    failed = Outcome("assoc-1", "outbound", "site-b", calling_ae="WS_A", called_ae="ARCHIVE_B")
    failed.refuse(Result.REJECTED, Reason.SITE_OFFLINE, "site-b is not signed on")
    failed.ended = time.time()
    service.history.append(failed)
    running = Outcome("assoc-2", "outbound", "site-b", calling_ae="WS_A", called_ae="ARCHIVE_B")
    running.bytes_to_remote = 3_500_000
    service.active["assoc-2"] = running
    html = await (await http.get("/")).text()
    errors = html.split('id="errors"')[1].split("</section>")[0]
    assert "site_offline" in errors and "site-b is not signed on" in errors
    assert '<a class="help" href="/help#association-rejected">Association rejected</a>' in errors
    active = html.split('id="active"')[1].split("</section>")[0]
    assert '<td class="num bytes">3.5 MB</td>' in active
    page = await (await http.get("/help")).text()
    assert '<section id="association-rejected">' in page and "<code>site_offline</code>" in page


def test_every_troubleshooting_anchor_is_a_heading_of_operations_md() -> None:
    text = OPERATIONS.read_text()
    anchors = set()
    for heading in re.findall(r"^#{1,4} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    for section in sections():
        assert section["anchor"] in anchors, section


async def test_beyond_loopback_it_needs_the_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="console.password_file: is required"):
        make_service(tmp_path, {"listen": "0.0.0.0:9466"})
    (tmp_path / "console.pw").write_text("s3cret password\n")
    service = make_service(tmp_path, {"listen": "0.0.0.0:0", "password_file": "console.pw"})
    console = RouterConsole(service)
    console.password = (tmp_path / "console.pw").read_text().strip()
    async with TestClient(TestServer(console.server.app)) as http:
        response = await http.get("/")
        assert response.status == 401 and "Basic" in response.headers["WWW-Authenticate"]
        wrong = base64.b64encode(b"admin:guess").decode()
        assert (await http.get("/", headers={"Authorization": f"Basic {wrong}"})).status == 401
        right = base64.b64encode(b"admin:s3cret password").decode()
        assert (await http.get("/", headers={"Authorization": f"Basic {right}"})).status == 200


def test_formatting_helpers() -> None:
    assert printable("AE\x1b[31m\x00") == "AE\\x1b[31m\\x00"
    now = 1_700_000_000.0
    assert since(now - 300, now=now) == "since 22:08:20 UTC (5 min)"


async def test_without_a_password_only_loopback_names_are_answered(client: tuple[RouterService, TestClient]) -> None:
    _, http = client
    assert (await http.get("/", headers={"Host": "localhost"})).status == 200
    rebound = await http.get("/", headers={"Host": "attacker.example:9466"})
    assert rebound.status == 421 and "loopback only" in await rebound.text()


async def test_an_empty_password_file_keeps_the_console_off(tmp_path: Path) -> None:
    (tmp_path / "console.pw").write_text("\n")
    service = make_service(tmp_path, {"listen": "0.0.0.0:0", "password_file": "console.pw"})
    console = RouterConsole(service)
    assert not await console.start()
    assert console.server.error == f"no password in {tmp_path / 'console.pw'}" and console.server.address is None

"""A TLS-inspecting proxy between the router and the bridge is refused loudly (issue 15, item 1).

The proxy accepts the router's CONNECT and then answers its TLS with a certificate of its own CA,
as an inspection appliance does. The router pins the bridge's CA (`ca_file`), so it must refuse,
and say why in `status` and in its log, with what to do (exempt the bridge from inspection).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay_demo.network import LocalRelayNetwork
from tests.integration.proxy_support import InspectingProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def inspecting() -> Iterator[InspectingProxy]:
    proxy = InspectingProxy()
    yield proxy
    proxy.stop()


def test_a_tls_inspecting_proxy_fails_the_pinned_link_with_the_reason(
    tmp_path: Path, inspecting: InspectingProxy
) -> None:
    net = LocalRelayNetwork(tmp_path / "relay").start()
    try:
        site = net.add_site("site-a", start=False)
        site.extra_bridge["proxy"] = inspecting.url
        net.write_router_config(site)
        net.start_router("site-a")
        expected = f"the TLS handshake with the bridge through the proxy {inspecting.url} failed"
        deadline = time.monotonic() + 30
        while expected not in str(net.status("site-a").get("last_error")):
            assert time.monotonic() < deadline, f"status: {net.status('site-a')}\n{net.log('site-a')[-2000:]}"
            time.sleep(0.2)
        status = net.status("site-a")
        assert not status.get("connected")
        assert "a TLS-inspecting proxy must exempt the bridge" in str(status["last_error"])
        assert f"cannot reach the bridge: {expected}" in net.log("site-a")
        assert inspecting.connects and inspecting.connects[0].startswith(f"CONNECT 127.0.0.1:{net.bridge_port} ")
    finally:
        net.stop()

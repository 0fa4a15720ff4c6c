"""Spill counters on the Prometheus endpoints of both routers and the bridge, scraped over HTTP.

storescu sends a study (two 8 MiB slices spilled, three small ones inline) through the
bridge's file:// store while the test scrapes the three endpoints; afterwards every
counter has moved by exactly what the routers' logs say was spilled.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay_demo.archive import DemoArchive
from relay_demo.datasets import fingerprints, generate_ct_series, write_series
from relay_demo.network import LocalRelayNetwork, Remote, Shared
from tests.integration.cloudstore.spill_support import HOST, ROUTER, require_dcmtk
from tests.support import dcmtk

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
SPILLED = re.compile(r'"spilled (\d+) bytes in (\d+) parts to blob ([0-9a-f]{32})"')


def scrape(address: str) -> Samples:
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        f"http://{address}/metrics", timeout=10
    ) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "spill" in s.name
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} is not exported"
    return samples[key]


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture
def net(tmp_path: Path, archive_factory: object) -> Iterator[tuple[LocalRelayNetwork, DemoArchive]]:
    network = LocalRelayNetwork(tmp_path / "relay", bridge_spill={"store": (tmp_path / "blobs").as_uri()})
    network.start(bridge=False)
    with (network.workdir / "bridge.toml").open("a") as toml:
        toml.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
    network.start_bridge()
    archive = archive_factory("ARCHIVE_B")  # type: ignore[operator]
    try:
        network.add_site(
            "site-b",
            shared=[Shared("ARCHIVE_B", HOST, archive.port, ["site-a"])],
            metrics_listen="127.0.0.1:0",
            **ROUTER,
        )
        network.add_site("site-a", remote=[Remote("ARCHIVE_B", "site-b")], metrics_listen="127.0.0.1:0", **ROUTER)
        network.wait_connected()
        yield network, archive
    finally:
        network.stop()


def bridge_metrics_address(network: LocalRelayNetwork) -> str:
    config = str(network.workdir / "bridge.toml")
    result = subprocess.run(
        [sys.executable, "-m", "relay_bridge.cli", "-c", config, "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env=network.env,
    )
    address = json.loads(result.stdout)["metrics"]["listen"]
    assert address, result.stdout
    return str(address)


def test_spill_counters_move_by_what_was_spilled(net: tuple[LocalRelayNetwork, DemoArchive], tmp_path: Path) -> None:
    require_dcmtk("storescu")
    network, archive = net
    big = write_series(generate_ct_series(2, rows=2048, cols=2048, seed=31), tmp_path / "big")
    small = write_series(generate_ct_series(3, rows=256, cols=256, seed=32), tmp_path / "small")
    study = small[:1] + big + small[1:]
    addresses = {
        "a": str(network.status("site-a")["metrics"]["listen"]),  # type: ignore[index]
        "b": str(network.status("site-b")["metrics"]["listen"]),  # type: ignore[index]
        "bridge": bridge_metrics_address(network),
    }
    before = {name: scrape(address) for name, address in addresses.items()}

    result: list[dcmtk.Result] = []
    sender = threading.Thread(
        target=lambda: result.append(dcmtk.storescu(HOST, network.sites["site-a"].port, "ARCHIVE_B", "WS", study))
    )
    sender.start()
    during: list[dict[str, Samples]] = []
    while sender.is_alive():
        during.append({name: scrape(address) for name, address in addresses.items()})
        time.sleep(0.05)
    sender.join()
    result[0].check()
    assert during, "no scrape happened while the study was being sent"
    assert archive.fingerprints() == fingerprints(study)
    after = {name: scrape(address) for name, address in addresses.items()}

    # Counters only grow, scrape after scrape.
    for name in addresses:
        series = [before[name]] + [d[name] for d in during] + [after[name]]
        for earlier, later in zip(series, series[1:], strict=False):
            assert all(later[k] >= v for k, v in earlier.items()), name

    spills = [(int(n), int(p)) for n, p, _ in SPILLED.findall(network.log("site-a"))]
    assert len(spills) == len(big), spills
    spilled_bytes, parts = sum(n for n, _ in spills), sum(p for _, p in spills)
    assert spilled_bytes > 2 * 8 * 1024 * 1024 and parts == 2 * 9  # 8 MiB + headers in 1 MiB parts

    a, b, bridge = before["a"], before["b"], before["bridge"]
    assert moved(a, after["a"], "relay_router_spill_datasets_total", direction="sent") == len(big)
    assert moved(a, after["a"], "relay_router_spill_bytes_total", direction="sent") == spilled_bytes
    assert moved(a, after["a"], "relay_router_spill_parts_total", direction="sent") == parts
    assert moved(a, after["a"], "relay_router_spill_fallbacks_total") == 0
    assert moved(a, after["a"], "relay_router_spill_failures_total", direction="sent") == 0
    assert moved(b, after["b"], "relay_router_spill_datasets_total", direction="received") == len(big)
    assert moved(b, after["b"], "relay_router_spill_bytes_total", direction="received") == spilled_bytes
    assert moved(b, after["b"], "relay_router_spill_parts_total", direction="received") == parts
    assert moved(b, after["b"], "relay_router_spill_failures_total", direction="received") == 0
    uploaded = moved(a, after["a"], "relay_router_spill_store_bytes_total", direction="sent")
    downloaded = moved(b, after["b"], "relay_router_spill_store_bytes_total", direction="received")
    # Sealed, uncompressed parts: the plaintext plus one flag byte and a 16-byte tag each.
    assert uploaded == downloaded == spilled_bytes + 17 * parts
    # The bridge signed one URL per part each way and, being the file:// store, moved the stored bytes itself.
    assert moved(bridge, after["bridge"], "relay_bridge_spill_blob_slots_total", method="put") == parts
    # Router B asks for download URLs ahead of the parts' announcements (at most `spill_parallel`, 4, beyond the
    # last one announced), so a blob whose end it has not heard of yet costs up to 4 URLs that go unused.
    asked = moved(bridge, after["bridge"], "relay_bridge_spill_blob_slots_total", method="get")
    assert parts <= asked <= parts + 4 * len(big), asked
    assert moved(bridge, after["bridge"], "relay_bridge_spill_served_bytes_total", direction="stored") == uploaded
    assert moved(bridge, after["bridge"], "relay_bridge_spill_served_bytes_total", direction="fetched") == downloaded
    # Nothing spilled in the other direction (C-STORE responses are small).
    assert moved(a, after["a"], "relay_router_spill_datasets_total", direction="received") == 0
    assert moved(b, after["b"], "relay_router_spill_datasets_total", direction="sent") == 0

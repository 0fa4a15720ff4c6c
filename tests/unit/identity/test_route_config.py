"""Route keys of patient identity (patient_identity, patient_issuer) and which associations get a filter."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay_common.config import ConfigError
from relay_router.config import load
from relay_router.identity.coerce import UnmappedQuery
from relay_router.service import RouterService
from tests.unit.router.test_reload import write_config

IDENTITY = """
[identity]
issuer = "HOSP-A"
unmapped_query = "remote-ids"
[[identity.source]]
kind = "table"
"""
ROUTES = """
[[remote]]
ae_title = "PACS_B"
site = "hospital-b"
patient_identity = true
patient_issuer = "HOSP-B"
[[remote]]
ae_title = "PLAIN_B"
site = "hospital-b"
[[shared]]
ae_title = "ORTHANC_A"
host = "127.0.0.1"
port = 4242
share_with = ["hospital-b"]
patient_identity = true
patient_issuer = "HOSP-B"
"""


def test_identity_routes_get_a_filter_and_the_others_do_not(tmp_path: Path) -> None:
    service = RouterService(load(write_config(tmp_path / "router.toml", IDENTITY + ROUTES)))
    route = service.identity.remote("PACS_B")
    assert route is not None
    assert (route.route.local.issuer, route.route.partner_issuer) == ("HOSP-A", "HOSP-B")
    assert route.route.unmapped_query is UnmappedQuery.REMOTE_IDS
    shared = service.identity.shared("ORTHANC_A")
    assert shared is not None and shared.resolver is route.resolver  # one resolver (and cache) per router
    assert service.identity.remote("PLAIN_B") is None  # transparent: relayed exactly as before
    assert service.identity.remote("UNKNOWN") is None


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (ROUTES, "identity.issuer"),  # patient_identity without [identity] issuer
        (IDENTITY + ROUTES.replace('patient_issuer = "HOSP-B"\n', "", 1), "patient_issuer"),
        (IDENTITY + ROUTES.replace('"HOSP-B"', '"HOSP-A"', 1), "patient_issuer"),  # our own issuer
        (IDENTITY + ROUTES.replace('"HOSP-B"', '"HOSP\\\\B"', 1), "patient_issuer"),  # a backslash
    ],
)
def test_route_keys_are_checked_and_the_error_names_the_key(tmp_path: Path, body: str, key: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=key.replace(".", r"\.")):
        load(write_config(tmp_path / "router.toml", body))


async def test_a_reload_cannot_turn_on_identity_without_the_running_issuer(tmp_path: Path) -> None:
    """[identity] needs a restart; a reloaded route with patient_identity is refused until then."""
    path = write_config(tmp_path / "router.toml", ROUTES.split("[[shared]]")[0].replace("patient_", "# patient_"))
    service = RouterService(load(path), config_path=path)
    write_config(path, IDENTITY + ROUTES)
    assert await service.reload_config() is False
    assert service.identity.remote("PACS_B") is None and not any(r.patient_identity for r in service.config.remote)


async def test_coercions_are_counted_for_prometheus_without_identifiers(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    from relay_router.dimse import DimseSender, c_store_rq
    from relay_router.identity.filter import Flow, IdentityFilter
    from relay_router.identity.wiring import CoercionCollector
    from tests.unit.identity.test_filter import CONTEXTS, CT, instance

    service = RouterService(load(write_config(tmp_path / "router.toml", IDENTITY + ROUTES)))
    route = service.identity.remote("PACS_B")
    assert route is not None
    filt = IdentityFilter(
        route.route, route.resolver, contexts=lambda: CONTEXTS, max_pdu=lambda flow: 0, audit=route.audit,
        counts=route.counts,
    )  # fmt: skip
    store = b"".join(DimseSender(0).message(5, c_store_rq(1, CT, "1.2.3.4.5"), instance("B-404", b"\0\0")))
    await filt.process(Flow.ARRIVING, store)
    registry = CollectorRegistry()
    registry.register(CoercionCollector(service))
    value = registry.get_sample_value
    assert value("relay_router_identity_coercions_total", {"flow": "arriving", "outcome": "unmapped"}) == 1
    assert value("relay_router_identity_coercions_total", {"flow": "leaving", "outcome": "refused"}) == 0
    families = list(CoercionCollector(service).collect())
    assert all("B-404" not in str(sample) for family in families for sample in family.samples)

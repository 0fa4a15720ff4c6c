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

"""RouterService's routing table: [[remote]] entries, expose_all over the directory, aliases."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_common.config import parse_config
from relay_router.config import RouterConfig
from relay_router.service import Route, RouterService
from relay_router.tunnel import DirectoryEntry


def make_service(
    tmp_path: Path,
    *,
    expose_all: bool = False,
    remote: list[dict[str, Any]] | None = None,
    shared: tuple[str, ...] = (),
    listen: str = "127.0.0.1:4242",
    pinned: tuple[str, ...] = ("hospital-b", "hospital-c", "hospital-d"),
) -> RouterService:
    """expose_all routes only to pinned sites: the sites of these tests are pinned unless `pinned` says otherwise."""
    doc = {
        "router": {"name": "hospital-a"},
        "bridge": {"address": "bridge:443", "insecure": True, "password": "correct horse battery"},
        "dicom": {"listen": listen, "expose_all": expose_all},
        "shared": [{"ae_title": t, "host": "10.0.0.5", "port": 104, "share_with": ["*"]} for t in shared],
        "remote": remote or [],
        "pin": [{"site": site, "fingerprint": "0" * 64} for site in pinned],
    }
    return RouterService(parse_config(doc, RouterConfig, base_dir=tmp_path))


def entries(*pairs: tuple[str, str]) -> list[DirectoryEntry]:
    return [DirectoryEntry(site, title, "", True) for site, title in pairs]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The service may keep state files relative to the working directory.
    monkeypatch.chdir(tmp_path)


def test_remote_entries_make_the_table(tmp_path: Path) -> None:
    service = make_service(
        tmp_path,
        remote=[
            {"ae_title": "B_PACS", "site": "hospital-b", "remote_ae_title": "PACS"},
            {"ae_title": "CT1", "site": "hospital-c"},
        ],
    )
    assert service.routes() == {"B_PACS": Route("hospital-b", "PACS"), "CT1": Route("hospital-c", "CT1")}


def test_directory_is_ignored_without_expose_all(tmp_path: Path) -> None:
    service = make_service(tmp_path, remote=[{"ae_title": "CT1", "site": "hospital-c"}])
    service.link.directory = entries(("hospital-b", "PACS"), ("hospital-c", "MR"))
    assert service.routes() == {"CT1": Route("hospital-c", "CT1")}
    assert service.local_alias("hospital-b", "PACS") is None


def test_expose_all_exposes_titles_unique_across_sites(tmp_path: Path) -> None:
    service = make_service(tmp_path, expose_all=True)
    service.link.directory = entries(("hospital-b", "PACS"), ("hospital-c", "MR"), ("hospital-c", "CT"))
    assert service.routes() == {
        "PACS": Route("hospital-b", "PACS"),
        "MR": Route("hospital-c", "MR"),
        "CT": Route("hospital-c", "CT"),
    }


def test_expose_all_never_routes_to_an_unpinned_site(tmp_path: Path) -> None:
    service = make_service(tmp_path, expose_all=True, pinned=("hospital-b",))
    service.link.directory = entries(("hospital-b", "PACS"), ("hospital-c", "MR"))
    assert service.routes() == {"PACS": Route("hospital-b", "PACS")}
    assert "no [[pin]]" in service.route_table().why_not_routed("MR")


def test_a_title_at_two_sites_is_not_exposed(tmp_path: Path) -> None:
    service = make_service(tmp_path, expose_all=True)
    service.link.directory = entries(("hospital-b", "PACS"), ("hospital-c", "PACS"), ("hospital-c", "MR"))
    assert service.routes() == {"MR": Route("hospital-c", "MR")}
    assert service.local_alias("hospital-b", "PACS") is None
    assert service.local_alias("hospital-c", "PACS") is None


def test_an_explicit_remote_resolves_a_title_at_two_sites(tmp_path: Path) -> None:
    service = make_service(tmp_path, expose_all=True, remote=[{"ae_title": "PACS", "site": "hospital-c"}])
    service.link.directory = entries(("hospital-b", "PACS"), ("hospital-c", "PACS"))
    assert service.routes() == {"PACS": Route("hospital-c", "PACS")}


def test_explicit_remote_wins_over_the_directory(tmp_path: Path) -> None:
    service = make_service(
        tmp_path, expose_all=True, remote=[{"ae_title": "PACS", "site": "hospital-c", "remote_ae_title": "ARCHIVE"}]
    )
    service.link.directory = entries(("hospital-b", "PACS"), ("hospital-c", "ARCHIVE"))
    routes = service.routes()
    assert routes["PACS"] == Route("hospital-c", "ARCHIVE")
    assert routes["ARCHIVE"] == Route("hospital-c", "ARCHIVE")
    assert set(routes) == {"PACS", "ARCHIVE"}
    # The explicit alias is the one a called device sees as the caller's title.
    assert service.local_alias("hospital-c", "ARCHIVE") == "PACS"
    # hospital-b's PACS is hidden by the explicit entry, so it has no local title here.
    assert service.local_alias("hospital-b", "PACS") is None


def test_shared_titles_are_never_shadowed(tmp_path: Path) -> None:
    service = make_service(tmp_path, expose_all=True, shared=("CT", "A_PACS"))
    service.link.directory = entries(("hospital-b", "CT"), ("hospital-b", "MR"), ("hospital-c", "A_PACS"))
    assert service.routes() == {"MR": Route("hospital-b", "MR")}
    assert service.local_alias("hospital-b", "CT") is None


def test_routes_follow_directory_updates(tmp_path: Path) -> None:
    service = make_service(tmp_path, expose_all=True)
    service.link.directory = entries(("hospital-b", "PACS"))
    assert service.routes() == {"PACS": Route("hospital-b", "PACS")}
    service.link.directory = entries(("hospital-b", "PACS"), ("hospital-c", "PACS"))
    assert service.routes() == {}
    service.link.directory = []
    assert service.routes() == {}


def test_local_alias(tmp_path: Path) -> None:
    service = make_service(
        tmp_path, expose_all=True, remote=[{"ae_title": "B_PACS", "site": "hospital-b", "remote_ae_title": "PACS"}]
    )
    service.link.directory = entries(("hospital-b", "PACS"), ("hospital-c", "MR"))
    assert service.local_alias("hospital-b", "PACS") == "B_PACS"
    assert service.local_alias("hospital-c", "MR") == "MR"
    assert service.local_alias("hospital-c", "PACS") is None
    assert service.local_alias("hospital-z", "MR") is None


SITES = st.sampled_from(["hospital-b", "hospital-c", "hospital-d"])
TITLES = st.sampled_from(["PACS", "CT", "MR", "US", "A_PACS", "B_PACS"])


def test_routing_invariants(tmp_path: Path) -> None:
    service = make_service(
        tmp_path,
        expose_all=True,
        shared=("A_PACS",),
        remote=[{"ae_title": "B_PACS", "site": "hospital-b", "remote_ae_title": "PACS"}],
    )
    explicit = {r.ae_title: Route(r.site, r.target) for r in service.config.remote}

    @settings(max_examples=80, deadline=None)
    @given(directory=st.lists(st.tuples(SITES, TITLES), max_size=10, unique=True))
    def check(directory: list[tuple[str, str]]) -> None:
        service.link.directory = entries(*directory)
        routes = service.routes()
        counts = collections.Counter(title for _, title in directory)
        for title, route in explicit.items():
            assert routes[title] == route, "explicit [[remote]] entries always win"
        for title, route in routes.items():
            assert title not in service.shared, "a shared title is never routed away"
            if title not in explicit:
                assert counts[title] == 1 and (route.site, title) in directory
        for site, title in directory:
            if counts[title] == 1 and title not in service.shared and title not in explicit:
                assert routes[title] == Route(site, title)
                assert service.local_alias(site, title) is not None

    check()


def test_the_table_is_built_once_per_directory(tmp_path: Path) -> None:
    """Associations and aliases read the cached table; a new directory list (as the link sets it) rebuilds it."""
    service = make_service(tmp_path, expose_all=True)
    service.link.directory = entries(("hospital-b", "PACS"))
    for _ in range(3):
        assert service.routes() == {"PACS": Route("hospital-b", "PACS")}
        assert service.local_alias("hospital-b", "PACS") == "PACS"
    assert service._routes.builds == 1
    service.link.directory = entries(("hospital-b", "PACS"), ("hospital-c", "MR"))
    assert service.local_alias("hospital-c", "MR") == "MR"
    assert service._routes.builds == 2

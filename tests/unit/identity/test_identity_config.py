"""router.toml [identity]: sources and domains parsed, mistakes named by key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay_common.config import ConfigError
from relay_router import config as router_config
from relay_router.identity.config import DomainSection
from relay_router.identity.sources import IdentityRuntime

BASE = """
[router]
name = "site-a"
[bridge]
address = "127.0.0.1:1"
insecure = true
"""


def load(tmp_path: Path, identity: str) -> router_config.RouterConfig:
    path = tmp_path / "router.toml"
    path.write_text(BASE + identity)
    return router_config.load(path)


def test_sources_in_order_with_their_keys(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
[identity]
issuer = "HOSP_A"
universal_id = "1.2.3"
universal_id_type = "ISO"
cache_ttl_s = 60
[[identity.source]]
kind = "table"
[[identity.source]]
kind = "pixm"
url = "http://127.0.0.1:8080/fhir"
timeout_s = 1.5
[[identity.source]]
kind = "pix"
name = "mpi-v2"
host = "127.0.0.1"
port = 2575
receiving_application = "PIXMGR"
[[identity.source]]
kind = "other-ids"
[[identity.domain]]
issuer = "HOSP_B"
fhir_system = "urn:oid:1.2.9"
universal_id = "1.2.9"
""",
    )
    identity = cfg.identity
    assert [s.label for s in identity.source] == ["table", "pixm", "mpi-v2", "other-ids"]
    assert identity.source[1].timeout_s == 1.5
    assert identity.domain_of("HOSP_B").authority == "HOSP_B&1.2.9&ISO"
    assert identity.domain_of("HOSP_A").system == "urn:oid:1.2.3"  # our own, from [identity]
    runtime = IdentityRuntime(identity, state_dir=tmp_path / "state")
    assert [s.name for s in runtime.resolver.sources] == ["table", "pixm", "mpi-v2", "other-ids"]
    assert runtime.table is not None and runtime.table.path == tmp_path / "state" / "identity.sqlite"
    assert runtime.resolver.cache_ttl_s == 60


@pytest.mark.parametrize(
    ("identity", "key"),
    [
        ('[identity]\n[[identity.source]]\nkind = "table"\n', "identity.issuer"),
        ('[identity]\nissuer = "A"\n[[identity.source]]\nkind = "ldap"\n', "identity.source[0].kind"),
        ('[identity]\nissuer = "A"\n[[identity.source]]\nkind = "pixm"\nurl = "http://mpi.example:80/"\n', "url"),
        ('[identity]\nissuer = "A"\n[[identity.source]]\nkind = "pix"\nhost = "127.0.0.1"\n', "port"),
        ('[identity]\nissuer = "A"\n[[identity.source]]\nkind = "table"\nurl = "http://127.0.0.1/"\n', "url"),
        (
            '[identity]\nissuer = "A"\n[[identity.source]]\nkind = "table"\n[[identity.source]]\nkind = "table"\n',
            "source",
        ),
        ('[identity]\nissuer = "A\\\\B"\n', "issuer"),
        ('[identity]\nissuer = "A"\ncache_ttl_s = -1\n', "cache_ttl_s"),
        ('[identity]\nissuer = "A"\nadt_allow = ["everyone"]\n', "adt_allow[0]"),
        ('[identity]\nissuer = "A"\nadt_listen = "nowhere"\n', "adt_listen"),
    ],
    ids=[
        "no-issuer",
        "kind",
        "http-remote",
        "pix-port",
        "unused-key",
        "duplicate-name",
        "issuer",
        "ttl",
        "allow",
        "listen",
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, identity: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, identity)
    assert key in str(caught.value)


def test_off_by_default(tmp_path: Path) -> None:
    assert load(tmp_path, "").identity.enabled is False
    assert DomainSection("X").authority == "X"

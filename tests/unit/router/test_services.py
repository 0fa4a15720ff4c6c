"""Service groups (relay_router.services), grants in router.toml, and what a router publishes."""

from __future__ import annotations

import tomllib

import pytest
from pydicom.uid import CTImageStorage, EnhancedMRImageStorage, MRImageStorage

from relay_common.config import ConfigError, parse_config
from relay_router import services
from relay_router.config import RouterConfig, ServiceGrant, SharedDevice
from relay_router.ul import PresentationContext
from relay_router.ul.contexts import RoleSelection

VERIFICATION = "1.2.840.10008.1.1"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PATIENT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_STUDY_ONLY_FIND = "1.2.840.10008.5.1.4.1.2.3.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"
COMMITMENT = "1.2.840.10008.1.20.1"
WORKLIST = "1.2.840.10008.5.1.4.31"
MPPS = "1.2.840.10008.3.1.2.3.3"
PRIVATE = "1.2.826.0.1.3680043.9.3811.99.1"


@pytest.mark.parametrize(
    ("uid", "group"),
    [
        (VERIFICATION, "verification"),
        (STUDY_FIND, "query"),
        (PATIENT_FIND, "query"),
        (PATIENT_STUDY_ONLY_FIND, "query"),
        (STUDY_MOVE, "retrieve"),
        (STUDY_GET, "retrieve"),
        (str(CTImageStorage), "storage"),
        (str(MRImageStorage), "storage"),
        (str(EnhancedMRImageStorage), "storage"),
        (COMMITMENT, "commitment"),
        (WORKLIST, "worklist"),
        (MPPS, "mpps"),
        (PRIVATE, "other"),
    ],
)
def test_each_sop_class_is_in_the_group_an_administrator_expects(uid: str, group: str) -> None:
    assert services.group_of(uid) == group


def test_storage_comes_from_the_library_registry_and_groups_do_not_overlap() -> None:
    from pynetdicom.sop_class import _STORAGE_CLASSES

    assert services.members("storage") >= {str(u) for u in _STORAGE_CLASSES.values()}
    assert services.group_of("1.2.840.10008.5.1.4.1.1.9") == "storage"  # retired Standalone Curve Storage
    assert len(services.members("storage")) > 100
    seen: set[str] = set()
    for group in services.GROUPS:
        assert not (services.members(group) & seen), group
        seen |= services.members(group)
    assert services.DEFAULT_GROUPS == set(services.GROUPS) - {"other"}
    with pytest.raises(ValueError, match="not a service group"):
        services.members("everything")


def contexts(*syntaxes: str) -> tuple[PresentationContext, ...]:
    return tuple(PresentationContext(2 * i + 1, s, ("1.2.840.10008.1.2",)) for i, s in enumerate(syntaxes))


def test_decision_splits_a_mixed_request() -> None:
    decision = services.decide_contexts(
        contexts(STUDY_FIND, str(CTImageStorage), VERIFICATION, PRIVATE), (), ["verification", "query"]
    )
    assert [pc.id for pc in decision.allowed] == [1, 5]
    assert decision.refused_ids == {3, 7}
    assert decision.refused_syntaxes == (str(CTImageStorage), PRIVATE)
    assert not decision.nothing_allowed
    assert services.decide_contexts(contexts(str(CTImageStorage)), (), ["query"]).nothing_allowed


def test_c_get_brings_the_storage_it_receives_but_not_storage_it_could_send() -> None:
    ct, mr = str(CTImageStorage), str(MRImageStorage)
    roles = (RoleSelection(ct, 0, 1), RoleSelection(mr, 1, 1))
    decision = services.decide_contexts(contexts(STUDY_GET, ct, mr), roles, ["retrieve"])
    assert [pc.abstract_syntax for pc in decision.allowed] == [STUDY_GET, ct]  # SCP role only: receives
    assert [pc.abstract_syntax for pc in decision.refused] == [mr]  # SCU role too: could store
    assert decision.receive_only == {3}  # kept only if the acceptor confirms the role (relay_router.ul.contexts)
    assert services.decide_contexts(contexts(ct), roles, ["query"]).nothing_allowed


def test_shared_device_services_default_grants_and_overrides() -> None:
    device = SharedDevice(
        "PACS",
        "127.0.0.1",
        4242,
        ["hospital-a", "hospital-c", "hospital-d"],
        services=["verification", "query", "retrieve"],
        grant=[ServiceGrant("hospital-c", ["storage"]), ServiceGrant("hospital-d", [])],
    )
    assert device.services_for("hospital-a") == ("verification", "query", "retrieve")
    assert device.services_for("hospital-c") == ("storage",)
    assert device.services_for("hospital-d") == ()
    assert device.services_for("hospital-x") == ()  # not shared with it at all
    legacy = SharedDevice("PACS", "127.0.0.1", 4242, ["*"])
    assert set(legacy.services_for("anyone")) == services.DEFAULT_GROUPS
    published = services.service_grants(device)
    assert [(g.site, list(g.services)) for g in published] == [
        ("*", ["verification", "query", "retrieve"]),
        ("hospital-c", ["storage"]),
        ("hospital-d", []),
    ]


CONFIG = """
[router]
name = "hospital-b"
[bridge]
address = "127.0.0.1:1"
insecure = true
password = "x"
[[shared]]
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
share_with = ["hospital-a"]
{extra}
"""


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        ('services = ["query", "everything"]', "shared[0].services", "'everything' is not a service group"),
        (
            '[[shared.grant]]\nsite = "hospital-c"\nservices = ["storage"]',
            "shared[0].grant",
            "'hospital-c' is not in share_with",
        ),
        ('[[shared.grant]]\nsite = "hospital-a"\nservices = ["stor"]', "shared[0].grant[0].services", "'stor'"),
    ],
)
def test_config_errors_name_the_key(extra: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(CONFIG.format(extra=extra)), RouterConfig, source="router.toml")
    assert info.value.key == key
    assert problem in info.value.problem


def test_config_grant_parses() -> None:
    extra = 'services = ["verification"]\n[[shared.grant]]\nsite = "hospital-a"\nservices = ["query", "retrieve"]'
    cfg = parse_config(tomllib.loads(CONFIG.format(extra=extra)), RouterConfig, source="router.toml")
    assert cfg.shared[0].services_for("hospital-a") == ("query", "retrieve")

"""relay_bridge.metrics: what the bridge exposes, driven through the servicer's own hooks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_bridge import admission
from relay_bridge import directory as directory_module
from relay_bridge.admission import SignOnFailure
from relay_bridge.config import BridgeConfig, ServerSection
from relay_bridge.directory import AccountProblem, Directory, IdentityProblem
from relay_bridge.metrics import REFUSAL_REASONS, SIGN_ON_REASONS
from relay_bridge.server import RelayServicer
from relay_bridge.sessions import RouterSession
from relay_bridge.splice import Splice
from tests.unit.ops.helpers import samples


@pytest.fixture
def servicer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RelayServicer]:
    monkeypatch.setattr(directory_module, "SCRYPT_N", 2**10)
    directory = Directory(tmp_path / "bridge.sqlite3")
    servicer = RelayServicer(BridgeConfig(server=ServerSection(insecure=True)), directory)
    yield servicer
    servicer.directory.close()


def value(servicer: RelayServicer, name: str, **labels: str) -> float | None:
    return servicer.metrics.registry.get_sample_value(name, labels)


def test_series_exist_from_the_start(servicer: RelayServicer) -> None:
    names = {name for name, _ in samples(servicer.metrics.registry)}
    for expected in (
        "relay_bridge_associations_total",
        "relay_bridge_refusals_total",
        "relay_bridge_relayed_bytes_total",
        "relay_bridge_frames_total",
        "relay_bridge_sign_ons_total",
        "relay_bridge_sign_on_failures_total",
        "relay_bridge_association_setup_seconds_bucket",
        "relay_bridge_active_associations",
        "relay_bridge_signed_on_routers",
        "relay_bridge_info",
    ):
        assert expected in names, expected
    assert set(REFUSAL_REASONS) == {
        "unknown_device", "not_permitted", "site_offline", "device_unreachable", "timeout", "overloaded",
        "service_not_granted", "draining",
    }  # fmt: skip
    for reason in REFUSAL_REASONS:
        assert value(servicer, "relay_bridge_refusals_total", reason=reason) == 0


async def test_per_router_gauges_list_every_account(servicer: RelayServicer) -> None:
    servicer.directory.sync.add_router("hospital-a")
    servicer.directory.sync.add_router("hospital-b")
    await servicer.directory.routers()  # what the status writer does every second (a scrape never waits for it)
    session = RouterSession("hospital-a", "token", "203.0.113.5")
    session.associations.update({"1" * 32, "2" * 32})
    servicer.sessions["hospital-a"] = session
    assert value(servicer, "relay_bridge_signed_on_routers") == 1
    assert value(servicer, "relay_bridge_router_signed_on", site="hospital-a") == 1
    assert value(servicer, "relay_bridge_router_signed_on", site="hospital-b") == 0
    assert value(servicer, "relay_bridge_router_active_associations", site="hospital-a") == 2


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        (admission.account_refusal(AccountProblem.WRONG_PASSWORD), "credentials"),
        (admission.account_refusal(AccountProblem.UNKNOWN_ACCOUNT), "credentials"),
        (admission.account_refusal(AccountProblem.DISABLED), "disabled"),
        (admission.throttled(), "throttled"),
        (
            admission.SignOnRefused(SignOnFailure.CERTIFICATE, admission.certificate_problem([], "x") or ""),
            "certificate",
        ),
        (admission.SignOnRefused(SignOnFailure.NO_IDENTITY, admission.NO_IDENTITY), "no_identity"),
        (admission.identity_refusal("x", IdentityProblem.CHANGED), "identity_changed"),
        (admission.devices_refusal([pb.SharedDevice(ae_title="A\\B")]), "invalid_devices"),
        (admission.identity_refusal("x", IdentityProblem.UNKNOWN_ACCOUNT), "other"),
    ],
)
def test_sign_on_failure_reasons(refusal: admission.SignOnRefused, reason: str) -> None:
    assert refusal.failure.value == reason and reason in SIGN_ON_REASONS


async def test_sign_on_through_the_servicer_counts_failures_by_reason(servicer: RelayServicer) -> None:
    refusal = await servicer.control.authenticate("ghost", "x" * 12, "10.0.0.9")
    assert refusal is not None
    servicer.metrics.sign_on_failed(refusal.failure)
    assert value(servicer, "relay_bridge_sign_on_failures_total", reason="credentials") == 1
    servicer.metrics.signed_on()
    assert value(servicer, "relay_bridge_sign_ons_total") == 1


async def test_an_association_from_open_to_close(servicer: RelayServicer) -> None:
    splice = Splice("a" * 32, "hospital-a", "hospital-b", "PACS", "WS")
    servicer.splices[splice.association_id] = splice
    splice.joined.set_result(None)
    servicer.metrics.spliced(splice)
    splice.bytes_from_initiator, splice.bytes_from_destination, splice.frames = 4_000_000, 1000, 20
    servicer.metrics.refresh()  # a scrape during the transfer
    assert value(servicer, "relay_bridge_relayed_bytes_total", direction="from_initiator") == 4_000_000
    assert value(servicer, "relay_bridge_active_associations") == 1
    splice.bytes_from_initiator, splice.frames = 5_000_000, 30
    del servicer.splices[splice.association_id]
    servicer.metrics.closed(splice)
    servicer.metrics.refresh()
    assert value(servicer, "relay_bridge_relayed_bytes_total", direction="from_initiator") == 5_000_000
    assert value(servicer, "relay_bridge_relayed_bytes_total", direction="from_destination") == 1000
    assert value(servicer, "relay_bridge_frames_total") == 30
    assert value(servicer, "relay_bridge_associations_total", outcome="relayed") == 1
    assert value(servicer, "relay_bridge_association_setup_seconds_count") == 1
    assert servicer.metrics.recent.summary()["counts"] == {"relayed": 1}


async def test_a_refusal_after_the_splice_exists_is_counted_once(servicer: RelayServicer) -> None:
    """TIMEOUT is refused through AssociationService.refuse and then the splice closes: one association, refused."""
    splice = Splice("b" * 32, "hospital-a", "hospital-b", "PACS", "WS")
    servicer.splices[splice.association_id] = splice

    class Context:
        async def write(self, frame: bytes) -> None:
            pass

    await servicer.associations.refuse(Context(), admission.join_timed_out("hospital-b"), "b" * 32)  # type: ignore[arg-type]
    splice.joined.cancel()
    del servicer.splices[splice.association_id]
    servicer.metrics.closed(splice)
    assert value(servicer, "relay_bridge_associations_total", outcome="refused") == 1
    assert value(servicer, "relay_bridge_associations_total", outcome="abandoned") == 0
    assert value(servicer, "relay_bridge_refusals_total", reason="timeout") == 1
    # A caller that leaves before the destination joins is "abandoned".
    gone = Splice("c" * 32, "hospital-a", "hospital-b", "PACS", "WS")
    gone.joined.cancel()
    servicer.metrics.closed(gone)
    assert value(servicer, "relay_bridge_associations_total", outcome="abandoned") == 1
    await asyncio.sleep(0)


def test_bridge_labels_never_carry_ae_titles(servicer: RelayServicer) -> None:
    label_keys = {k for _, labels in samples(servicer.metrics.registry) for k, _ in labels}
    assert "ae_title" not in label_keys and "calling_ae" not in label_keys and "called_ae" not in label_keys

"""The near router's A-ASSOCIATE-AC on accelerated routes (relay_router.accel.negotiation), checked by
pynetdicom's decoder and our own parser; and the capability cache."""

from __future__ import annotations

import time
from pathlib import Path

from pynetdicom.pdu import A_ASSOCIATE_AC

from relay_router.accel.capabilities import CapabilityCache, DeviceCapabilities
from relay_router.accel.negotiation import Negotiated, answer
from relay_router.ul import parse_associate, with_abstract_syntaxes
from tests.unit.ul.builders import (
    CT_STORAGE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    JPEG_BASELINE,
    MR_STORAGE,
    VERIFICATION,
    associate_rq,
)

FIND = "1.2.840.10008.5.1.4.1.2.2.1"
CAPS = DeviceCapabilities({CT_STORAGE: (EXPLICIT_LE, IMPLICIT_LE)}, time.time())


def _negotiate(granted: tuple[str, ...] | None = None) -> tuple[bytes, Negotiated]:
    rq = associate_rq(
        "ARCHIVE_B",
        "MODALITY",
        [
            (VERIFICATION, [IMPLICIT_LE]),
            (CT_STORAGE, [JPEG_BASELINE, EXPLICIT_LE]),
            (CT_STORAGE, [JPEG_BASELINE]),
            (MR_STORAGE, [EXPLICIT_LE]),
            (FIND, [IMPLICIT_LE]),
        ],
    )
    return rq, answer(rq, parse_associate(rq), CAPS, granted=granted, max_pdu_length=262144)


def test_only_what_the_destination_accepts_is_accepted() -> None:
    rq, negotiated = _negotiate()
    assert negotiated.contexts == {1: (VERIFICATION, IMPLICIT_LE), 3: (CT_STORAGE, EXPLICIT_LE)}
    info = with_abstract_syntaxes(parse_associate(negotiated.ac_pdu), parse_associate(rq))
    results = {pc.id: pc.result for pc in info.presentation_contexts}
    assert results == {1: 0, 3: 0, 5: 4, 7: 3, 9: 3}  # JPEG only: TS not supported; MR, C-FIND: not supported
    assert info.max_pdu_length == 262144
    assert (info.called_ae, info.calling_ae) == ("ARCHIVE_B", "MODALITY")  # echoed (PS3.8 9.3.3)
    decoded = A_ASSOCIATE_AC()
    decoded.decode(negotiated.ac_pdu)  # the reference decoder reads it too
    assert decoded.application_context_name == "1.2.840.10008.3.1.1.1"
    assert sorted(negotiated.rejected) == sorted([CT_STORAGE, MR_STORAGE, FIND])


def test_services_not_granted_are_not_accepted() -> None:
    _, negotiated = _negotiate(granted=("verification",))
    assert negotiated.contexts == {1: (VERIFICATION, IMPLICIT_LE)}


def test_capability_cache_survives_a_restart_and_goes_stale(tmp_path: Path) -> None:
    path = tmp_path / "accel" / "caps.json"
    cache = CapabilityCache(path, refresh_s=60)
    assert cache.stale("ARCHIVE_B") and cache.get("ARCHIVE_B") is None
    cache.put("ARCHIVE_B", CAPS)
    assert path.stat().st_mode & 0o777 == 0o600
    again = CapabilityCache(path, refresh_s=60)
    assert again.get("ARCHIVE_B") == CAPS and not again.stale("ARCHIVE_B")
    assert again.stale("ARCHIVE_B", now=CAPS.learned + 61)
    path.write_text("{not json")
    assert CapabilityCache(path, refresh_s=60).get("ARCHIVE_B") is None  # relearned, not fatal

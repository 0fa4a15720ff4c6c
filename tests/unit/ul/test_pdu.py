"""Fixed-size PDUs and constants (PS3.8 9.3.4, 9.3.6-9.3.8), cross-checked with pynetdicom."""

from __future__ import annotations

import pytest
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ, A_RELEASE_RP, A_RELEASE_RQ

from relay_router.ul import pdu as P
from relay_router.ul.pdu import PduError, PduType
from tests.unit.ul import fixtures as F


def test_pdu_type_values_and_labels() -> None:
    assert [int(t) for t in PduType] == [1, 2, 3, 4, 5, 6, 7]
    assert PduType.P_DATA_TF.label == "P-DATA-TF"
    assert P.HEADER_LENGTH == 6


def test_reject_constants_match_table_9_21() -> None:
    assert (P.RejectResult.PERMANENT, P.RejectResult.TRANSIENT) == (1, 2)
    assert (P.RejectSource.SERVICE_USER, P.RejectSource.SERVICE_PROVIDER_ACSE) == (1, 2)
    assert P.RejectSource.SERVICE_PROVIDER_PRESENTATION == 3
    assert P.REASON_NO_REASON == P.RejectReasonUser.NO_REASON_GIVEN == 1
    assert P.REASON_APPLICATION_CONTEXT_NOT_SUPPORTED == 2
    assert P.REASON_CALLING_AE_NOT_RECOGNIZED == 3
    assert P.REASON_CALLED_AE_NOT_RECOGNIZED == 7
    assert P.REASON_PROTOCOL_VERSION_NOT_SUPPORTED == P.RejectReasonAcse.PROTOCOL_VERSION_NOT_SUPPORTED == 2
    assert P.REASON_TEMPORARY_CONGESTION == P.RejectReasonPresentation.TEMPORARY_CONGESTION == 1
    assert P.REASON_LOCAL_LIMIT_EXCEEDED == P.RejectReasonPresentation.LOCAL_LIMIT_EXCEEDED == 2


def test_abort_constants_match_9_3_8() -> None:
    assert (P.AbortSource.SERVICE_USER, P.AbortSource.SERVICE_PROVIDER) == (0, 2)
    assert [int(r) for r in P.AbortReason] == [0, 1, 2, 4, 5, 6]


def test_associate_rj_matches_fixture_and_pynetdicom() -> None:
    data = P.a_associate_rj(1, 1, 7)
    assert data == F.ASSOCIATE_RJ
    decoded = A_ASSOCIATE_RJ()
    decoded.decode(data)
    assert (decoded.result, decoded.source, decoded.reason_diagnostic) == (1, 1, 7)
    assert P.parse_reject(data) == (1, 1, 7)


@pytest.mark.parametrize(
    ("result", "source", "reason"),
    [(1, 1, 1), (1, 1, 2), (2, 1, 3), (1, 1, 7), (1, 2, 1), (2, 2, 2), (2, 3, 1), (2, 3, 2)],
)
def test_associate_rj_round_trip(result: int, source: int, reason: int) -> None:
    data = P.a_associate_rj(result, source, reason)
    ref = A_ASSOCIATE_RJ()
    ref.decode(data)
    assert ref.encode() == data
    assert P.parse_reject(data) == (result, source, reason)


@pytest.mark.parametrize(
    ("result", "source", "reason"),
    [(0, 1, 1), (3, 1, 1), (1, 0, 1), (1, 4, 1), (1, 1, 4), (1, 1, 0), (1, 2, 3), (2, 3, 0), (2, 3, 3)],
)
def test_associate_rj_rejects_undefined_values(result: int, source: int, reason: int) -> None:
    with pytest.raises(ValueError):
        P.a_associate_rj(result, source, reason)


def test_parse_reject_tolerates_reserved_reason_but_not_bad_result_or_length() -> None:
    assert P.parse_reject(bytes.fromhex("03000000000400010105")) == (1, 1, 5)
    with pytest.raises(PduError, match="result 9"):
        P.parse_reject(bytes.fromhex("03000000000400090101"))
    with pytest.raises(PduError, match="source 4"):
        P.parse_reject(bytes.fromhex("03000000000400010401"))
    with pytest.raises(PduError, match="fixes it at 4"):
        P.parse_reject(bytes.fromhex("0300000000050001010100"))
    with pytest.raises(PduError, match="expected an A-ASSOCIATE-RJ"):
        P.parse_reject(F.RELEASE_RQ)
    with pytest.raises(PduError, match="6 bytes"):
        P.parse_reject(b"\x03\x00")


def test_abort_defaults_and_pynetdicom() -> None:
    data = P.a_abort()
    assert data == bytes.fromhex("07000000000400000200")
    assert P.a_abort(2, 2) == F.ABORT_PROVIDER_UNEXPECTED
    ref = A_ABORT_RQ()
    ref.decode(P.a_abort(2, 6))
    assert (ref.source, ref.reason_diagnostic) == (2, 6)
    assert P.parse_abort(P.a_abort(0, 0)) == (0, 0)
    assert P.parse_abort(F.ABORT_PROVIDER_UNEXPECTED) == (2, 2)


@pytest.mark.parametrize(("source", "reason"), [(1, 0), (3, 0), (0, 1), (2, 3), (2, 7)])
def test_abort_rejects_undefined_values(source: int, reason: int) -> None:
    with pytest.raises(ValueError):
        P.a_abort(source, reason)


def test_parse_abort_errors() -> None:
    with pytest.raises(PduError, match="A-ABORT PDU-length is 5"):
        P.parse_abort(bytes.fromhex("0700000000050000020000"))
    with pytest.raises(PduError, match="11 bytes, expected 10"):
        P.parse_abort(bytes.fromhex("07000000000400000200") + b"\x00")


def test_release_pdus() -> None:
    assert P.a_release_rq() == F.RELEASE_RQ
    assert P.a_release_rp() == F.RELEASE_RP
    rq, rp = A_RELEASE_RQ(), A_RELEASE_RP()
    rq.decode(F.RELEASE_RQ)
    rp.decode(F.RELEASE_RP)
    assert rq.encode() == P.a_release_rq() and rp.encode() == P.a_release_rp()


def test_pdu_error_carries_detail_and_reason() -> None:
    err = PduError("PDU type 0x08 is not defined (PS3.8 9.3)", abort_reason=1)
    assert err.detail == str(err) == "PDU type 0x08 is not defined (PS3.8 9.3)"
    assert err.abort_reason == 1 and err.events == []
    assert PduError("x").abort_reason == P.AbortReason.INVALID_PARAMETER_VALUE


def test_pdu_header() -> None:
    assert P.pdu_header(F.P_DATA_ECHO_RQ) == (4, 74)

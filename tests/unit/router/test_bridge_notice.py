"""AuditNotice from the bridge: only known events, validated and escaped fields, reach the audit trail."""

from __future__ import annotations

import logging

import pytest

from protos.relay.v1 import relay_pb2 as pb
from relay_router.bridge_notice import DETAIL_MAX, check_notice


def test_known_event_with_valid_fields_is_kept_and_detail_escaped() -> None:
    notice = pb.AuditNotice(event="access_refused", peer_site="site-b", ae_title="PACS", detail="a\x1b[31mred\nline")
    checked = check_notice(notice)
    assert checked is not None
    assert (checked.event, checked.peer_site, checked.ae_title) == ("access_refused", "site-b", "PACS")
    assert "\x1b" not in checked.detail and "\n" not in checked.detail
    assert "\\x1b" in checked.detail


def test_detail_is_bounded() -> None:
    checked = check_notice(pb.AuditNotice(event="access_refused", peer_site="b", detail="x" * 100_000))
    assert checked is not None
    assert len(checked.detail) < DETAIL_MAX + 40


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"event": "sign_on"}, "unknown event 'sign_on'"),
        ({"event": "x\x1b[2J" + "y" * 10_000}, "unknown event 'x\\x1b[2J"),
        ({"event": "access_refused", "peer_site": "Evil Site\n"}, "invalid peer site"),
        ({"event": "access_refused", "ae_title": "A" * 17}, "invalid AE title"),
    ],
)
def test_hostile_notice_is_dropped_with_a_bounded_escaped_warning(
    fields: dict[str, str], says: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="relay_router.bridge_notice"):
        assert check_notice(pb.AuditNotice(**fields)) is None
    [record] = caplog.records
    message = record.getMessage()
    assert says in message
    assert "\x1b" not in message and "\n" not in message
    assert len(message) < 200

"""`relay-router status` shows each accelerated route's transfer (relay_router.status.accelerated_route_lines)."""

from __future__ import annotations

from relay_router.status import accelerated_route_lines


def test_each_accelerated_title_gets_a_line_saying_what_is_wrong() -> None:
    report = {
        "accelerate": {
            "routes": {
                "PACS_B": {"connected": True, "capabilities_known": True, "in_flight": 3, "last_error": ""},
                "PACS_C": {"connected": False, "capabilities_known": False, "in_flight": 0, "last_error": "offline"},
            }
        }
    }
    first, second = accelerated_route_lines(report)
    assert "PACS_B" in first and "transfer open" in first and "3 in flight" in first and "error" not in first
    assert "PACS_C" in second and "NOT learned" in second and "transparently" in second
    assert second.endswith("last error: offline")
    assert accelerated_route_lines({}) == []  # no accelerated route: nothing added

"""relay_router.replay: the responder's replay record, bounded by the freshness window and kept on disk."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_router.replay import MARGIN_S, SeenAssociations
from relay_router.seal import FRESHNESS_WINDOW_S

PROPERTIES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
T = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = T) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def aid(n: int) -> str:
    return f"{n:032x}"


def test_an_id_is_claimed_once() -> None:
    seen = SeenAssociations(clock=Clock())
    assert seen.claim(aid(1), int(T * 1000)) and aid(1) in seen
    assert not seen.claim(aid(1), int(T * 1000))
    assert len(seen) == 1


def test_an_id_is_kept_until_its_open_has_left_the_window() -> None:
    clock = Clock()
    seen = SeenAssociations(clock=clock)
    seen.claim(aid(1), int(T * 1000))
    clock.now = T + FRESHNESS_WINDOW_S + MARGIN_S - 1  # the Open would still pass the time check
    assert aid(1) in seen and not seen.claim(aid(1), int(T * 1000))
    clock.now = T + FRESHNESS_WINDOW_S + MARGIN_S + 1  # ... now it would not: forgotten, memory bounded
    assert aid(1) not in seen and len(seen) == 0


def test_an_open_from_a_clock_ahead_of_ours_is_kept_until_its_own_time_leaves_the_window() -> None:
    clock = Clock()
    seen = SeenAssociations(clock=clock)
    seen.claim(aid(1), int((T + 250) * 1000))  # the initiator's clock runs 250 s ahead
    clock.now = T + 250 + FRESHNESS_WINDOW_S
    assert aid(1) in seen


def test_the_record_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "seen_associations"
    clock = Clock()
    first = SeenAssociations(path, clock=clock)
    first.claim(aid(1), int(T * 1000))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    clock.now = T + 120  # restarted two minutes later
    restarted = SeenAssociations(path, clock=clock)
    assert aid(1) in restarted and not restarted.claim(aid(1), int(T * 1000))
    clock.now = T + FRESHNESS_WINDOW_S + MARGIN_S + 1
    later = SeenAssociations(path, clock=clock)  # expired entries are dropped when the file is read back
    assert len(later) == 0 and path.read_text() == ""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_torn_or_damaged_file_keeps_what_it_can(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "seen_associations"
    expiry = T + 100
    path.write_text(f"{aid(1)} {expiry:.0f}\nnot an id 5\n{aid(2)} {expiry:.0f}\n{aid(3)} 18")  # torn last line
    seen = SeenAssociations(path, clock=Clock())
    assert aid(1) in seen and aid(2) in seen and aid(3) not in seen
    assert "skipped 1 unreadable line(s)" in caplog.text


@pytest.mark.parametrize("bad", ["A" * 32, "a" * 31, "a" * 33, "a" * 31 + "\n", "../" + "a" * 29, ""])
def test_only_association_ids_are_recorded(bad: str, tmp_path: Path) -> None:
    """The id is the initiator's choice: nothing but 32 hex digits may reach the file."""
    seen = SeenAssociations(tmp_path / "seen", clock=Clock())
    with pytest.raises(ValueError, match="is not 32 lowercase hex digits"):
        seen.claim(bad, int(T * 1000))
    assert not (tmp_path / "seen").exists()


def test_the_file_is_compacted_when_mostly_expired(tmp_path: Path) -> None:
    path = tmp_path / "seen"
    clock = Clock()
    seen = SeenAssociations(path, clock=clock)
    for n in range(1200):
        clock.now = T + n  # one association a second
        seen.claim(aid(n), int(clock.now * 1000))
    lines = path.read_text().splitlines()
    live = len(seen)
    assert live == FRESHNESS_WINDOW_S + MARGIN_S  # bounded by the window, not by what was ever seen
    assert len(lines) < 2 * live + 1000 + 2
    assert set(SeenAssociations(path, clock=clock)._expiry) == set(seen._expiry)


@PROPERTIES
@given(forged=st.lists(st.integers(0, 2**128 - 1), max_size=200))
def test_ids_that_were_never_claimed_cannot_push_a_claimed_one_out(forged: list[int]) -> None:
    """Forged notices are refused before `claim` (the handshake fails), and lookups change nothing."""
    seen = SeenAssociations(clock=Clock())
    seen.claim("f" * 32, int(T * 1000))
    for n in forged:
        assert (aid(n) in seen) == (aid(n) == "f" * 32)
    assert "f" * 32 in seen and len(seen) == 1

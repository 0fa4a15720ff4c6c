"""Router B's book of outcomes not yet acknowledged: append-only, survives a SIGKILL, opens older books."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from relay_router.accel import outcome_book, records
from relay_router.accel.outcome_book import OutcomeBook

ROOT = Path(__file__).resolve().parents[3]


def _ids(book: OutcomeBook, site: str) -> set[str]:
    reader = records.RecordReader(records.FAR_TO_NEAR)
    return {r.id for r in reader.feed(b"".join(book.pending(site)))}  # type: ignore[attr-defined]


def test_outcomes_survive_a_reopen_and_forgotten_ones_stay_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "state" / "outcomes.json"
    book = OutcomeBook(path)
    book.add("site-a", "1", "1.2.3.1", 0x0000, "")
    book.add("site-a", "2", "1.2.3.2", 0xA900, "0xa900 from STORE: does not match")
    book.add("site-b", "3", "1.2.3.3", 0x0000, "")
    book.forget("site-a", ("1", "unknown"))
    book.close()
    again = OutcomeBook(path)
    assert again.count() == 2
    assert _ids(again, "site-a") == {"2"} and _ids(again, "site-b") == {"3"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "outcomes name instances of patients: owner only"


def test_a_book_in_the_older_format_opens_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "outcomes.json"
    path.write_text(json.dumps({"site-a": {"7": ["1.2.3.7", 0, ""]}}))
    book = OutcomeBook(path)
    assert _ids(book, "site-a") == {"7"}


def test_a_torn_last_line_is_skipped_and_the_rest_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "outcomes.json"
    book = OutcomeBook(path)
    book.add("site-a", "1", "1.2.3.1", 0, "")
    book.close()
    with open(path, "ab") as out:
        out.write(b'["add", "site-a", "2", "1.2.')  # a machine crash mid-append
    again = OutcomeBook(path)
    assert _ids(again, "site-a") == {"1"}
    assert "damaged lines skipped" in caplog.text


def test_compaction_keeps_every_outcome(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outcome_book, "COMPACT_EVERY", 10)
    path = tmp_path / "outcomes.json"
    book = OutcomeBook(path)
    for number in range(55):
        book.add("site-a", str(number), f"1.2.3.{number}", 0, "")
        if number % 3 == 0:
            book.forget("site-a", (str(number),))
    assert len(path.read_text().splitlines()) <= 11, "rewritten as a snapshot every 10 lines"
    book.close()
    assert _ids(OutcomeBook(path), "site-a") == {str(n) for n in range(55) if n % 3}


def test_concurrent_adds_from_delivery_workers_are_all_kept(tmp_path: Path) -> None:
    path = tmp_path / "outcomes.json"
    book = OutcomeBook(path)

    def worker(number: int) -> None:
        for item in range(200):
            book.add("site-a", f"{number}-{item}", "1.2.3", 0, "")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    book.close()
    assert OutcomeBook(path).count() == 800


def test_every_outcome_added_before_a_sigkill_is_there_after_it(tmp_path: Path) -> None:
    path = tmp_path / "outcomes.json"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from relay_router.accel.outcome_book import OutcomeBook\n"
            f"book = OutcomeBook(Path({str(path)!r}))\n"
            "for n in range(300): book.add('site-a', str(n), '1.2.3', 0, '')\n"
            "print('added', flush=True)\n"
            "while True: book.add('site-a', 'x' + str(time.monotonic_ns()), '1.2.3', 0, '')\n",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"added"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    ids = _ids(OutcomeBook(path), "site-a")
    assert {str(n) for n in range(300)} <= ids, "killed while appending: everything added before is kept"

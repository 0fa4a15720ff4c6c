"""relay_common.files: the one owner-only file writer."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from relay_common import files
from relay_common.files import create_private, write_private


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_is_owner_only_and_parents_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "identity.key"
    write_private(path, b"secret")
    assert path.read_bytes() == b"secret" and mode(path) == 0o600
    assert not path.with_name("identity.key.tmp").exists()


def test_text_is_written_as_utf8(tmp_path: Path) -> None:
    write_private(tmp_path / "t.json", '{"name": "Müller"}')
    assert (tmp_path / "t.json").read_bytes() == '{"name": "Müller"}'.encode()


@pytest.mark.parametrize("atomic", [True, False])
def test_an_existing_wider_file_is_narrowed(tmp_path: Path, atomic: bool) -> None:
    path = tmp_path / "secret.key"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, b"new", atomic=atomic)
    assert path.read_bytes() == b"new" and mode(path) == 0o600


def test_a_wider_mode_can_be_asked_for(tmp_path: Path) -> None:
    write_private(tmp_path / "status.json", "{}", mode=0o640)
    assert mode(tmp_path / "status.json") == 0o640


def test_atomic_write_never_shows_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between writing and renaming leaves the old file whole (and a .tmp beside it)."""
    path = tmp_path / "known_sites.json"
    write_private(path, b"old contents")

    def crash(src: object, dst: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        write_private(path, b"new contents that never land")
    assert path.read_bytes() == b"old contents"
    assert mode(path.with_name("known_sites.json.tmp")) == 0o600


def test_atomic_write_replaces_the_inode(tmp_path: Path) -> None:
    """A reader holding the old file keeps reading the old contents."""
    path = tmp_path / "f"
    write_private(path, b"one")
    with path.open("rb") as reader:
        write_private(path, b"two")
        assert reader.read() == b"one"
    assert path.read_bytes() == b"two"


def test_create_private_keeps_contents_and_narrows(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    create_private(path)
    assert path.read_bytes() == b"" and mode(path) == 0o600
    path.write_text("line\n")
    os.chmod(path, 0o666)
    create_private(path)
    assert path.read_text() == "line\n" and mode(path) == 0o600


def test_create_private_can_leave_an_operator_chosen_mode(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("x\n")
    os.chmod(path, 0o640)
    create_private(path, narrow=False)
    assert mode(path) == 0o640

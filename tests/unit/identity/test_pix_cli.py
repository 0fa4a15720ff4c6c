"""relay-router pix add|list|remove|import through the CLI's main(): output, exit codes, audit, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay_common.audit import read_events
from relay_router.cli import main


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "router.toml"
    path.write_text(
        '[router]\nname = "site-a"\n[bridge]\naddress = "127.0.0.1:1"\ninsecure = true\n'
        '[audit]\nfile = "audit.jsonl"\n[identity]\nissuer = "HOSP_A"\n'
    )
    return path


def run(config: Path, *args: str) -> int:
    return main(["--config", str(config), "pix", *args])


def test_add_list_remove(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "add", "A-1", "B-9", "--other-issuer", "HOSP_B") == 0
    assert "linked A-1^^^HOSP_A <-> B-9^^^HOSP_B" in capsys.readouterr().out
    assert run(config, "add", "A-1", "B-8", "--other-issuer", "HOSP_B") == 1
    assert "conflicts with the existing link" in capsys.readouterr().err
    assert run(config, "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["local_id"], r["other_id"], r["other_issuer"], r["origin"]) for r in rows] == [
        ("A-1", "B-9", "HOSP_B", "cli")
    ]
    assert run(config, "remove", "A-1", "B-9", "--other-issuer", "HOSP_B") == 0
    assert run(config, "remove", "A-1") == 1  # nothing left to remove
    assert run(config, "list") == 0
    assert "no links" in capsys.readouterr().out
    events = read_events(config.parent / "audit.jsonl")
    assert [(e["event"], e["outcome"]) for e in events] == [
        ("pix_add", "success"),
        ("pix_add", "failure"),
        ("pix_remove", "success"),
        ("pix_remove", "success"),
    ]


def test_import_names_the_bad_line_and_writes_nothing(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = config.parent / "links.csv"
    csv.write_text("local_id,other_id,other_issuer\nA-1,B-9,HOSP_B\nA-2,B-8\\x,HOSP_B\n")
    assert run(config, "import", str(csv)) == 1
    assert "line 3: patient id: contains a backslash" in capsys.readouterr().err
    assert run(config, "list") == 0
    assert "no links" in capsys.readouterr().out


def test_bad_identifiers_and_missing_issuer_are_errors(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "add", "A\x01", "B-9", "--other-issuer", "HOSP_B") == 1
    assert "patient id: contains a control character" in capsys.readouterr().err
    config.write_text(config.read_text().replace('[identity]\nissuer = "HOSP_A"\n', ""))
    assert run(config, "add", "A-1", "B-9", "--other-issuer", "HOSP_B") == 1
    assert "no local issuer" in capsys.readouterr().err
    assert run(config, "add", "A-1", "B-9", "--other-issuer", "HOSP_B", "--local-issuer", "HOSP_A") == 0

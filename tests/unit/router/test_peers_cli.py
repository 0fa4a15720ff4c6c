"""`relay-router peers list|approve|reject`: what the operator runs to approve a partner's key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay_router.approvals import ApprovalStore
from relay_router.cli import main
from relay_router.seal import Identity

PINNED = "11" * 32


def config(tmp_path: Path, *, trust_first_use: bool = False) -> Path:
    path = tmp_path / "router.toml"
    path.write_text(
        '[router]\nname = "site-a"\nstate_dir = "state"\n'
        + ("trust_first_use = true\n" if trust_first_use else "")
        + '[bridge]\naddress = "127.0.0.1:1"\ninsecure = true\npassword = "x"\n'
        + f'[audit]\nfile = "audit.jsonl"\n[[pin]]\nsite = "site-p"\nfingerprint = "{PINNED}"\n'
    )
    return path


def test_approve_compares_the_fingerprint_with_the_pending_offer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path)
    offered, real = Identity.generate().public.fingerprint, Identity.generate().public.fingerprint
    ApprovalStore(tmp_path / "state").record_pending("site-x", offered, "inbound", attempt=True)

    assert main(["-c", str(path), "peers", "list"]) == 0
    listing = capsys.readouterr().out
    assert f"site-x                   pending   {offered}" in listing and "inbound, 1 refused" in listing

    assert main(["-c", str(path), "peers", "approve", "site-x", "--fingerprint", real]) == 1
    assert f"NOT approved: the bridge offers {offered} for site-x, not {real}" in capsys.readouterr().err
    assert ApprovalStore(tmp_path / "state").known() == {}

    assert main(["-c", str(path), "peers", "approve", "site-x", "--fingerprint", offered.upper()]) == 0
    assert capsys.readouterr().out.strip() == f"approved site-x with {offered}"
    assert main(["-c", str(path), "peers", "list", "--json"]) == 0
    rows = {row["site"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["site-x"]["state"] == "approved" and rows["site-p"]["state"] == "pinned"

    assert main(["-c", str(path), "peers", "reject", "site-p"]) == 1  # a [[pin]] is changed in router.toml
    assert "pinned in" in capsys.readouterr().err
    assert main(["-c", str(path), "peers", "reject", "site-x"]) == 0
    assert ApprovalStore(tmp_path / "state").known() == {}
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["outcome"]) for e in events] == [
        ("peer_approve", "failure"),
        ("peer_approve", "success"),
        ("peer_reject", "success"),
    ]


def test_check_config_warns_about_trust_first_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(config(tmp_path)), "check-config"]) == 0
    assert "trust_first_use" not in capsys.readouterr().err
    assert main(["-c", str(config(tmp_path, trust_first_use=True)), "check-config"]) == 0
    assert "warning:" in (err := capsys.readouterr().err) and "router.trust_first_use is on" in err


def test_status_names_the_sites_waiting_for_approval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = config(tmp_path)
    store = ApprovalStore(tmp_path / "state")
    store.record_pending("site-x", "ab" * 32, "inbound", attempt=True)
    store.record_pending("site-p", "cd" * 32, "directory", attempt=False)  # pinned: changed in router.toml
    main(["-c", str(path), "status"])
    assert "waiting for your approval: site-x (relay-router peers list)" in capsys.readouterr().out
    main(["-c", str(path), "status", "--json"])
    assert json.loads(capsys.readouterr().out)["peers_pending"] == ["site-x"]
    store.approve("site-x", "ab" * 32)
    main(["-c", str(path), "status"])
    assert "waiting for your approval" not in capsys.readouterr().out

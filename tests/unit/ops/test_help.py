"""`--help` works for every command and sub-command of both programs, and each says what it does."""

from __future__ import annotations

import argparse

import pytest

from relay_bridge import cli as bridge_cli
from relay_router import cli as router_cli


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path, e.g. ("router", "add"), with the help text its parent gives it."""
    found: list[tuple[str, ...]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"{' '.join((*prefix, name))} has no help text"
                found.append((*prefix, name))
                found += commands(sub, (*prefix, name))
    return found


@pytest.mark.parametrize("program", [bridge_cli, router_cli], ids=["relay-bridge", "relay-router"])
def test_every_command_has_help(program: object, capsys: pytest.CaptureFixture[str]) -> None:
    parser = program._parser()  # type: ignore[attr-defined]
    paths = commands(parser)
    assert len(paths) >= 7
    for path in [(), *paths]:
        with pytest.raises(SystemExit) as done:
            program.main([*path, "--help"])  # type: ignore[attr-defined]
        assert done.value.code == 0, path
        out = capsys.readouterr().out
        assert out.startswith("usage: ") and "-h, --help" in out, path

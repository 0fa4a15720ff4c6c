"""relay_common.validate: AE titles and site names, one rule for router config, sign-on and directory."""

from __future__ import annotations

import pytest

from relay_common.validate import is_ae_title, is_share_target, is_site_name


@pytest.mark.parametrize("title", ["PACS", "CT_1", "A" * 16, "MR 2", "a-b.c", "X", "~!@#$%^&*()[]"])
def test_valid_ae_titles(title: str) -> None:
    assert is_ae_title(title)


@pytest.mark.parametrize(
    "title", ["", "A" * 17, "PACS\\2", " PACS", "PACS ", "   ", "PA\nCS", "PA\x00CS", "PACS\n", "PÄCS", "PA\x7fCS"]
)
def test_invalid_ae_titles(title: str) -> None:
    assert not is_ae_title(title)


@pytest.mark.parametrize("name", ["a", "hospital-a", "site.b_2", "0", "a" * 63])
def test_valid_site_names(name: str) -> None:
    assert is_site_name(name) and is_share_target(name)


@pytest.mark.parametrize("name", ["", "A", "Hospital", "-a", ".a", "_a", "a" * 64, "a b", "a/b", "a\n", "*"])
def test_invalid_site_names(name: str) -> None:
    assert not is_site_name(name)


def test_share_target_accepts_every_site_wildcard() -> None:
    assert is_share_target("*") and not is_share_target("**")


def test_descriptions_are_printable_and_bounded() -> None:
    from relay_common.validate import is_description

    assert is_description("Main archive (CT, MR) - floor 2")
    assert is_description("é" * 128) and not is_description("x" * 129)
    for bad in ("a\x1b[31m", "a\nb", "a\u202eb", "[bold]x", "x[/]"):
        assert not is_description(bad), bad


def test_printable_escapes_and_cuts() -> None:
    from relay_common.validate import printable, terminal_safe

    assert printable("a\x1b[31mb\x9b\u202e") == "a\\x1b[31mb\\x9b\\u202e"
    assert printable("x" * 300, 10) == "xxxxxxxxxx...(+290 chars)"
    assert terminal_safe("one\ntwo\x07") == "one\ntwo\\x07"

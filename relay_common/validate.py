"""The names that cross the bridge: AE titles and site (router account) names, checked one way everywhere.

The router's configuration, the bridge's directory and the devices a router
publishes at sign-on all use these, so a title one side accepts is never
refused by the other.
"""

from __future__ import annotations

import re

# PS3.5 AE value representation: 1-16 characters of the default repertoire, no backslash, no control characters.
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}\Z")
# Site names are router account names: lowercase, DNS-label-like, at most 63 characters.
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")

AE_TITLE_RULE = "1-16 characters, no backslash or control characters"
SITE_NAME_RULE = "1-63 characters of a-z, 0-9, '.', '_' or '-'"


def is_ae_title(title: str) -> bool:
    """True for a valid AE title without leading or trailing spaces (which DICOM would not keep)."""
    return bool(AE_TITLE.match(title)) and title.strip() == title


def is_site_name(name: str) -> bool:
    return bool(SITE_NAME.match(name))


def is_share_target(name: str) -> bool:
    """A site name, or '*' for every site."""
    return name == "*" or is_site_name(name)


# Free text a router publishes (device descriptions): printable characters only, so it can be stored,
# logged, audited and shown on a terminal without escaping tricks.
DESCRIPTION_MAX = 128
DESCRIPTION_RULE = f"at most {DESCRIPTION_MAX} printable characters, no control characters or markup brackets"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def is_description(text: str) -> bool:
    """Printable, bounded, without control or bidi characters nor the '[' ']' of Rich markup."""
    return len(text) <= DESCRIPTION_MAX and not _CONTROL.search(text) and "[" not in text and "]" not in text


def printable(text: object, limit: int | None = None) -> str:
    """`text` made safe for a terminal: control and bidi characters shown as escapes (a newline
    too), and with `limit` cut to that many characters (with a marker saying how much was cut)."""
    value = str(text)
    cut = 0 if limit is None else len(value) - limit
    if cut > 0:
        value = value[:limit]
    value = _CONTROL.sub(_escape, value)
    return value + (f"...(+{cut} chars)" if cut > 0 else "")


def terminal_safe(report: str) -> str:
    """A whole multi-line report made safe: every line's control characters escaped, line breaks kept."""
    return "\n".join(printable(line) for line in report.split("\n"))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

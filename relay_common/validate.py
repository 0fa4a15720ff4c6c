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

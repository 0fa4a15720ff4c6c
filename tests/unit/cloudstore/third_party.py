"""A stand-in for a third-party backend package, loaded through an entry point in the tests."""

from __future__ import annotations

from typing import Any

from cloudstore.file import FileBlobStore


class ThirdPartyStore(FileBlobStore):
    """``thirdparty:///path``: a file store under another scheme, recording its options."""

    scheme = "thirdparty"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ThirdPartyStore:
        store = super().from_url("file" + url.removeprefix("thirdparty"), **options)
        store.opened_with = (url, options)  # type: ignore[attr-defined]
        return store  # type: ignore[return-value]


class NotAStore:
    pass

"""Choose a :class:`~cloudstore.base.BlobStore` backend by URL scheme, importing it lazily.

Built-in schemes are listed in :data:`BACKENDS` as ``scheme -> ("module:Class", install
hint)``: the module is imported only when a store of that scheme is opened, so
``import cloudstore`` never pulls in boto3 or google-cloud-storage. Other packages add
schemes through the ``dicom_relay.cloudstore`` entry point group, e.g. in their
pyproject.toml::

    [project.entry-points."dicom_relay.cloudstore"]
    azure = "relay_azure.store:AzureBlobStore"

A program can also call :func:`register_scheme`. Built-in and registered schemes take
precedence over entry points of the same name.
"""

from __future__ import annotations

import importlib
import logging
import re
from importlib import metadata
from typing import Any

from cloudstore.base import BlobStore, BlobStoreError

__all__ = [
    "BACKENDS",
    "ENTRY_POINT_GROUP",
    "MissingDependency",
    "UnknownScheme",
    "known_schemes",
    "load_backend",
    "open_store",
    "register_scheme",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dicom_relay.cloudstore"

#: scheme -> ("dotted.module:Class", hint printed when the backend's dependencies are missing)
BACKENDS: dict[str, tuple[str, str]] = {
    "file": ("cloudstore.file:FileBlobStore", "part of dicom-relay; reinstall it: pip install dicom-relay"),
    "s3": ("cloudstore.s3:S3BlobStore", "pip install 'dicom-relay[s3]'  (installs boto3)"),
    "gs": ("cloudstore.gcs:GCSBlobStore", "pip install 'dicom-relay[gcs]'  (installs google-cloud-storage)"),
}

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class UnknownScheme(BlobStoreError, ValueError):
    """No backend serves the URL's scheme."""


class MissingDependency(BlobStoreError, ImportError):
    """The backend exists but a package it needs is not installed; the message says which to install."""


def register_scheme(scheme: str, target: str, hint: str = "") -> None:
    """Serve ``scheme`` with the class at ``target`` ("module:Class"), replacing any earlier one."""
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise ValueError(f"bad scheme {scheme!r}: lowercase letters, digits, '+', '-', '.'; starting with a letter")
    if ":" not in target:
        raise ValueError(f"target {target!r} must read 'module:Class'")
    BACKENDS[scheme] = (target, hint or f"install the package that provides {target}")


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry_point.name.lower(), entry_point)
    return found


def known_schemes() -> list[str]:
    """Every scheme that :func:`open_store` accepts: built-in, registered and from entry points."""
    return sorted(set(BACKENDS) | set(_entry_points()))


def _import_target(scheme: str, target: str, hint: str) -> Any:
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing *dependency* earns the hint; a missing backend module itself is a bug.
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            raise BlobStoreError(f"the {scheme}:// backend module {module_name!r} does not exist") from exc
        raise MissingDependency(
            f"the {scheme}:// store needs the Python package {exc.name!r}, which is not installed: {hint}"
        ) from exc
    try:
        obj: Any = module
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise BlobStoreError(f"the {scheme}:// backend {target!r} does not exist: {exc}") from exc
    return obj


def load_backend(scheme: str) -> type[BlobStore]:
    """The backend class serving ``scheme``, imported now."""
    scheme = scheme.lower()
    if scheme in BACKENDS:
        target, hint = BACKENDS[scheme]
        cls = _import_target(scheme, target, hint)
    else:
        entry_point = _entry_points().get(scheme)
        if entry_point is None:
            raise UnknownScheme(
                f"no blob store backend for {scheme}:// URLs; known schemes: {', '.join(known_schemes())} "
                f"(others can be added through the {ENTRY_POINT_GROUP!r} entry point group)"
            )
        distribution = getattr(entry_point, "dist", None)
        provider = f"the {distribution.name} package" if distribution is not None else "its package"
        hint = f"reinstall {provider} with its dependencies (entry point {entry_point.name} = {entry_point.value})"
        try:
            cls = entry_point.load()
        except ModuleNotFoundError as exc:
            raise MissingDependency(
                f"the {scheme}:// store needs the Python package {exc.name!r}, which is not installed: {hint}"
            ) from exc
        except (ImportError, AttributeError) as exc:
            raise BlobStoreError(f"the {scheme}:// backend {entry_point.value!r} could not be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, BlobStore)):
        raise BlobStoreError(f"the {scheme}:// backend {cls!r} is not a cloudstore.BlobStore subclass")
    return cls


def open_store(url: str, **options: Any) -> BlobStore:
    """Open the blob store named by ``url``, choosing the backend by scheme.

    - ``file:///srv/relay/spill`` (options: signing_key, create, fsync)
    - ``s3://bucket/prefix`` (options: endpoint_url, region, profile, access_key_id,
      secret_access_key, session_token, addressing_style, timeouts; credentials otherwise
      come from boto3's usual chain)
    - ``gs://bucket/prefix`` (options: endpoint_url, credentials_file, project,
      anonymous, signing_credentials, presign_endpoint)

    See docs/cloudstore.md. Raises :class:`UnknownScheme` or :class:`MissingDependency`.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, not {type(url).__name__}")
    match = _SCHEME.match(url)
    if match is None:
        raise UnknownScheme(f"blob store URL {url!r} has no scheme; known schemes: {', '.join(known_schemes())}")
    cls = load_backend(match.group(1))
    return cls.from_url(url, **options)

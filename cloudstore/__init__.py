"""Blob storage for the cloud spill: one async interface, backends chosen by URL scheme.

``open_store("s3://bucket/spill/")`` returns a :class:`BlobStore`; backends (file, S3,
GCS, and any registered through the ``dicom_relay.cloudstore`` entry point group) are
imported only when a store of their scheme is opened, so importing this package never
imports boto3 or google-cloud-storage. See docs/cloudstore.md.
"""

from cloudstore.base import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_PART_SIZE,
    MIN_PART_SIZE,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    PresignedURLError,
    PresignedURLExpired,
    PresignedURLInvalid,
)
from cloudstore.lifecycle import SweepReport, sweep
from cloudstore.registry import ENTRY_POINT_GROUP, MissingDependency, UnknownScheme, known_schemes, open_store

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PART_SIZE",
    "ENTRY_POINT_GROUP",
    "MIN_PART_SIZE",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "BlobStoreError",
    "MissingDependency",
    "PresignedURLError",
    "PresignedURLExpired",
    "PresignedURLInvalid",
    "SweepReport",
    "UnknownScheme",
    "known_schemes",
    "open_store",
    "sweep",
]

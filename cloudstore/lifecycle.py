"""The orphan sweep: delete blobs that were never delivered (and so never deleted).

Blobs are deleted by the receiving side once delivered; a crash on either side leaves
the rest. The bridge runs :func:`sweep` periodically as a safety net, on top of the
bucket lifecycle rules that docs/cloudstore.md describes (those act within a day;
the sweep can use a TTL of minutes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cloudstore.base import BlobStore, BlobStoreError, check_prefix

__all__ = ["SweepReport", "sweep"]

log = logging.getLogger(__name__)


@dataclass
class SweepReport:
    """What one sweep did."""

    #: Keys of the blobs deleted, sorted.
    deleted: list[str] = field(default_factory=list)
    #: Unfinished uploads discarded (S3 multipart uploads, temporary files).
    aborted_uploads: int = 0
    #: Failures; the sweep goes on past them (the next sweep retries).
    errors: list[BlobStoreError] = field(default_factory=list)


async def sweep(
    store: BlobStore,
    prefix: str,
    older_than_s: float,
    *,
    now: float | None = None,
    concurrency: int = 8,
) -> SweepReport:
    """Delete the blobs under ``prefix`` created more than ``older_than_s`` seconds ago.

    Also discards unfinished uploads as old (:meth:`BlobStore.abort_incomplete`).
    ``now`` (Unix time) defaults to the current time; ages are measured against the
    creation times the store reports, so the store's and this host's clocks should
    agree within a small fraction of the TTL.
    """
    check_prefix(prefix)
    if older_than_s < 0:
        raise ValueError(f"older_than_s must not be negative, not {older_than_s}")
    moment = time.time() if now is None else now
    cutoff = datetime.fromtimestamp(moment - older_than_s, UTC)
    report = SweepReport()

    try:
        candidates = [info.key for info in await store.list(prefix) if info.created <= cutoff]
    except BlobStoreError as exc:
        report.errors.append(exc)
        candidates = []

    limit = asyncio.Semaphore(max(1, concurrency))

    async def remove(key: str) -> None:
        async with limit:
            try:
                await store.delete(key)
            except BlobStoreError as exc:
                report.errors.append(exc)
            else:
                report.deleted.append(key)

    await asyncio.gather(*(remove(key) for key in candidates))
    report.deleted.sort()

    try:
        report.aborted_uploads = await store.abort_incomplete(prefix, older_than_s, now=moment)
    except BlobStoreError as exc:
        report.errors.append(exc)

    for error in report.errors:
        log.warning("sweep of %s under %r: %s", store.url, prefix, error)
    if report.deleted or report.aborted_uploads:
        log.info(
            "sweep of %s under %r: deleted %d blob(s), aborted %d upload(s)",
            store.url,
            prefix,
            len(report.deleted),
            report.aborted_uploads,
        )
    return report

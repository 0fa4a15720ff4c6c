"""The async blob store interface that every backend implements, and its errors.

A :class:`BlobStore` is opened from a URL (see :func:`cloudstore.open_store`) and
offers streaming puts and ranged gets that keep memory bounded whatever the blob
size, plus the presigned URLs that let routers move bytes without holding cloud
credentials.

The public methods validate their arguments here, once for all backends, then call
the ``_``-prefixed hooks that a backend implements. Backends wrap the blocking SDKs
(boto3, google-cloud-storage, the file system) in :func:`asyncio.to_thread`, so the
event loop never waits on the network or the disk.
"""

from __future__ import annotations

import abc
import asyncio
import builtins
import contextlib
import logging
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Self, TypeVar
from urllib.parse import unquote, urlsplit

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PART_SIZE",
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MAX_PRESIGN_S",
    "MIN_PART_SIZE",
    "MiB",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "BlobStoreError",
    "ChunkReader",
    "PresignedURLError",
    "PresignedURLExpired",
    "PresignedURLInvalid",
    "check_key",
    "check_prefix",
    "split_bucket_url",
]

MiB = 1 << 20
#: S3's lower bound for every part of a multipart upload except the last; applied to
#: every backend so that code tested on one store behaves the same on the others.
MIN_PART_SIZE = 5 * MiB
#: S3's upper bound for one part.
MAX_PART_SIZE = 5 * 1024 * MiB
#: S3's upper bound for the number of parts of one upload.
MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 8 * MiB
DEFAULT_CHUNK_SIZE = 1 * MiB
#: Longest validity of a presigned URL: the limit of S3 SigV4 and GCS V4 signatures.
MAX_PRESIGN_S = 7 * 24 * 3600
#: Longest key, in UTF-8 bytes (S3's and GCS's limit).
MAX_KEY_BYTES = 1024

Method = Literal["GET", "PUT"]
log = logging.getLogger(__name__)
T = TypeVar("T")


class BlobStoreError(Exception):
    """A store operation failed; the message says which store, which key and what failed.

    ``store`` is the store's URL (never with credentials) and ``key`` the blob key,
    when the failure concerns one.
    """

    def __init__(self, message: str, *, store: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.store = store
        self.key = key


class BlobNotFound(BlobStoreError, LookupError):
    """The blob does not exist (or disappeared while it was being read)."""


class PresignedURLError(BlobStoreError):
    """A presigned URL was refused (base class of the two reasons below)."""


class PresignedURLExpired(PresignedURLError):
    """The presigned URL is authentic but its validity has ended."""


class PresignedURLInvalid(PresignedURLError):
    """The presigned URL is malformed, forged or altered, or used with the wrong method."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What a store knows about one blob. ``key`` is relative to the store's URL prefix."""

    key: str
    size: int
    #: When the blob was written (the store's clock), timezone-aware UTC.
    created: datetime


def utc(moment: datetime) -> datetime:
    """``moment`` as a timezone-aware UTC datetime (naive values are taken as UTC)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _check_path(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} {value!r} is not valid Unicode ({exc.reason})") from exc
    if len(encoded) > MAX_KEY_BYTES:
        raise ValueError(f"{what} {value[:40]!r}... is longer than {MAX_KEY_BYTES} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{what} {value!r} contains control characters")
    if "\\" in value:
        raise ValueError(f"{what} {value!r} contains a backslash; use '/' to separate segments")
    if value.startswith("/"):
        raise ValueError(f"{what} {value!r} must be relative (no leading '/')")
    return value


def check_key(key: Any) -> str:
    """Validate a blob key: non-empty '/'-separated segments, none empty, '.' or '..'.

    Keys name the same object on every backend and become file paths in the file
    backend, so anything that could escape a directory or alias another key is refused.
    """
    _check_path(key, "key")
    if not key:
        raise ValueError("key must not be empty")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"key {key!r} has an empty, '.' or '..' segment")
    return key


def check_prefix(prefix: Any) -> str:
    """Validate a listing prefix: '' (everything) or the start of a key, maybe ending in '/'."""
    _check_path(prefix, "prefix")
    segments = prefix.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment in (".", "..") or (segment == "" and not last and prefix):
            raise ValueError(f"prefix {prefix!r} has an empty, '.' or '..' segment")
    return prefix


def check_part_size(part_size: Any) -> int:
    if not isinstance(part_size, int) or isinstance(part_size, bool):
        raise TypeError(f"part_size must be an int, not {type(part_size).__name__}")
    if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
        raise ValueError(
            f"part_size must be between {MIN_PART_SIZE} (5 MiB) and {MAX_PART_SIZE} (5 GiB), not {part_size}"
        )
    return part_size


def check_expiry(expires_s: Any) -> int:
    if isinstance(expires_s, bool) or not isinstance(expires_s, int | float):
        raise TypeError(f"expires_s must be a number of seconds, not {type(expires_s).__name__}")
    if not math.isfinite(expires_s) or not 1 <= math.ceil(expires_s) <= MAX_PRESIGN_S:
        raise ValueError(f"expires_s must be between 1 and {MAX_PRESIGN_S} (7 days), not {expires_s}")
    return math.ceil(expires_s)


def split_bucket_url(url: str, scheme: str) -> tuple[str, str]:
    """``scheme://bucket/some/prefix`` -> ("bucket", "some/prefix/"); the prefix is '' or ends in '/'."""
    parts = urlsplit(url)
    if parts.scheme != scheme:
        raise ValueError(f"not a {scheme}:// URL: {url!r}")
    if not parts.netloc:
        raise ValueError(f"{scheme} URL {url!r} names no bucket ({scheme}://bucket/prefix)")
    if parts.query or parts.fragment:
        raise ValueError(f"{scheme} URL {url!r} must not have a query or fragment; pass options instead")
    if "@" in parts.netloc or ":" in parts.netloc:
        raise ValueError(f"{scheme} URL {url!r}: put credentials and endpoints in options, not in the URL")
    prefix = unquote(parts.path).strip("/")
    if any(segment in ("", ".", "..") for segment in prefix.split("/")) and prefix:
        raise ValueError(f"{scheme} URL {url!r} has an empty, '.' or '..' path segment")
    return parts.netloc, f"{prefix}/" if prefix else ""


class ChunkReader:
    """Pulls chunks from an async iterable in batches of at least ``n`` bytes.

    Chunks are copied when they are mutable (``bytearray``, ``memoryview``): a producer
    may reuse its buffer as soon as it has yielded it. Empty chunks are dropped.
    """

    def __init__(self, chunks: AsyncIterable[bytes]) -> None:
        self._iterator = aiter(chunks)
        self.eof = False
        self.total = 0

    async def read_at_least(self, n: int) -> list[bytes]:
        """Chunks totalling at least ``n`` bytes, or fewer at the end (then ``eof`` is set)."""
        batch: list[bytes] = []
        got = 0
        while got < n and not self.eof:
            try:
                chunk = await anext(self._iterator)
            except StopAsyncIteration:
                self.eof = True
                break
            if isinstance(chunk, bytearray | memoryview):
                chunk = bytes(chunk)
            elif not isinstance(chunk, bytes):
                raise TypeError(f"put_stream chunks must be bytes-like, not {type(chunk).__name__}")
            if chunk:
                batch.append(chunk)
                got += len(chunk)
        self.total += got
        return batch


class BlobStore(abc.ABC):
    """An async store of immutable blobs addressed by '/'-separated keys.

    Open one with :func:`cloudstore.open_store`; use it as an async context manager or
    call :meth:`close`. Every method may raise :class:`BlobStoreError` (its subclass
    :class:`BlobNotFound` when a blob is missing); arguments are checked first and bad
    ones raise ``ValueError`` or ``TypeError``.

    A backend subclass sets ``scheme``, implements :meth:`from_url` and the ``_``-hooks.
    """

    #: The URL scheme the backend serves ("file", "s3", "gs", ...).
    scheme: ClassVar[str] = ""

    def __init__(self, url: str) -> None:
        #: The store's URL, normalized and without credentials: used in every error message.
        self.url = url
        self._closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, **options: Any) -> Self:
        """Open the store named by ``url`` with backend-specific ``options``."""

    # -- public API ---------------------------------------------------------------------

    async def put_stream(
        self, key: str, chunks: AsyncIterable[bytes], *, part_size: int = DEFAULT_PART_SIZE
    ) -> BlobInfo:
        """Store the bytes of ``chunks`` under ``key`` while they arrive; return the new blob's info.

        Memory stays bounded by a few ``part_size`` whatever the blob size: S3 sends a
        multipart upload (every part at least ``part_size``, which must be at least 5 MiB,
        except the last), GCS a resumable upload in ``part_size`` requests, the file
        backend a temporary file. The blob appears whole, atomically, when the stream
        ends, replacing any blob with the same key; if ``chunks`` raises, the exception
        propagates unchanged and nothing is stored.
        """
        self._validate_key(check_key(key))
        check_part_size(part_size)
        self._check_open("put", key)
        return await self._put_stream(key, ChunkReader(chunks), part_size)

    def get_stream(
        self, key: str, *, start: int = 0, end: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> AsyncIterator[bytes]:
        """Yield the bytes ``[start:end)`` of the blob in chunks of at most ``chunk_size``.

        The range follows Python slicing of non-negative indexes: ``end`` defaults to the
        blob size and is clipped to it, and a range starting at or past the end is empty.
        :class:`BlobNotFound` is raised by the first iteration when the blob is missing.
        """
        self._validate_key(check_key(key))
        for name, value in (("start", start), ("end", 0 if end is None else end), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if start < 0 or (end is not None and end < 0):
            raise ValueError(f"start and end must not be negative (got start={start}, end={end})")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self._check_open("get", key)
        return self._get_stream(key, start, end, chunk_size)

    async def stat(self, key: str) -> BlobInfo:
        """Size and creation time of the blob; :class:`BlobNotFound` when missing."""
        self._validate_key(check_key(key))
        self._check_open("stat", key)
        return await self._stat(key)

    async def exists(self, key: str) -> bool:
        self._validate_key(check_key(key))
        self._check_open("exists", key)
        try:
            await self._stat(key)
        except BlobNotFound:
            return False
        return True

    async def delete(self, key: str) -> None:
        """Delete the blob; deleting a missing blob is not an error (deletes may race the sweep)."""
        self._validate_key(check_key(key))
        self._check_open("delete", key)
        await self._delete(key)

    async def list(self, prefix: str = "") -> list[BlobInfo]:
        """Every blob whose key starts with ``prefix`` (a plain string prefix), sorted by key."""
        check_prefix(prefix)
        self._check_open("list", prefix)
        return sorted(await self._list(prefix), key=lambda info: info.key)

    #: Whether ``presign_put(..., content_length=N)`` binds the URL to that length (the store refuses
    #: another body). Backends that cannot keep False and sign an unbounded URL.
    bounds_uploads: bool = False

    async def presign_put(self, key: str, expires_s: float, *, content_length: int | None = None) -> str:
        """A URL that lets its holder upload this one blob, valid for ``expires_s`` seconds.

        With ``content_length`` (and ``bounds_uploads``), the URL is signed for a body of exactly
        that many bytes: the store refuses any other upload with it.
        """
        self._validate_key(check_key(key))
        seconds = check_expiry(expires_s)
        self._check_open("presign PUT", key)
        if content_length is not None:
            if content_length < 0:
                raise ValueError(f"content_length must not be negative, got {content_length}")
            if self.bounds_uploads:
                return await self._presign_put_length(key, seconds, content_length)
        return await self._presign("PUT", key, seconds)

    async def presign_get(self, key: str, expires_s: float) -> str:
        """A URL that lets its holder download this one blob, valid for ``expires_s`` seconds."""
        self._validate_key(check_key(key))
        seconds = check_expiry(expires_s)
        self._check_open("presign GET", key)
        return await self._presign("GET", key, seconds)

    async def abort_incomplete(self, prefix: str, older_than_s: float, *, now: float | None = None) -> int:
        """Discard unfinished uploads under ``prefix`` started over ``older_than_s`` ago.

        Uploads cut short by a crash leave state behind (S3 multipart uploads, which are
        billed; temporary files of the file backend). Returns how many were discarded.
        Backends without such state (GCS resumable sessions expire by themselves) keep
        the default, which does nothing.
        """
        check_prefix(prefix)
        self._check_open("abort incomplete uploads", prefix)
        return await self._abort_incomplete(prefix, older_than_s, now)

    async def put_bytes(self, key: str, data: bytes, *, part_size: int = DEFAULT_PART_SIZE) -> BlobInfo:
        """Store a small blob held in memory."""

        async def one() -> AsyncIterator[bytes]:
            yield data

        return await self.put_stream(key, one(), part_size=part_size)

    async def get_bytes(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        """Read a (range of a) small blob into memory."""
        return b"".join([chunk async for chunk in self.get_stream(key, start=start, end=end)])

    async def close(self) -> None:
        """Release the SDK's connections; idempotent. The store refuses further use."""
        if not self._closed:
            self._closed = True
            await self._close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- helpers for backends -----------------------------------------------------------

    def _validate_key(self, key: str) -> None:  # noqa: B027 - optional hook
        """Backend-specific key rules on top of :func:`check_key`; raise ``ValueError``."""

    def _check_open(self, action: str, key: str | None) -> None:
        if self._closed:
            raise BlobStoreError(f"{action} {key!r} on {self.url} failed: the store is closed", store=self.url, key=key)

    def _error(
        self, action: str, key: str | None, detail: str, cls: type[BlobStoreError] = BlobStoreError
    ) -> BlobStoreError:
        """An error whose message reads ``<action> '<key>' on <store url> failed: <detail>``."""
        target = f" {key!r}" if key is not None else ""
        return cls(f"{action}{target} on {self.url} failed: {detail}", store=self.url, key=key)

    async def _cleanup(self, function: Callable[..., object], /, *args: Any) -> None:
        """Run a blocking cleanup (abort an upload, remove a temporary file) in a worker thread.

        It runs to completion even when the caller is being cancelled, and its own failure
        is logged rather than raised, so that it never hides the error that caused it.
        """
        task = asyncio.ensure_future(asyncio.to_thread(function, *args))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await task
            raise
        except Exception as exc:
            log.warning("%s: cleanup %s failed: %s", self.url, getattr(function, "__name__", function), exc)

    @staticmethod
    async def _run(function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a blocking SDK call in a worker thread.

        A thread cannot be interrupted: when the caller is cancelled, this waits for the
        call to return before letting the cancellation through, so that the cleanup that
        follows (aborting the upload, closing the file) never races a call still running.
        """
        task = asyncio.ensure_future(asyncio.to_thread(function, *args, **kwargs))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # retrieved: the cancellation wins
            raise

    async def _run_or_undo(self, undo: Callable[[T], object], function: Callable[..., T], /, *args: Any) -> T:
        """:meth:`_run` for a call that creates something (an upload, a temporary file).

        If the caller is cancelled while the call runs, the call still completes; then
        ``undo(result)`` runs (in a worker thread) before the cancellation goes through,
        so nothing is left behind that the caller never learnt of.
        """
        task = asyncio.ensure_future(asyncio.to_thread(function, *args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is None:
                await self._cleanup(undo, task.result())
            raise

    # -- hooks that backends implement --------------------------------------------------

    @abc.abstractmethod
    async def _put_stream(self, key: str, reader: ChunkReader, part_size: int) -> BlobInfo: ...

    @abc.abstractmethod
    def _get_stream(self, key: str, start: int, end: int | None, chunk_size: int) -> AsyncIterator[bytes]:
        """An async generator; it raises :class:`BlobNotFound` on its first iteration."""

    @abc.abstractmethod
    async def _stat(self, key: str) -> BlobInfo: ...

    @abc.abstractmethod
    async def _delete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def _list(self, prefix: str) -> builtins.list[BlobInfo]: ...

    @abc.abstractmethod
    async def _presign(self, method: Method, key: str, expires_s: int) -> str: ...

    async def _presign_put_length(self, key: str, expires_s: int, content_length: int) -> str:
        """A PUT URL signed for exactly ``content_length`` bytes (backends with ``bounds_uploads``)."""
        raise NotImplementedError

    async def _abort_incomplete(self, prefix: str, older_than_s: float, now: float | None) -> int:
        return 0

    async def _close(self) -> None:  # noqa: B027 - optional hook
        pass

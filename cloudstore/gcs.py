"""``gs://bucket/prefix``: Google Cloud Storage through google-cloud-storage.

Large puts are resumable uploads sent in ``part_size`` requests; small ones a single
request. Presigned URLs are V4 signed URLs, which need credentials that can sign:
a service account key (``credentials_file`` or ``signing_credentials``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import google.auth.exceptions
import requests
from google.api_core import exceptions as api_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials, Signing
from google.cloud import storage
from google.oauth2 import service_account

try:  # google-cloud-storage >= 3 raises its own media errors
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
except ImportError:  # 2.x raises google-resumable-media's
    from google.resumable_media.common import DataCorruption, InvalidResponse

from cloudstore.base import (
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    ChunkReader,
    Method,
    MiB,
    split_bucket_url,
    utc,
)

__all__ = ["GCSBlobStore"]

_SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
#: Resumable upload requests must be multiples of 256 KiB (except the last).
_UPLOAD_QUANTUM = 256 * 1024
_CONTENT_TYPE = "application/octet-stream"
_SDK_ERRORS: tuple[type[Exception], ...] = (
    api_exceptions.GoogleAPIError,
    google.auth.exceptions.GoogleAuthError,
    requests.RequestException,
    InvalidResponse,
    DataCorruption,
)


class GCSBlobStore(BlobStore):
    """Blobs as objects under ``prefix`` in a GCS bucket.

    Options (``open_store("gs://bucket/prefix", ...)``):

    ``endpoint_url``
        The JSON API endpoint, e.g. an emulator's ``http://127.0.0.1:9023``.
    ``credentials_file``
        A service account key file, used for requests and to sign URLs. Without it,
        Application Default Credentials are used.
    ``credentials``
        A ``google.auth`` credentials object, instead of ``credentials_file``.
    ``anonymous``
        Send requests without credentials (emulators).
    ``signing_credentials``
        Credentials that sign presigned URLs when the request credentials cannot.
    ``presign_endpoint``
        Base URL of presigned URLs; default ``endpoint_url``, else storage.googleapis.com.
    ``project``
        The project (only used for the client; objects are addressed by bucket).
    ``timeout``
        Per-request timeout (s).
    ``download_window``
        Bytes fetched per ranged request by ``get_stream`` (then yielded in chunk_size pieces).
    """

    scheme = "gs"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        credentials_file: str | os.PathLike[str] | None = None,
        credentials: Credentials | None = None,
        anonymous: bool = False,
        signing_credentials: Credentials | None = None,
        presign_endpoint: str | None = None,
        project: str | None = None,
        timeout: float = 60.0,
        download_window: int = 8 * MiB,
    ) -> None:
        self.bucket_name = bucket
        self.prefix = prefix
        super().__init__(f"gs://{bucket}/{prefix}")
        if sum((credentials_file is not None, credentials is not None, anonymous)) > 1:
            raise ValueError("give at most one of credentials_file, credentials and anonymous")
        if download_window < 1:
            raise ValueError(f"download_window must be positive, not {download_window}")
        emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
        if emulator and endpoint_url is None and credentials_file is None and credentials is None:
            # The SDK's emulator convention: anonymous requests to the emulator; URLs signed with the
            # service account key named by GOOGLE_APPLICATION_CREDENTIALS, if any (an emulator accepts
            # any signature, so the key only has to be well formed).
            endpoint_url, anonymous = emulator, True
            key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS", "")
            if signing_credentials is None and key_file:
                try:
                    signing_credentials = service_account.Credentials.from_service_account_file(key_file)
                except (OSError, ValueError) as exc:
                    raise BlobStoreError(f"opening gs://{bucket}/{prefix} failed: {exc}", store=self.url) from exc
        self.endpoint_url = endpoint_url
        self._timeout = timeout
        self._window = download_window
        try:
            if credentials_file is not None:
                credentials = service_account.Credentials.from_service_account_file(
                    os.fspath(credentials_file), scopes=_SCOPES
                )
            elif anonymous:
                credentials = AnonymousCredentials()
            if project is None:
                project = getattr(credentials, "project_id", None) or ("anonymous" if anonymous else None)
            client_options = {"api_endpoint": endpoint_url} if endpoint_url else None
            self._client = storage.Client(project=project, credentials=credentials, client_options=client_options)
        except (OSError, ValueError, google.auth.exceptions.GoogleAuthError) as exc:
            raise BlobStoreError(f"opening {self.url} failed: {exc}", store=self.url) from exc
        self._bucket = self._client.bucket(bucket)
        self._signing_credentials = signing_credentials or credentials
        self._presign_endpoint = presign_endpoint or endpoint_url

    @classmethod
    def from_url(cls, url: str, **options: Any) -> GCSBlobStore:
        bucket, prefix = split_bucket_url(url, "gs")
        return cls(bucket, prefix, **options)

    def _name(self, key: str) -> str:
        return self.prefix + key

    async def _translate(self, action: str, key: str | None, exc: Exception) -> BlobStoreError:
        where = self.endpoint_url or "GCS"
        if isinstance(exc, api_exceptions.NotFound):
            # GCS answers 404 for a missing bucket too: tell them apart with one more request.
            try:
                bucket_exists = await self._run(self._bucket.exists, timeout=self._timeout)
            except _SDK_ERRORS:
                bucket_exists = True
            if not bucket_exists:
                return self._error(action, key, f"bucket {self.bucket_name!r} does not exist at {where}")
            return self._error(action, key, "no such blob", BlobNotFound)
        if isinstance(exc, api_exceptions.Forbidden | api_exceptions.Unauthorized):
            return self._error(action, key, f"access denied ({exc.message}); check the credentials and IAM roles")
        if isinstance(exc, api_exceptions.GoogleAPICallError):
            return self._error(action, key, f"HTTP {exc.code}: {exc.message}")
        if isinstance(exc, google.auth.exceptions.GoogleAuthError):
            return self._error(action, key, f"credentials problem: {exc}")
        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return self._error(action, key, f"cannot reach {where}: {exc}")
        return self._error(action, key, f"{type(exc).__name__}: {exc}")

    async def _call(self, action: str, key: str | None, function: Any, /, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._run(function, *args, **kwargs)
        except _SDK_ERRORS as exc:
            raise await self._translate(action, key, exc) from exc

    # -- put ------------------------------------------------------------------------------

    async def _put_stream(self, key: str, reader: ChunkReader, part_size: int) -> BlobInfo:
        blob = self._bucket.blob(self._name(key))
        batch = await reader.read_at_least(part_size)
        if reader.eof:
            data = b"".join(batch)
            del batch
            await self._call(
                "put", key, blob.upload_from_string, data, content_type=_CONTENT_TYPE, timeout=self._timeout
            )
            del data
        else:
            chunk_size = -(-part_size // _UPLOAD_QUANTUM) * _UPLOAD_QUANTUM
            writer = blob.open("wb", chunk_size=chunk_size, content_type=_CONTENT_TYPE, timeout=self._timeout)
            try:
                while batch:
                    # The writer buffers and sends each full chunk_size; hand it the chunks one
                    # by one so that our list shrinks as its buffer grows.
                    await self._call("put", key, self._feed, writer, batch)
                    batch = await reader.read_at_least(MiB)
                await self._call("put", key, writer.close)
            except BaseException:
                await self._cleanup(self._terminate, writer)
                raise
        if blob.time_created is None or blob.size is None:
            await self._call("put", key, blob.reload, timeout=self._timeout)
        return BlobInfo(key, int(blob.size or 0), utc(blob.time_created))

    @staticmethod
    def _feed(writer: Any, batch: list[bytes]) -> None:
        batch.reverse()
        while batch:
            writer.write(batch.pop())

    def _terminate(self, writer: Any) -> None:
        """Cancel the resumable session, so that nothing of it lingers until it expires (a week).

        ``BlobWriter.terminate()`` (google-cloud-storage 3.x) sends its DELETE to the
        upload's initiation URL rather than to the session URI, which cancels nothing;
        the session URI is what GCS documents for cancelling.

        Called only once no call on the writer is running (see ``BlobStore._run``).
        """
        upload, transport = getattr(writer, "_upload_and_transport", None) or (None, None)
        session_uri = getattr(upload, "resumable_url", None)
        try:
            if session_uri and transport is not None:
                transport.delete(session_uri, timeout=self._timeout)
        finally:
            # The writer must end up closed without close(): io.IOBase.__del__ calls close(),
            # which would send the buffered bytes as the last chunk and commit a truncated blob.
            buffer = getattr(writer, "_buffer", None)
            if buffer is not None:
                buffer.close()
            if not writer.closed:
                writer.terminate()

    # -- get ------------------------------------------------------------------------------

    async def _get_stream(self, key: str, start: int, end: int | None, chunk_size: int) -> AsyncIterator[bytes]:
        blob = await self._call("get", key, self._bucket.get_blob, self._name(key), timeout=self._timeout)
        if blob is None:
            raise await self._translate("get", key, api_exceptions.NotFound("no such object"))
        size = int(blob.size or 0)
        stop = size if end is None else min(end, size)
        # Pin the generation so that an overwrite during the read cannot mix two blobs.
        pinned = self._bucket.blob(self._name(key), generation=blob.generation)
        position = start
        while position < stop:
            count = min(self._window, stop - position)
            data = await self._call(
                "get",
                key,
                pinned.download_as_bytes,
                start=position,
                end=position + count - 1,
                raw_download=True,
                checksum=None,
                timeout=self._timeout,
            )
            if len(data) != count:
                raise self._error("get", key, f"asked for {count} bytes at {position}, got {len(data)}")
            view = memoryview(data)
            for offset in range(0, count, chunk_size):
                yield bytes(view[offset : offset + chunk_size])
            del view, data
            position += count

    # -- metadata -------------------------------------------------------------------------

    async def _stat(self, key: str) -> BlobInfo:
        blob = await self._call("stat", key, self._bucket.get_blob, self._name(key), timeout=self._timeout)
        if blob is None:
            raise await self._translate("stat", key, api_exceptions.NotFound("no such object"))
        return BlobInfo(key, int(blob.size or 0), utc(blob.time_created))

    async def _delete(self, key: str) -> None:
        try:
            await self._run(self._bucket.delete_blob, self._name(key), timeout=self._timeout)
        except api_exceptions.NotFound as exc:
            error = await self._translate("delete", key, exc)
            if not isinstance(error, BlobNotFound):
                raise error from exc
        except _SDK_ERRORS as exc:
            raise await self._translate("delete", key, exc) from exc

    async def _list(self, prefix: str) -> list[BlobInfo]:
        return await self._call("list", prefix, self._list_sync, prefix)

    def _list_sync(self, prefix: str) -> list[BlobInfo]:
        return [
            BlobInfo(blob.name[len(self.prefix) :], int(blob.size or 0), utc(blob.time_created))
            for blob in self._client.list_blobs(self._bucket, prefix=self._name(prefix), timeout=self._timeout)
        ]

    bounds_uploads = True

    async def _presign_put_length(self, key: str, expires_s: int, content_length: int) -> str:
        # Content-Length as a signed header (V4): a body of another length does not match the signature.
        return await self._presign("PUT", key, expires_s, {"Content-Length": str(content_length)})

    async def _presign(self, method: Method, key: str, expires_s: int, headers: dict[str, str] | None = None) -> str:
        signer = self._signing_credentials
        if signer is None or isinstance(signer, AnonymousCredentials) or not isinstance(signer, Signing):
            raise self._error(
                f"presign {method}",
                key,
                "signed URLs need credentials that can sign (a service account key: "
                "the credentials_file or signing_credentials option)",
            )
        blob = self._bucket.blob(self._name(key))
        return await self._call(
            f"presign {method}",
            key,
            blob.generate_signed_url,
            version="v4",
            expiration=timedelta(seconds=expires_s),
            method=method,
            credentials=signer,
            api_access_endpoint=self._presign_endpoint,
            headers=headers,
        )

    async def _close(self) -> None:
        await self._run(self._client.close)

"""``s3://bucket/prefix``: Amazon S3 and S3-compatible stores (MinIO, Ceph RGW...) through boto3.

Credentials come from boto3's usual chain (environment, shared files and profiles,
container and instance roles) unless given as options. Presigned URLs use SigV4.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from cloudstore.base import (
    MAX_PARTS,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    ChunkReader,
    Method,
    split_bucket_url,
    utc,
)

__all__ = ["S3BlobStore"]

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_ACCESS = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}


def _no_such_bucket(exc: ClientError) -> ClientError:
    response = dict(exc.response)
    response["Error"] = {**response.get("Error", {}), "Code": "NoSuchBucket"}
    return ClientError(response, exc.operation_name)


class S3BlobStore(BlobStore):
    """Blobs as objects under ``prefix`` in an S3 bucket.

    Options (``open_store("s3://bucket/prefix", ...)``):

    ``endpoint_url``
        An S3-compatible endpoint (MinIO: ``http://minio:9000``); default AWS.
    ``region``
        The bucket's region (SigV4 signs with it); default from the boto3 chain.
    ``profile``, ``access_key_id``, ``secret_access_key``, ``session_token``
        Explicit credentials; by default the boto3 chain finds them.
    ``addressing_style``
        "path" or "virtual"; default "path" with ``endpoint_url``, else boto3's "auto".
    ``connect_timeout``, ``read_timeout``, ``max_attempts``
        Per-request timeouts (s) and attempts (botocore "standard" retry mode).
    ``config``
        Extra keyword arguments for ``botocore.config.Config``.
    """

    scheme = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        addressing_style: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        super().__init__(f"s3://{bucket}/{prefix}")
        self.endpoint_url = endpoint_url
        style = addressing_style or ("path" if endpoint_url else "auto")
        botocore_config = Config(
            signature_version="s3v4",
            s3={"addressing_style": style},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            **(config or {}),
        )
        try:
            session = boto3.session.Session(
                profile_name=profile,
                region_name=region,
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                aws_session_token=session_token,
            )
            self._client = session.client("s3", endpoint_url=endpoint_url, config=botocore_config)
        except BotoCoreError as exc:
            raise BlobStoreError(f"opening {self.url} failed: {exc}", store=self.url) from exc

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3BlobStore:
        bucket, prefix = split_bucket_url(url, "s3")
        return cls(bucket, prefix, **options)

    def _name(self, key: str) -> str:
        return self.prefix + key

    def _translate(self, action: str, key: str | None, exc: Exception) -> BlobStoreError:
        where = self.endpoint_url or "AWS S3"
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = error.get("Message") or exc.operation_name
            if code == "NoSuchBucket":
                return self._error(action, key, f"bucket {self.bucket!r} does not exist at {where}")
            if code in _NOT_FOUND:
                return self._error(action, key, "no such blob", BlobNotFound)
            if code in _ACCESS:
                return self._error(action, key, f"access denied ({code}: {message}); check the credentials and policy")
            return self._error(action, key, f"{code or 'error'} (HTTP {status}): {message}")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return self._error(
                action,
                key,
                f"no usable AWS credentials ({exc}); boto3 looks at AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE and ~/.aws, then container and instance roles",
            )
        if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
            return self._error(action, key, f"cannot connect to {where}: {exc}")
        if isinstance(exc, ReadTimeoutError):
            return self._error(action, key, f"{where} did not answer in time: {exc}")
        return self._error(action, key, f"{type(exc).__name__}: {exc}")

    async def _call(self, action: str, key: str | None, operation: str, **params: Any) -> Any:
        try:
            return await self._run(getattr(self._client, operation), **params)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(action, key, exc) from exc

    # -- put ------------------------------------------------------------------------------

    async def _put_stream(self, key: str, reader: ChunkReader, part_size: int) -> BlobInfo:
        name = self._name(key)
        batch = await reader.read_at_least(part_size)
        if reader.eof:
            body = b"".join(batch)
            del batch
            await self._call("put", key, "put_object", Bucket=self.bucket, Key=name, Body=body)
            del body
            return await self._stat_after_put(key)

        try:
            created = await self._run_or_undo(
                lambda answer: self._abort(name, answer["UploadId"]), self._create_upload, name
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._translate("put", key, exc) from exc
        upload_id = created["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            while batch:
                number = len(parts) + 1
                if number > MAX_PARTS:
                    raise self._error("put", key, f"more than {MAX_PARTS} parts; use a larger part_size")
                body = b"".join(batch)
                del batch
                answer = await self._call(
                    "put",
                    key,
                    "upload_part",
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                )
                del body
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                batch = await reader.read_at_least(part_size)
            await self._call(
                "put",
                key,
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=name,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            await self._cleanup(self._abort, name, upload_id)
            raise
        return await self._stat_after_put(key)

    def _create_upload(self, name: str) -> dict[str, Any]:
        return self._client.create_multipart_upload(Bucket=self.bucket, Key=name)

    def _abort(self, name: str, upload_id: str) -> None:
        self._client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)

    async def _stat_after_put(self, key: str) -> BlobInfo:
        try:
            return await self._stat(key)
        except BlobNotFound as exc:  # only with a store that is not read-after-write consistent
            raise self._error("put", key, "the blob is missing right after its upload completed") from exc

    # -- get ------------------------------------------------------------------------------

    async def _get_stream(self, key: str, start: int, end: int | None, chunk_size: int) -> AsyncIterator[bytes]:
        if end is not None and end <= start:
            await self._stat(key)  # an empty range of a missing blob is still an error
            return
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._name(key)}
        if start or end is not None:
            params["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            answer = await self._call("get", key, "get_object", **params)
        except BlobStoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") == "InvalidRange":
                return  # the range starts at or past the end: empty, like a slice
            raise
        body = answer["Body"]
        try:
            while True:
                try:
                    chunk = await self._run(body.read, chunk_size)
                except (BotoCoreError, OSError) as exc:
                    raise self._error("get", key, f"reading the body failed: {exc}") from exc
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    # -- metadata -------------------------------------------------------------------------

    async def _stat(self, key: str) -> BlobInfo:
        try:
            answer = await self._call("stat", key, "head_object", Bucket=self.bucket, Key=self._name(key))
        except BlobNotFound:
            # A HEAD answers a bare 404 for a missing bucket too: tell them apart with one more request.
            try:
                await self._run(self._client.head_bucket, Bucket=self.bucket)
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket"):
                    raise self._translate("stat", key, _no_such_bucket(exc)) from exc
            except BotoCoreError:
                pass
            raise
        return BlobInfo(key, int(answer["ContentLength"]), utc(answer["LastModified"]))

    async def _delete(self, key: str) -> None:
        await self._call("delete", key, "delete_object", Bucket=self.bucket, Key=self._name(key))

    async def _list(self, prefix: str) -> list[BlobInfo]:
        try:
            return await self._run(self._list_sync, prefix)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate("list", prefix, exc) from exc

    def _list_sync(self, prefix: str) -> list[BlobInfo]:
        found = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._name(prefix)):
            for item in page.get("Contents", ()):
                found.append(BlobInfo(item["Key"][len(self.prefix) :], int(item["Size"]), utc(item["LastModified"])))
        return found

    bounds_uploads = True

    async def _presign_put_length(self, key: str, expires_s: int, content_length: int) -> str:
        # ContentLength becomes a signed header (SigV4): S3 refuses a body of any other length.
        try:
            return await self._run(
                self._client.generate_presigned_url,
                ClientMethod="put_object",
                Params={"Bucket": self.bucket, "Key": self._name(key), "ContentLength": content_length},
                ExpiresIn=expires_s,
                HttpMethod="PUT",
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._translate("presign PUT", key, exc) from exc

    async def _presign(self, method: Method, key: str, expires_s: int) -> str:
        operation = "put_object" if method == "PUT" else "get_object"
        try:
            return await self._run(
                self._client.generate_presigned_url,
                ClientMethod=operation,
                Params={"Bucket": self.bucket, "Key": self._name(key)},
                ExpiresIn=expires_s,
                HttpMethod=method,
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(f"presign {method}", key, exc) from exc

    async def _abort_incomplete(self, prefix: str, older_than_s: float, now: float | None) -> int:
        cutoff = (datetime.now(UTC) if now is None else datetime.fromtimestamp(now, UTC)) - timedelta(
            seconds=older_than_s
        )
        try:
            return await self._run(self._abort_incomplete_sync, prefix, cutoff)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate("abort incomplete uploads under", prefix, exc) from exc

    def _abort_incomplete_sync(self, prefix: str, cutoff: datetime) -> int:
        aborted = 0
        paginator = self._client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._name(prefix)):
            for upload in page.get("Uploads", ()):
                if utc(upload["Initiated"]) <= cutoff:
                    try:
                        self._abort(upload["Key"], upload["UploadId"])
                    except ClientError as exc:
                        if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":  # finished meanwhile
                            raise
                    else:
                        aborted += 1
        return aborted

    async def _close(self) -> None:
        await self._run(self._client.close)

"""``file:///path``: blobs as files under a directory (the bridge's embedded default).

Puts write a temporary file under ``<root>/.incoming`` and rename it into place, so a
blob appears whole or not at all. Presigned URLs have no HTTP form here: they are
tokens of the form ::

    file+presigned:///<percent-encoded key>?method=PUT&expires=<unix time>&sig=<base64url>

signed with HMAC-SHA256 over the method, the key and the expiry. The bridge will
serve them; :meth:`FileBlobStore.verify_presigned` is what it calls to turn a token
back into a key, refusing expired, forged or altered ones.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac

from cloudstore.base import (
    BlobInfo,
    BlobNotFound,
    BlobStore,
    ChunkReader,
    Method,
    MiB,
    PresignedURLExpired,
    PresignedURLInvalid,
    check_key,
)

__all__ = ["PRESIGNED_SCHEME", "FileBlobStore"]

PRESIGNED_SCHEME = "file+presigned"
#: Directory (under the root) of the temporary files of unfinished puts; not a valid key.
INCOMING = ".incoming"
_SIGNATURE_CONTEXT = b"dicom-relay cloudstore file presign v1"
_WRITE_BATCH = 1 * MiB


def _created(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime, UTC)


class FileBlobStore(BlobStore):
    """Blobs stored as files under ``root``.

    Options (``open_store("file:///srv/spill", ...)``):

    ``signing_key``
        Secret for presigned tokens (bytes, or str taken as UTF-8; at least 16 bytes).
        By default a random key is drawn, so tokens die with the process: a bridge that
        restarts, or several that share the directory, must configure one.
    ``create``
        Create ``root`` if missing (default true).
    ``fsync``
        Flush files and directories to disk before a put returns (default true).
    ``clock``
        Source of Unix time for token expiry (tests).
    """

    scheme = "file"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        signing_key: bytes | str | None = None,
        create: bool = True,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root).absolute()
        super().__init__(self.root.as_uri())
        if signing_key is None:
            signing_key = os.urandom(32)
        elif isinstance(signing_key, str):
            signing_key = signing_key.encode("utf-8")
        if not isinstance(signing_key, bytes) or len(signing_key) < 16:
            raise ValueError("signing_key must be at least 16 bytes")
        self._signing_key = signing_key
        self._fsync = fsync
        self._clock = clock
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise FileNotFoundError(f"file store root {self.root} is not a directory")

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FileBlobStore:
        parts = urlsplit(url)
        if parts.scheme != "file":
            raise ValueError(f"not a file:// URL: {url!r}")
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URL {url!r} names host {parts.netloc!r}; use file:///absolute/path")
        if parts.query or parts.fragment:
            raise ValueError(f"file URL {url!r} must not have a query or fragment; pass options instead")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"file URL {url!r} must hold an absolute path (file:///srv/spill)")
        return cls(path, **options)

    # -- paths ----------------------------------------------------------------------------

    def _validate_key(self, key: str) -> None:
        if key.split("/", 1)[0] == INCOMING:
            raise ValueError(f"key {key!r} uses the reserved directory {INCOMING!r}")

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _os_error(self, action: str, key: str | None, exc: OSError) -> Exception:
        detail = f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else "")
        return self._error(action, key, detail)

    # -- put ------------------------------------------------------------------------------

    async def _put_stream(self, key: str, reader: ChunkReader, part_size: int) -> BlobInfo:
        target = self._path(key)
        try:
            handle, temp = await self._run_or_undo(
                lambda opened: self._discard(*opened), self._open_temp, self.root / INCOMING
            )
        except OSError as exc:
            raise self._os_error("put", key, exc) from exc
        try:
            while not reader.eof:
                batch = await reader.read_at_least(_WRITE_BATCH)
                if batch:
                    try:
                        await self._run(handle.writelines, batch)
                    except OSError as exc:
                        raise self._os_error("put", key, exc) from exc
                del batch
            try:
                st = await self._run(self._commit, handle, temp, target)
            except OSError as exc:
                raise self._os_error("put", key, exc) from exc
        except BaseException:
            await self._cleanup(self._discard, handle, temp)
            raise
        return BlobInfo(key, st.st_size, _created(st))

    @staticmethod
    def _open_temp(incoming: Path) -> tuple[BinaryIO, str]:
        incoming.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=incoming, prefix="put-", suffix=".part")
        return os.fdopen(fd, "wb"), temp

    def _commit(self, handle: BinaryIO, temp: str, target: Path) -> os.stat_result:
        handle.flush()
        if self._fsync:
            os.fsync(handle.fileno())
        handle.close()
        # A concurrent delete may prune the parent directory between mkdir and rename.
        for attempt in range(3):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(temp, target)
                break
            except FileNotFoundError:
                if attempt == 2 or not os.path.exists(temp):
                    raise
        if self._fsync:
            self._fsync_dir(target.parent)
        return target.stat()

    @staticmethod
    def _discard(handle: BinaryIO, temp: str) -> None:
        handle.close()
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- get ------------------------------------------------------------------------------

    async def _get_stream(self, key: str, start: int, end: int | None, chunk_size: int) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await self._run(self._open_read, path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise self._error("get", key, "no such blob", BlobNotFound) from exc
        except OSError as exc:
            raise self._os_error("get", key, exc) from exc
        try:
            size = os.fstat(handle.fileno()).st_size
            stop = size if end is None else min(end, size)
            position = start
            if position < stop:
                await self._run(handle.seek, position)
            while position < stop:
                try:
                    chunk = await self._run(handle.read, min(chunk_size, stop - position))
                except OSError as exc:
                    raise self._os_error("get", key, exc) from exc
                if not chunk:
                    raise self._error("get", key, f"blob shrank while being read (at byte {position} of {stop})")
                position += len(chunk)
                yield chunk
        finally:
            handle.close()

    @staticmethod
    def _open_read(path: Path) -> BinaryIO:
        return open(path, "rb")  # closed by the generator

    # -- metadata -------------------------------------------------------------------------

    async def _stat(self, key: str) -> BlobInfo:
        path = self._path(key)
        try:
            st = await self._run(os.stat, path)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise self._error("stat", key, "no such blob", BlobNotFound) from exc
        except OSError as exc:
            raise self._os_error("stat", key, exc) from exc
        if not stat.S_ISREG(st.st_mode):
            raise self._error("stat", key, "no such blob", BlobNotFound)
        return BlobInfo(key, st.st_size, _created(st))

    async def _delete(self, key: str) -> None:
        try:
            await self._run(self._unlink_and_prune, self._path(key))
        except OSError as exc:
            raise self._os_error("delete", key, exc) from exc

    def _unlink_and_prune(self, path: Path) -> None:
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return  # no such blob (a directory is not one)
        # Remove the directories the blob leaves empty, up to (not including) the root.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    async def _list(self, prefix: str) -> list[BlobInfo]:
        try:
            return await self._run(self._walk, prefix)
        except OSError as exc:
            raise self._os_error("list", prefix, exc) from exc

    def _walk(self, prefix: str) -> list[BlobInfo]:
        # Start from the deepest directory the prefix names, then filter by the full prefix.
        directory = prefix.rpartition("/")[0]
        if directory.split("/", 1)[0] == INCOMING:
            return []
        found: list[BlobInfo] = []
        stack = [(self.root.joinpath(*directory.split("/")) if directory else self.root, directory)]
        while stack:
            path, relative = stack.pop()
            try:
                entries = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                key = f"{relative}/{entry.name}" if relative else entry.name
                if not relative and entry.name == INCOMING:
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if key.startswith(prefix) or prefix.startswith(key + "/"):
                            stack.append((Path(entry.path), key))
                    elif entry.is_file(follow_symlinks=False) and key.startswith(prefix):
                        st = entry.stat(follow_symlinks=False)
                        found.append(BlobInfo(key, st.st_size, _created(st)))
                except FileNotFoundError:
                    continue  # deleted while listing
        return found

    async def _abort_incomplete(self, prefix: str, older_than_s: float, now: float | None) -> int:
        # Temporary files carry no key, so they are swept whatever the prefix.
        cutoff = (time.time() if now is None else now) - older_than_s
        return await self._run(self._remove_stale_temps, cutoff)

    def _remove_stale_temps(self, cutoff: float) -> int:
        removed = 0
        try:
            entries = list(os.scandir(self.root / INCOMING))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime <= cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    # -- presigned tokens -----------------------------------------------------------------

    def _signature(self, method: str, key: str, expires: int, length: str | None = None) -> bytes:
        mac = hmac.HMAC(self._signing_key, hashes.SHA256())
        fields = [_SIGNATURE_CONTEXT, method.encode(), key.encode(), str(expires).encode()]
        if length is not None:
            fields.append(b"length=" + length.encode())
        mac.update(b"\n".join(fields))
        return mac.finalize()

    bounds_uploads = True

    async def _presign(self, method: Method, key: str, expires_s: int, length: int | None = None) -> str:
        expires = int(self._clock()) + expires_s
        length_text = None if length is None else str(length)
        sig = base64.urlsafe_b64encode(self._signature(method, key, expires, length_text)).rstrip(b"=").decode()
        fields: dict[str, object] = {"method": method, "expires": expires}
        if length_text is not None:
            fields["length"] = length_text
        query = urlencode({**fields, "sig": sig})
        return f"{PRESIGNED_SCHEME}:///{quote(key, safe='/')}?{query}"

    async def _presign_put_length(self, key: str, expires_s: int, content_length: int) -> str:
        return await self._presign("PUT", key, expires_s, content_length)

    def verify_presigned_upload(self, url: str, size: int) -> str:
        """The key a presigned PUT token grants, for a body of `size` bytes; a token signed for
        another length is refused like a forged one."""
        key, length = self._verify(url, "PUT")
        if length is not None and size != length:
            raise PresignedURLInvalid(
                f"presigned URL refused by {self.url}: signed for {length} bytes, not {size}", store=self.url
            )
        return key

    def verify_presigned(self, url: str, method: str) -> str:
        """The key a presigned token grants ``method`` on (see `_verify`; a PUT's signed length is
        checked by `verify_presigned_upload`)."""
        return self._verify(url, method)[0]

    def _verify(self, url: str, method: str) -> tuple[str, int | None]:
        """The key a presigned token grants ``method`` ("GET" or "PUT") on.

        Raises :class:`PresignedURLInvalid` for anything malformed, a signature that does
        not match (forged, altered, or signed by another store's key) or a token signed
        for another method, and :class:`PresignedURLExpired` for an authentic token
        past its expiry.
        """

        def invalid(detail: str) -> PresignedURLInvalid:
            return PresignedURLInvalid(f"presigned URL refused by {self.url}: {detail}", store=self.url)

        if not isinstance(url, str):
            raise invalid(f"expected a str, got {type(url).__name__}")
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise invalid(f"unparsable URL ({exc})") from exc
        if parts.scheme != PRESIGNED_SCHEME or parts.netloc or parts.fragment:
            raise invalid(f"not a {PRESIGNED_SCHEME}:/// URL")
        try:
            fields = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError as exc:
            raise invalid(f"malformed query ({exc})") from exc
        if sorted(fields) not in (["expires", "method", "sig"], ["expires", "length", "method", "sig"]) or any(
            len(v) != 1 for v in fields.values()
        ):
            raise invalid("the query must hold method, expires, sig and optionally length, once each")
        length_text = fields["length"][0] if "length" in fields else None
        if length_text is not None and (
            not length_text.isascii() or not length_text.isdigit() or len(length_text) > 15
        ):
            raise invalid("bad length")
        signed_method, expires_text, sig_text = fields["method"][0], fields["expires"][0], fields["sig"][0]
        key = unquote(parts.path[1:]) if parts.path.startswith("/") else ""
        try:
            self._validate_key(check_key(key))
        except ValueError as exc:
            raise invalid(f"bad key ({exc})") from exc
        if not expires_text.isascii() or not expires_text.isdigit() or len(expires_text) > 12:
            raise invalid("bad expiry")
        try:
            signature = base64.urlsafe_b64decode(sig_text + "=" * (-len(sig_text) % 4))
        except (binascii.Error, ValueError) as exc:
            raise invalid("bad signature encoding") from exc
        signed = [_SIGNATURE_CONTEXT, signed_method.encode(), key.encode(), expires_text.encode()]
        if length_text is not None:
            signed.append(b"length=" + length_text.encode())
        mac = hmac.HMAC(self._signing_key, hashes.SHA256())
        mac.update(b"\n".join(signed))
        try:
            mac.verify(signature)
        except InvalidSignature as exc:
            raise invalid(f"signature does not match for key {key!r} (forged or altered)") from exc
        if signed_method != method:
            raise invalid(f"the URL was signed for {signed_method}, not {method}")
        expires = int(expires_text)
        now = self._clock()
        if now >= expires:
            raise PresignedURLExpired(
                f"presigned URL refused by {self.url}: {signed_method} {key!r} expired {now - expires:.0f} s ago",
                store=self.url,
                key=key,
            )
        return key, None if length_text is None else int(length_text)

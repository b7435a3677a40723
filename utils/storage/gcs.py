"""GcsStore: gs://bucket/prefix through google-cloud-storage, imported only when opened.

The GPU machines train from a local store and do not have google-cloud-storage installed, so
nothing here imports it at module level.

Requester-pays buckets bill each request to a project the requester names: with a billing
project, every bucket and object request carries ``userProject`` (the client's own
``Bucket.user_project``, so listings, transfers and deletes all get it); without one GCS
answers 400, which becomes one line naming ``--billing-project``.

Large files move as slices on ``streams`` parallel streams (see ``slices``): an upload sends
each slice as a hidden part object and composes them into the final name, a download reads
ranges in parallel into one pre-allocated file. Every request carries at most CHUNK_BYTES,
and the session's adapter (``gcs_http``) turns the timeouts into no-progress limits, so a
slow link completes and a stalled connection is retried.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from utils.errors import StorageError
from utils.storage.base import (
    ObjectInfo,
    ObjectNotFound,
    ProgressFn,
    RetriesExhausted,
    Store,
    exists_error,
    hint_levels,
    join_key,
    short_error,
    tmp_name,
    verify_file,
    visible,
)
from utils.storage.credentials import load_credentials
from utils.storage.hashing import bytes_crc32c, file_crc32c
from utils.storage.slices import (
    CHUNK_BYTES,
    DEFAULT_STREAMS,
    SliceReader,
    SliceWriter,
    is_part,
    locked,
    part_folder,
    plan_slices,
    preallocate,
    run_parallel,
)

if TYPE_CHECKING:
    from google.api_core.retry import Retry
    from google.cloud.storage import Blob, Client

log = logging.getLogger(__name__)

# GCS composes at most 32 sources per request; more parts compose in rounds.
COMPOSE_LIMIT = 32
# A slice whose bytes arrive corrupted (crc32c checked by the client) is sent this many times.
SLICE_ATTEMPTS = 3
# Removing an upload's parts is best effort (remove_stale_parts catches what is left), so it
# never holds a failing upload back for the whole retry deadline.
CLEANUP_DEADLINE_S = 10.0

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
BILLING_PROJECT_ENV = "HARNESS_BILLING_PROJECT"


class _CountingWriter:
    """File wrapper that reports written bytes to a progress callback."""

    def __init__(self, f: BinaryIO, on_bytes: ProgressFn | None) -> None:
        self._f = f
        self._on_bytes = on_bytes

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()



class GcsStore(Store):
    """gs://bucket/prefix through google-cloud-storage, with explicit retry and timeouts."""

    def __init__(
        self,
        client: Client,
        bucket: str,
        prefix: str = "",
        retry_deadline_s: float = 120.0,
        billing_project: str | None = None,
        streams: int = DEFAULT_STREAMS,
        slots: threading.Semaphore | None = None,
    ) -> None:
        """billing_project: the project billed for every request (requester-pays buckets).

        streams: how many requests a large file's transfer runs at once (1: one stream per
        file, no slicing). slots: the semaphore that bounds the streams of all transfers at
        once, shared with this store's children (one is made when not given).
        """
        from google.cloud.storage.retry import DEFAULT_RETRY

        if streams < 1:
            raise StorageError(f"transfer streams must be at least 1, got {streams}; "
                               "pass --upload-streams 1 or more")
        self._client = client
        self.bucket_name = bucket
        self.prefix = join_key(prefix)
        self._base = f"{self.prefix}/" if self.prefix else ""
        self.url = f"gs://{bucket}/{self.prefix}" if self.prefix else f"gs://{bucket}"
        self.retry_deadline_s = retry_deadline_s
        self.billing_project = billing_project or None
        self.streams = streams
        self._slots = slots or threading.BoundedSemaphore(streams)
        # Requests made through this Bucket and its blobs carry userProject; listings too,
        # as long as they are given the Bucket rather than its name.
        self._bucket = client.bucket(bucket, user_project=self.billing_project)
        # Transient errors (429/5xx, resets, timeouts) back off 0.5 s .. 8 s until the deadline.
        self._retry = DEFAULT_RETRY.with_timeout(retry_deadline_s).with_delay(
            initial=0.5, maximum=8.0, multiplier=2.0
        )
        # (connect, read) per request, never longer than the whole retry budget. Through the
        # session open_gcs builds (gcs_http.StreamingAdapter) both are no-progress limits: 10 s
        # for each 256 KiB block of a body to leave, 60 s between bytes of the answer (which
        # also covers a body's last bytes draining from socket buffers, ~4 MiB at most, at
        # >= ~70 KB/s). So requests of CHUNK_BYTES complete on any link above that rate.
        budget = max(retry_deadline_s, 1.0)
        self._timeout = (min(10.0, budget), min(60.0, budget))

    def child(self, prefix: str) -> GcsStore:
        return GcsStore(self._client, self.bucket_name, join_key(self.prefix, prefix),
                        self.retry_deadline_s, self.billing_project, self.streams, self._slots)

    def _key(self, name: str) -> str:
        return self._base + name.lstrip("/")

    @contextmanager
    def _errors(self, name: str | None = None) -> Iterator[None]:
        """Turn client exceptions into one line that names the bucket and the fix."""
        import requests
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc
        from google.cloud.storage.exceptions import DataCorruption

        where = f"{self.url}/{name}" if name else self.url
        try:
            yield
        except StorageError:
            raise
        except gexc.NotFound as exc:
            if name is None or "bucket does not exist" in str(exc.message).lower():
                raise StorageError(
                    f"gs://{self.bucket_name}: bucket does not exist (404); "
                    "check the --bucket URL (and the project) or create the bucket"
                ) from exc
            raise ObjectNotFound(f"{where} does not exist (404); check the name") from exc
        except gexc.PreconditionFailed as exc:  # only if_absent writes set a precondition
            raise exists_error(self.url, name or "", " (412 precondition failed)") from exc
        except (gexc.Forbidden, gexc.Unauthorized) as exc:
            billing = _billing_error(exc, where, self.billing_project)
            if billing is not None:
                raise billing from exc
            raise StorageError(
                f"gs://{self.bucket_name}: access denied ({exc.code}) for {where}; grant this "
                "identity storage access (objectViewer to read, objectAdmin to write) or pass "
                "--credentials with a key that has it"
            ) from exc
        except gexc.RetryError as exc:
            cause = exc.cause if exc.cause is not None else exc
            raise RetriesExhausted(
                f"{where}: still failing after retrying for {self.retry_deadline_s:g} s "
                f"({short_error(cause)}); check the network or endpoint, or raise the retry "
                f"deadline"
            ) from exc
        except DataCorruption as exc:
            raise StorageError(
                f"{where}: checksum mismatch in transit (data corrupted); run the sync again"
            ) from exc
        except auth_exc.GoogleAuthError as exc:
            raise StorageError(
                f"gs://{self.bucket_name}: authentication failed ({type(exc).__name__}); run "
                "`gcloud auth application-default login` or pass --credentials KEY.json"
            ) from exc
        except gexc.GoogleAPICallError as exc:  # 400s included: never retried
            raise _billing_error(exc, where, self.billing_project) or StorageError(
                f"{where}: request failed ({exc.code} {short_error(exc)}); check the bucket and "
                f"retry"
            ) from exc
        except requests.RequestException as exc:  # not retryable, e.g. a malformed endpoint
            raise StorageError(
                f"{where}: cannot reach the storage endpoint ({short_error(exc)}); check the "
                f"network "
                "and STORAGE_EMULATOR_HOST"
            ) from exc

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        with self._errors():
            blobs = self._client.list_blobs(
                self._bucket,
                prefix=self._key(prefix) or None,
                fields="items(name,size,crc32c,md5Hash),nextPageToken",
                page_size=1000,
                retry=self._retry,
                timeout=self._timeout,
            )
            for blob in blobs:
                rel = blob.name[len(self._base):]
                if rel.endswith("/") or not visible(rel):
                    continue  # folder placeholders and hidden objects
                out.append(ObjectInfo(rel, int(blob.size or 0), blob.crc32c, blob.md5_hash))
        return out

    def exists(self, name: str) -> bool:
        with self._errors(name):
            return bool(
                self._bucket.blob(self._key(name)).exists(retry=self._retry, timeout=self._timeout)
            )

    def upload_file(
        self, local: Path, name: str, *, crc32c: str | None = None, if_absent: bool = False
    ) -> ObjectInfo:
        local = Path(local)
        crc = crc32c or file_crc32c(local)
        size = local.stat().st_size
        slices = plan_slices(size, self.streams)
        with self._errors(name):
            if len(slices) == 1:
                blob = self._bucket.blob(self._key(name))
                # With if_absent, generation 0 means "no live object": GCS answers 412 else.
                self._send(blob, partial(open, local, "rb"), size,
                           if_generation_match=0 if if_absent else None,
                           crc32c_checksum_value=crc)
            else:
                blob = self._upload_sliced(local, name, slices, if_absent)
        if blob.crc32c != crc:
            if len(slices) > 1:  # composed from what was read: not the file the caller hashed
                self.delete(name)
            raise StorageError(
                f"{self.url}/{name}: stored crc32c {blob.crc32c} != local {crc} "
                f"({local} changed while uploading?); upload it again"
            )
        return ObjectInfo(name, int(blob.size or size), blob.crc32c, blob.md5_hash)

    def _send(self, blob: Blob, source: Callable[[], Any], size: int | None,
              **kwargs: Any) -> None:
        """One upload of what ``source()`` opens, at most CHUNK_BYTES per request.

        size None makes it a resumable upload whatever its size (the client checks the
        stored crc32c against the bytes it sent at the end: DataCorruption if they differ).
        A plain Retry (not the conditional default), so uploads are retried too: the same
        bytes to the same name are idempotent for our use. A server that lost the resumable
        session (restart, expiry) answers 404: the upload starts over, once.
        """
        from google.api_core import exceptions as gexc

        blob.chunk_size = CHUNK_BYTES
        for attempt in (1, 2):
            with source() as stream:
                try:
                    blob.upload_from_file(stream, size=size, checksum="crc32c",
                                          retry=self._retry, timeout=self._timeout, **kwargs)
                    return
                except gexc.NotFound as exc:
                    if attempt == 2:
                        raise StorageError(
                            f"gs://{self.bucket_name}: uploading {blob.name} answered 404 "
                            "twice; check that the bucket exists"
                        ) from exc

    def _upload_sliced(self, local: Path, name: str, slices: list[tuple[int, int]],
                       if_absent: bool) -> Blob:
        """Upload each slice as a hidden part in parallel, compose them into ``name``, then
        remove the parts (also when the upload fails; a killed one leaves them to
        remove_stale_parts)."""
        folder = part_folder(self._key(name), secrets.token_hex(4))
        parts = [self._bucket.blob(f"{folder}/{i:05d}") for i in range(len(slices))]
        try:
            run_parallel([partial(self._send_slice, local, part, offset, length)
                          for part, (offset, length) in zip(parts, slices, strict=True)],
                         self.streams, self._slots)
            return self._compose(parts, self._key(name), folder, if_absent)
        finally:
            cleanup = self._retry.with_timeout(min(CLEANUP_DEADLINE_S, self.retry_deadline_s))
            try:
                self._remove_parts(f"{folder}/", cleanup)
            except StorageError as exc:
                log.warning("could not remove the parts of %s/%s (%s); remove_stale_parts "
                            "removes them at the next start", self.url, name, exc)

    def _send_slice(self, local: Path, part: Blob, offset: int, length: int) -> None:
        """One slice as a resumable part; sent again if its bytes arrived corrupted."""
        from google.cloud.storage.exceptions import DataCorruption

        for attempt in range(1, SLICE_ATTEMPTS + 1):
            try:
                self._send(part, partial(SliceReader, local, offset, length), None)
                return
            except DataCorruption:  # the client already deleted the corrupted part
                if attempt == SLICE_ATTEMPTS:
                    raise
                log.warning("%s: bytes %d-%d of %s arrived corrupted (crc32c mismatch); "
                            "sending them again", self.url, offset, offset + length - 1, local)

    def _compose(self, parts: list[Blob], key: str, folder: str, if_absent: bool) -> Blob:
        """Compose parts into ``key``, in rounds of COMPOSE_LIMIT sources (GCS's limit per
        request) through hidden intermediates; only the last compose writes ``key``, with
        generation 0 as its precondition when if_absent."""
        sources, level = parts, 0
        while len(sources) > COMPOSE_LIMIT:
            groups = [sources[i:i + COMPOSE_LIMIT] for i in range(0, len(sources),
                                                                   COMPOSE_LIMIT)]
            sources = [self._bucket.blob(f"{folder}/c{level}-{j:05d}")
                       for j in range(len(groups))]
            run_parallel([partial(target.compose, group, retry=self._retry,
                                  timeout=self._timeout)
                          for target, group in zip(sources, groups, strict=True)],
                         self.streams, self._slots)
            level += 1
        final = self._bucket.blob(key)
        final.compose(sources, if_generation_match=0 if if_absent else None,
                      retry=self._retry, timeout=self._timeout)
        return final

    def remove_stale_parts(self, prefix: str = "") -> int:
        folder = join_key(prefix)  # a folder: "run" must not reach into "run2"
        return self._remove_parts(self._key(f"{folder}/") if folder else self._base, self._retry)

    def _remove_parts(self, key_prefix: str, retry: Retry) -> int:
        """Delete every part object under key_prefix (one listing, deletes in parallel)."""
        with self._errors():
            keys = [blob.name for blob in self._client.list_blobs(
                self._bucket, prefix=key_prefix or None, fields="items(name),nextPageToken",
                page_size=1000, retry=retry, timeout=self._timeout,
            ) if is_part(blob.name[len(self._base):])]
        run_parallel([partial(self._delete_key, key, retry) for key in keys],
                     self.streams, self._slots)
        return len(keys)

    def download_file(
        self,
        name: str,
        local: Path,
        *,
        expected: ObjectInfo | None = None,
        on_bytes: ProgressFn | None = None,
    ) -> None:
        blob = self._bucket.blob(self._key(name))
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(local)
        try:
            with self._errors(name):
                if expected is None:  # its size decides the slicing: ask the object
                    blob.reload(retry=self._retry, timeout=self._timeout)
                    expected = ObjectInfo(name, int(blob.size or 0), blob.crc32c, blob.md5_hash)
                slices = plan_slices(expected.size, self.streams)
                if len(slices) == 1:
                    with open(tmp, "wb") as f:
                        # raw_download: the stored bytes, so hashes match the listing even for
                        # gzip-encoded objects; the client checks the crc32c as it reads.
                        blob.download_to_file(
                            _CountingWriter(f, on_bytes),
                            raw_download=True,
                            checksum="crc32c",
                            retry=self._retry,
                            timeout=self._timeout,
                        )
                else:
                    self._download_sliced(blob, tmp, expected.size, slices, on_bytes)
            verify_file(tmp, expected, f"{self.url}/{name}")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def _download_sliced(self, blob: Blob, tmp: Path, size: int, slices: list[tuple[int, int]],
                         on_bytes: ProgressFn | None) -> None:
        """Ranged reads in parallel, each written in place into one pre-allocated file.

        No per-range checksum (GCS has one for the whole object only): the caller verifies
        the whole file before renaming it into place. Each range gets its own Blob, since a
        download records the response's headers on its blob.
        """
        report = locked(on_bytes)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            preallocate(fd, size)

            def fetch(offset: int, length: int) -> None:
                self._bucket.blob(blob.name, generation=blob.generation).download_to_file(
                    SliceWriter(fd, offset, report), start=offset, end=offset + length - 1,
                    raw_download=True, checksum=None, retry=self._retry, timeout=self._timeout,
                )

            run_parallel([partial(fetch, offset, length) for offset, length in slices],
                         self.streams, self._slots)
        finally:
            os.close(fd)

    def read_bytes(self, name: str) -> bytes:
        with self._errors(name):
            return bytes(
                self._bucket.blob(self._key(name)).download_as_bytes(
                    raw_download=True, checksum="crc32c", retry=self._retry, timeout=self._timeout
                )
            )

    def write_bytes(self, name: str, data: bytes, *, if_absent: bool = False,
                    if_version: str | None = None) -> str:
        blob = self._bucket.blob(self._key(name))
        # A generation precondition: 0 means "no live object", a number "still that
        # generation"; GCS answers 412 otherwise (ObjectExists here).
        match = int(if_version) if if_version is not None else 0 if if_absent else None
        with self._errors(name):
            blob.upload_from_string(
                data,
                checksum="crc32c",
                if_generation_match=match,
                retry=self._retry,
                timeout=self._timeout,
            )
        if blob.crc32c != bytes_crc32c(data):
            raise StorageError(f"{self.url}/{name}: stored crc32c does not match; write it again")
        return str(blob.generation)

    def read_versioned(self, name: str) -> tuple[bytes, str]:
        blob = self._bucket.blob(self._key(name))
        with self._errors(name):
            data = blob.download_as_bytes(raw_download=True, checksum="crc32c",
                                          retry=self._retry, timeout=self._timeout)
        return bytes(data), str(blob.generation)

    def delete(self, name: str) -> None:
        self._delete_key(self._key(name), self._retry)

    def _delete_key(self, key: str, retry: Retry) -> None:
        try:
            with self._errors(key[len(self._base):]):
                self._bucket.blob(key).delete(retry=retry, timeout=self._timeout)
        except ObjectNotFound:
            pass

    def nearby(self, prefix: str, limit: int = 5) -> list[str]:
        for level in hint_levels(self._key(prefix.lstrip("/"))):
            try:
                found = self._one_level(f"{level}/" if level else "", limit)
            except StorageError:
                return []  # only a hint: the caller's own error says what is wrong
            if found:
                return found
        return []

    def _one_level(self, key: str, limit: int) -> list[str]:
        """Folders, then objects, directly under key: one delimiter listing, first page."""
        with self._errors():
            pages = self._client.list_blobs(
                self._bucket, prefix=key or None, delimiter="/", page_size=100,
                retry=self._retry, timeout=self._timeout,
            ).pages
            page = next(pages, None)
            if page is None:
                return []
            objects = [blob.name for blob in page]
            names = sorted(page.prefixes) + objects
        names = [n for n in names if not n[len(key):].startswith(".") and n != key]
        return [f"gs://{self.bucket_name}/{n}" for n in names[:limit]]

    def check_access(self, write: bool = False) -> None:
        with self._errors():
            page = self._client.list_blobs(
                self._bucket,
                prefix=self._base or None,
                max_results=1,
                retry=self._retry,
                timeout=self._timeout,
            )
            list(page)
        if write:
            probe = f".access-check-{secrets.token_hex(6)}"
            self.write_bytes(probe, b"ok")
            self.delete(probe)

    def read_range(self, name: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        with self._errors(name):
            # No checksum: the object's crc32c covers all of it, not this part.
            return bytes(
                self._bucket.blob(self._key(name)).download_as_bytes(
                    start=start, end=start + length - 1, raw_download=True, checksum=None,
                    retry=self._retry, timeout=self._timeout,
                )
            )


def _billing_error(exc: Exception, where: str, project: str | None) -> StorageError | None:
    """One line for GCS's requester-pays answers; None for any other error.

    GCS says (JSON API): 400 "Bucket is [a] requester pays bucket but no user project
    provided." (reason "required"; UserProjectMissing in the XML API), 400 "User project
    specified in the request is invalid.", and 403 "... does not have
    serviceusage.services.use access to the Google Cloud project." when the identity may not
    bill the project it named.
    """
    text = f"{getattr(exc, 'message', '')} {exc}".lower()
    reasons = {str(e.get("reason", "")).lower() for e in getattr(exc, "errors", None) or ()
               if isinstance(e, dict)}
    named = f"billing project {project!r}" if project else "the credentials' quota project"
    if "requester pays" in text or "userprojectmissing" in reasons:
        return StorageError(
            f"{where}: the bucket is requester-pays: pass --billing-project PROJECT (or set "
            f"{BILLING_PROJECT_ENV}) to bill its requests to your project"
        )
    if "user project specified in the request is invalid" in text:
        return StorageError(
            f"{where}: {named} is not a valid project (400); pass an existing project ID "
            f"with --billing-project (or {BILLING_PROJECT_ENV})"
        )
    if "serviceusage.services.use" in text:
        return StorageError(
            f"{where}: this identity may not bill requests to {named} (403, no "
            "serviceusage.services.use); grant it roles/serviceusage.serviceUsageConsumer "
            "there or pass another --billing-project"
        )
    return None


def open_gcs(
    url: str,
    credentials: str | None,
    retry_deadline_s: float,
    billing_project: str | None = None,
    streams: int = DEFAULT_STREAMS,
) -> GcsStore:
    try:
        from google.auth.transport.requests import AuthorizedSession
        from google.cloud import storage

        from utils.storage.gcs_http import StreamingAdapter
    except ImportError as exc:
        raise StorageError(
            f"{url} needs google-cloud-storage, which is not installed; run "
            "`pip install google-cloud-storage==3.17.1` or use a local directory store"
        ) from exc
    bucket, _, prefix = url[len("gs://"):].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise StorageError(
            f"{url}: {bucket!r} is not a valid bucket name; use gs://BUCKET/optional/prefix"
        )
    creds, project = load_credentials(credentials)
    session = AuthorizedSession(creds)
    # Room for many concurrent transfers (every stream of a sliced one, plus the files a sync
    # moves at once) without urllib3 discarding pooled connections.
    adapter = StreamingAdapter(pool_connections=4, pool_maxsize=max(64, 2 * streams))
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    client = storage.Client(project=project, credentials=creds, _http=session)
    # The client fetches each bucket's metadata in the background for OpenTelemetry span
    # attributes we never export: a storage.buckets.get without userProject (GCS refuses it
    # for a requester-pays bucket) that object-only roles may not make either
    # (googleapis/google-cloud-python#17650). Every check of the cache tests it for None.
    if getattr(client, "_bucket_metadata_cache", None) is not None:
        client._bucket_metadata_cache = None
    return GcsStore(client, bucket, prefix, retry_deadline_s, billing_project, streams)

"""One storage interface over GCS and a local directory, plus skip-existing sync.

Training data and checkpoints live either in a GCS bucket (``gs://bucket/prefix``) or, for
users without a bucket, in a plain directory (a path or ``file://``). Both backends answer
the same calls, so the data sync and the checkpoint uploader do not care which one they get.
The GCS client is imported only when a gs:// URL is opened: the GPU machines train from a
local store and do not have google-cloud-storage installed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from tqdm import tqdm

if TYPE_CHECKING:
    from google.cloud.storage import Client

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CREDENTIALS_DIR = REPO_ROOT / "credentials"
CACHE_FILE = ".sync-cache.json"
_CHUNK = 4 * 1024 * 1024
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")

ProgressFn = Callable[[int], None]


class StorageError(Exception):
    """str() is one readable line naming the bucket/path and the fix."""


class ObjectNotFound(StorageError):
    """The named object does not exist (the store itself is reachable)."""


class RetriesExhausted(StorageError):
    """Transient errors outlasted the retry deadline; later transfers would fail the same way."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object: name relative to the store root ('/'-separated), hashes base64 like GCS."""

    name: str
    size: int
    crc32c: str | None
    md5: str | None


# ---------------------------------------------------------------- hashing


def _crc32c_module() -> Any:
    """google_crc32c is a C extension; say how to get it instead of an ImportError trace."""
    try:
        import google_crc32c
    except ImportError as exc:
        raise StorageError(
            "google-crc32c is not installed, so files cannot be verified; "
            "run `pip install google-crc32c==1.9.0`"
        ) from exc
    return google_crc32c


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def file_crc32c(path: Path) -> str:
    """crc32c of a file as GCS reports it: base64 of the big-endian 4 bytes."""
    checksum = _crc32c_module().Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            checksum.update(chunk)
    return _b64(checksum.digest())


def bytes_crc32c(data: bytes) -> str:
    """crc32c of an in-memory object, same encoding as file_crc32c."""
    return _b64(_crc32c_module().Checksum(data).digest())


def file_md5(path: Path) -> str:
    """md5 of a file, base64 like GCS; only used for objects that lack a crc32c."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return _b64(digest.digest())


def _fresh(entry: Any, st: os.stat_result) -> bool:
    """A well-formed cache entry [size, mtime_ns, crc32c, md5] for the file as it is now."""
    return (
        isinstance(entry, list) and len(entry) == 4
        and entry[0] == st.st_size and entry[1] == st.st_mtime_ns
    )


class HashCache:
    """Hashes of the files under a directory, keyed by relative path, size and mtime_ns.

    Re-syncing 10,000 files must cost 10,000 stat calls, not 10,000 file reads. The cache is
    DIR/.sync-cache.json, written atomically; a stale or corrupt cache only costs re-hashing.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / CACHE_FILE
        self.hashed = 0
        self._lock = threading.Lock()
        self._dirty = False
        self._saved_at = float("-inf")
        self._entries: dict[str, list[Any]] | None = None

    def _load(self) -> dict[str, list[Any]]:
        if self._entries is None:
            entries: dict[str, list[Any]] = {}
            try:
                raw = json.loads(self.path.read_text())
                if raw.get("version") == 1 and isinstance(raw.get("files"), dict):
                    entries = raw["files"]
            except (OSError, ValueError, AttributeError):
                pass
            self._entries = entries
        return self._entries

    def lookup(self, rel: str, st: os.stat_result, kind: str = "crc32c") -> str | None:
        """The cached hash if the file still has the size and mtime it had when hashed."""
        with self._lock:
            entry = self._load().get(rel)
        if not _fresh(entry, st):
            return None
        return entry[2] if kind == "crc32c" else entry[3]

    def record(self, rel: str, st: os.stat_result, crc32c: str | None, md5: str | None) -> None:
        """Remember hashes we know to be right (computed, or verified after a transfer)."""
        with self._lock:
            self._load()[rel] = [st.st_size, st.st_mtime_ns, crc32c, md5]
            self._dirty = True

    def get(self, rel: str, path: Path, *, kind: str = "crc32c", force: bool = False) -> str:
        """The file's hash, from the cache unless it changed (or force, for --verify)."""
        st = path.stat()
        if not force:
            known = self.lookup(rel, st, kind)
            if known is not None:
                return known
        value = file_crc32c(path) if kind == "crc32c" else file_md5(path)
        with self._lock:
            self.hashed += 1
            old = self._load().get(rel)
            crc, md5 = (old[2], old[3]) if _fresh(old, st) else (None, None)
        if kind == "crc32c":
            crc = value
        else:
            md5 = value
        self.record(rel, st, crc, md5)
        return value

    def save(self, min_interval_s: float = 0.0) -> None:
        """Write atomically if anything changed; failing to cache must not fail a sync.

        min_interval_s throttles per-file callers; an unsaved entry only costs a re-hash.
        """
        with self._lock:
            if not self._dirty or self._entries is None:
                return
            if time.monotonic() - self._saved_at < min_interval_s:
                return
            self._saved_at = time.monotonic()
            payload = json.dumps({"version": 1, "files": self._entries}, separators=(",", ":"))
            self._dirty = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path, payload.encode())
        except OSError as exc:
            log.warning("could not write hash cache %s (%s); next sync re-hashes", self.path, exc)


# ---------------------------------------------------------------- helpers


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _tmp_name(final: Path) -> Path:
    """Hidden temporary next to the final file, so rename is atomic and listings skip it."""
    return final.parent / f".{final.name}.part-{secrets.token_hex(4)}"


def _visible(rel: str) -> bool:
    """Hidden names (our caches, .part- temporaries, OS junk) are never listed or uploaded."""
    return bool(rel) and not any(part.startswith(".") for part in rel.split("/"))


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def _safe_local_path(root: Path, name: str) -> Path:
    """Map an object name under root; names that would escape it are refused."""
    parts = name.split("/")
    if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        raise StorageError(
            f"object name {name!r} is not a safe relative path; rename it in the bucket"
        )
    return root.joinpath(*parts)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


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


def _verify_file(path: Path, expected: ObjectInfo, where: str) -> None:
    """Check a downloaded temporary against the object's size and hash before it is renamed."""
    size = path.stat().st_size
    if expected.size >= 0 and size != expected.size:
        raise StorageError(
            f"{where}: got {size} bytes, expected {expected.size} (the object changed during "
            "the transfer or the connection was cut); run the sync again"
        )
    if expected.crc32c is not None:
        kind, want, got = "crc32c", expected.crc32c, file_crc32c(path)
    elif expected.md5 is not None:
        kind, want, got = "md5", expected.md5, file_md5(path)
    else:
        return
    if got != want:
        raise StorageError(
            f"{where}: downloaded data has {kind} {got}, expected {want} (the object changed "
            "during the transfer or the data was corrupted); run the sync again"
        )


def _copy_stream(src: BinaryIO, dst: BinaryIO, on_bytes: ProgressFn | None) -> None:
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))


# ---------------------------------------------------------------- the interface


class Store(ABC):
    """A flat namespace of objects under a root URL (a bucket prefix or a directory)."""

    url: str

    @abstractmethod
    def child(self, prefix: str) -> Store:
        """A store rooted at url/prefix (e.g. checkpoints/<run>/<ckpt>/)."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every visible object under prefix, recursively, from one listing (sizes and hashes)."""

    @abstractmethod
    def exists(self, name: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def upload_file(self, local: Path, name: str, *, crc32c: str | None = None) -> ObjectInfo:
        """Upload and verify remote crc32c == local crc32c (pass crc32c if already known)."""

    @abstractmethod
    def download_file(
        self,
        name: str,
        local: Path,
        *,
        expected: ObjectInfo | None = None,
        on_bytes: ProgressFn | None = None,
    ) -> None:
        """Download to a temporary next to local, verify, then rename into place.

        expected (usually from list()) is what the file must match; without it the object's
        own reported hash is used. A mismatch raises StorageError and leaves local untouched.
        """

    @abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """A small object's content; ObjectNotFound if missing."""

    @abstractmethod
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small object (atomically: readers see the old or the new content)."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove one object; a missing object is fine (retried deletes must not fail)."""

    @abstractmethod
    def check_access(self, write: bool = False) -> None:
        """Raise StorageError unless the store exists and is readable (and writable)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


# ---------------------------------------------------------------- local directory


class LocalStore(Store):
    """A directory used as a bucket: the embedded default for users without GCS.

    Its hashes come from a HashCache in the directory, standing in for the metadata GCS keeps.
    """

    def __init__(self, base: Path, prefix: str = "") -> None:
        self.base = Path(base).expanduser().resolve()
        self.prefix = _join(prefix)
        self.root = self.base.joinpath(*self.prefix.split("/")) if self.prefix else self.base
        self.url = str(self.root)
        self._cache = HashCache(self.root)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self.base, _join(self.prefix, prefix))

    def _path(self, name: str) -> Path:
        return _safe_local_path(self.root, name)

    def _require_base(self) -> None:
        if not self.base.is_dir():
            raise StorageError(
                f"local store {self.base} does not exist or is not a directory; "
                "check the --bucket path or create the directory"
            )

    def _info(self, name: str, path: Path) -> ObjectInfo:
        return ObjectInfo(name, path.stat().st_size, self._cache.get(name, path), None)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        self._require_base()
        prefix = prefix.lstrip("/")
        start = self.root
        if "/" in prefix:
            start = _safe_local_path(self.root, prefix.rsplit("/", 1)[0])
        out: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for fname in sorted(filenames):
                rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
                path = Path(dirpath, fname)
                if not _visible(rel) or not rel.startswith(prefix) or not path.is_file():
                    continue
                out.append(self._info(rel, path))
        self._cache.save()
        return out

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def upload_file(self, local: Path, name: str, *, crc32c: str | None = None) -> ObjectInfo:
        local = Path(local)
        crc = crc32c or file_crc32c(local)
        final = self._path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(final)
        try:
            with open(local, "rb") as src, open(tmp, "wb") as dst:
                _copy_stream(src, dst, None)
            got = file_crc32c(tmp)
            if got != crc:
                raise StorageError(
                    f"{self.url}/{name}: stored copy has crc32c {got}, expected {crc} "
                    f"({local} changed while uploading?); upload it again"
                )
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        self._cache.record(name, final.stat(), crc, None)
        self._cache.save(min_interval_s=2.0)
        return ObjectInfo(name, final.stat().st_size, crc, None)

    def download_file(
        self,
        name: str,
        local: Path,
        *,
        expected: ObjectInfo | None = None,
        on_bytes: ProgressFn | None = None,
    ) -> None:
        src = self._path(name)
        if not src.is_file():
            raise ObjectNotFound(f"{self.url}/{name} does not exist; check the name or --prefix")
        if expected is None:
            expected = self._info(name, src)
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(local)
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                _copy_stream(fin, fout, on_bytes)
            _verify_file(tmp, expected, f"{self.url}/{name}")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def read_bytes(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"{self.url}/{name} does not exist; check the name") from exc

    def write_bytes(self, name: str, data: bytes) -> None:
        final = self._path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(final, data)

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def check_access(self, write: bool = False) -> None:
        if write:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(
                    f"local store {self.root} cannot be created ({exc.strerror}); "
                    "choose a writable directory"
                ) from exc
        self._require_base()
        if not os.access(self.base, os.R_OK | os.X_OK):
            raise StorageError(f"local store {self.base} is not readable; fix its permissions")
        if write and not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"local store {self.root} is not writable; fix its permissions")


# ---------------------------------------------------------------- GCS


class GcsStore(Store):
    """gs://bucket/prefix through google-cloud-storage, with explicit retry and timeouts."""

    def __init__(
        self, client: Client, bucket: str, prefix: str = "", retry_deadline_s: float = 120.0
    ) -> None:
        from google.cloud.storage.retry import DEFAULT_RETRY

        self._client = client
        self.bucket_name = bucket
        self.prefix = _join(prefix)
        self._base = f"{self.prefix}/" if self.prefix else ""
        self.url = f"gs://{bucket}/{self.prefix}" if self.prefix else f"gs://{bucket}"
        self.retry_deadline_s = retry_deadline_s
        self._bucket = client.bucket(bucket)
        # Transient errors (429/5xx, resets, timeouts) back off 0.5 s .. 8 s until the deadline.
        self._retry = DEFAULT_RETRY.with_timeout(retry_deadline_s).with_delay(
            initial=0.5, maximum=8.0, multiplier=2.0
        )
        # (connect, read) per request, never longer than the whole retry budget.
        budget = max(retry_deadline_s, 1.0)
        self._timeout = (min(10.0, budget), min(60.0, budget))

    def child(self, prefix: str) -> GcsStore:
        return GcsStore(
            self._client, self.bucket_name, _join(self.prefix, prefix), self.retry_deadline_s
        )

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
        except (gexc.Forbidden, gexc.Unauthorized) as exc:
            raise StorageError(
                f"gs://{self.bucket_name}: access denied ({exc.code}) for {where}; grant this "
                "identity storage access (objectViewer to read, objectAdmin to write) or pass "
                "--credentials with a key that has it"
            ) from exc
        except gexc.RetryError as exc:
            cause = exc.cause if exc.cause is not None else exc
            raise RetriesExhausted(
                f"{where}: still failing after retrying for {self.retry_deadline_s:g} s "
                f"({_short(cause)}); check the network or endpoint, or raise the retry deadline"
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
        except gexc.GoogleAPICallError as exc:
            raise StorageError(
                f"{where}: request failed ({exc.code} {_short(exc)}); check the bucket and retry"
            ) from exc
        except requests.RequestException as exc:  # not retryable, e.g. a malformed endpoint
            raise StorageError(
                f"{where}: cannot reach the storage endpoint ({_short(exc)}); check the network "
                "and STORAGE_EMULATOR_HOST"
            ) from exc

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        with self._errors():
            blobs = self._client.list_blobs(
                self.bucket_name,
                prefix=self._key(prefix) or None,
                fields="items(name,size,crc32c,md5Hash),nextPageToken",
                page_size=1000,
                retry=self._retry,
                timeout=self._timeout,
            )
            for blob in blobs:
                rel = blob.name[len(self._base):]
                if rel.endswith("/") or not _visible(rel):
                    continue  # folder placeholders and hidden objects
                out.append(ObjectInfo(rel, int(blob.size or 0), blob.crc32c, blob.md5_hash))
        return out

    def exists(self, name: str) -> bool:
        with self._errors(name):
            return bool(
                self._bucket.blob(self._key(name)).exists(retry=self._retry, timeout=self._timeout)
            )

    def upload_file(self, local: Path, name: str, *, crc32c: str | None = None) -> ObjectInfo:
        local = Path(local)
        crc = crc32c or file_crc32c(local)
        blob = self._bucket.blob(self._key(name))

        def upload() -> None:
            # A plain Retry (not the conditional default) so uploads are retried too: the
            # same bytes overwrite the same name, which is idempotent for our use.
            blob.upload_from_filename(
                str(local),
                checksum="crc32c",
                crc32c_checksum_value=crc,
                retry=self._retry,
                timeout=self._timeout,
            )

        from google.api_core import exceptions as gexc

        with self._errors(name):
            try:
                upload()
            except gexc.NotFound:
                # The server lost a resumable session (restart, expiry): start over, once.
                try:
                    upload()
                except gexc.NotFound as exc:
                    raise StorageError(
                        f"gs://{self.bucket_name}: uploading {name} answered 404 twice; "
                        "check that the bucket exists"
                    ) from exc
        if blob.crc32c != crc:
            raise StorageError(
                f"{self.url}/{name}: stored crc32c {blob.crc32c} != local {crc} "
                f"({local} changed while uploading?); upload it again"
            )
        return ObjectInfo(name, int(blob.size or local.stat().st_size), blob.crc32c, blob.md5_hash)

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
        tmp = _tmp_name(local)
        try:
            with self._errors(name), open(tmp, "wb") as f:
                # raw_download: the stored bytes, so hashes match the listing even for
                # gzip-encoded objects; the client checks the crc32c header as it reads.
                blob.download_to_file(
                    _CountingWriter(f, on_bytes),
                    raw_download=True,
                    checksum="crc32c",
                    retry=self._retry,
                    timeout=self._timeout,
                )
            if expected is None:
                expected = ObjectInfo(name, -1, blob.crc32c, blob.md5_hash)
            _verify_file(tmp, expected, f"{self.url}/{name}")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def read_bytes(self, name: str) -> bytes:
        with self._errors(name):
            return bytes(
                self._bucket.blob(self._key(name)).download_as_bytes(
                    raw_download=True, checksum="crc32c", retry=self._retry, timeout=self._timeout
                )
            )

    def write_bytes(self, name: str, data: bytes) -> None:
        blob = self._bucket.blob(self._key(name))
        with self._errors(name):
            blob.upload_from_string(
                data, checksum="crc32c", retry=self._retry, timeout=self._timeout
            )
        if blob.crc32c != bytes_crc32c(data):
            raise StorageError(f"{self.url}/{name}: stored crc32c does not match; write it again")

    def delete(self, name: str) -> None:
        try:
            with self._errors(name):
                self._bucket.blob(self._key(name)).delete(retry=self._retry, timeout=self._timeout)
        except ObjectNotFound:
            pass

    def check_access(self, write: bool = False) -> None:
        with self._errors():
            page = self._client.list_blobs(
                self.bucket_name,
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


# ---------------------------------------------------------------- opening a store


def _resolve_key_file(credentials: str, source: str) -> Path:
    """A key path as given, or the name of a file under credentials/ (from the config)."""
    given = Path(credentials).expanduser()
    for candidate in (given, CREDENTIALS_DIR / given):
        if candidate.is_file():
            return candidate.resolve()
    raise StorageError(
        f"credentials file {credentials} (from {source}) not found (also looked in "
        f"{CREDENTIALS_DIR}); "
        "put the service-account key there (chmod 600) or pass its full path"
    )


def _warn_if_shared(key: Path) -> None:
    mode = key.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "credentials file %s is accessible to other users (mode %o); run `chmod 600 %s`",
            key, stat.S_IMODE(mode), key,
        )


def _load_key(key: Path, scopes: list[str]) -> tuple[Any, str | None]:
    """Load a service-account or user key; its contents never reach a message, only its path."""
    from google.auth import exceptions as auth_exc
    from google.oauth2 import credentials as user_credentials
    from google.oauth2 import service_account

    try:
        info = json.loads(key.read_text())
        kind = info.get("type") if isinstance(info, dict) else None
        if kind == "service_account":
            creds = service_account.Credentials.from_service_account_info(info, scopes=scopes)
            return creds, info.get("project_id")
        if kind == "authorized_user":
            creds = user_credentials.Credentials.from_authorized_user_info(info, scopes=scopes)
            return creds, info.get("quota_project_id")
    except (auth_exc.GoogleAuthError, ValueError, KeyError, OSError) as exc:
        raise StorageError(
            f"credentials file {key} is not a usable Google key ({type(exc).__name__}); "
            "download a new JSON key for the service account"
        ) from exc
    raise StorageError(
        f"credentials file {key} is not a service-account or user key (type {kind!r}); "
        "use a service-account JSON key, or Application Default Credentials"
    )


def _load_credentials(credentials: str | None) -> tuple[Any, str | None]:
    """Credentials and project: --credentials key, GOOGLE_APPLICATION_CREDENTIALS, or ADC.

    With STORAGE_EMULATOR_HOST the key is still checked (path, permissions, format) so a
    broken config shows up in tests, but the emulator gets anonymous credentials.
    """
    import google.auth
    from google.auth import exceptions as auth_exc
    from google.auth.credentials import AnonymousCredentials

    scopes = ["https://www.googleapis.com/auth/devstorage.read_write"]
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    emulator_project = os.environ.get("GOOGLE_CLOUD_PROJECT", "test")
    if credentials:
        key = _resolve_key_file(credentials, "--credentials")
        _warn_if_shared(key)
        creds, project = _load_key(key, scopes)
        return (AnonymousCredentials(), emulator_project) if emulator else (creds, project)
    env_key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if env_key:
        _warn_if_shared(_resolve_key_file(env_key, "GOOGLE_APPLICATION_CREDENTIALS"))
    if emulator:
        return AnonymousCredentials(), emulator_project
    try:
        return google.auth.default(scopes=scopes)
    except auth_exc.DefaultCredentialsError as exc:
        raise StorageError(
            "no usable Google credentials (Application Default Credentials failed); run "
            "`gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or "
            "pass --credentials credentials/KEY.json"
        ) from exc


def _open_gcs(url: str, credentials: str | None, retry_deadline_s: float) -> GcsStore:
    try:
        from google.auth.transport.requests import AuthorizedSession
        from google.cloud import storage
        from requests.adapters import HTTPAdapter
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
    creds, project = _load_credentials(credentials)
    session = AuthorizedSession(creds)
    # Room for many concurrent transfers without urllib3 discarding pooled connections.
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=64)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    client = storage.Client(project=project, credentials=creds, _http=session)
    return GcsStore(client, bucket, prefix, retry_deadline_s)


def open_store(url: str, credentials: str | None = None, retry_deadline_s: float = 120.0) -> Store:
    """The store for gs://bucket/prefix, file://path or a plain directory path."""
    url = url.strip()
    if not url:
        raise StorageError("empty storage URL; use gs://BUCKET/prefix or a local directory")
    if url.startswith("gs://"):
        return _open_gcs(url, credentials, retry_deadline_s)
    if url.startswith("file://"):
        path = url[len("file://"):]
        if path.startswith("localhost/"):
            path = path[len("localhost"):]
        return LocalStore(Path(path))
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url):
        raise StorageError(
            f"{url}: unsupported storage URL scheme; use gs://BUCKET/prefix, file://DIR or a path"
        )
    return LocalStore(Path(url))


# ---------------------------------------------------------------- sync


@dataclass
class SyncResult:
    """What a sync did; failed holds 'name: reason' per file that did not make it."""

    transferred: int = 0
    transferred_bytes: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    hashed: int = 0
    dry_run: bool = False

    def summary(self, verb: str) -> str:
        """E.g. 'downloaded 3 (1.2 MB), skipped 10, failed 0'."""
        mb = self.transferred_bytes / 1e6
        line = (
            f"{verb} {self.transferred} ({mb:.1f} MB), "
            f"skipped {self.skipped}, failed {len(self.failed)}"
        )
        return f"dry run: would have {line}" if self.dry_run else line


class _Transfers:
    """Thread pool + tqdm bar (bytes, rate, files) + bookkeeping shared by both syncs.

    Files are planned first (skips and refusals counted without the bar), then start() opens
    the bar with the total bytes of the planned work and the pool runs it.
    """

    def __init__(self, total_files: int, workers: int, progress: bool, desc: str) -> None:
        self.result = SyncResult()
        self._lock = threading.Lock()
        self._abort: str | None = None
        self._workers = max(1, workers)
        self._progress = progress
        self._desc = desc
        self._tasks: list[tuple[str, int, Callable[[], None]]] = []
        self._bar: tqdm[Any] | None = None
        self._total_files = total_files
        self._done = 0

    def plan(self, name: str, size: int, fn: Callable[[], None]) -> None:
        self._tasks.append((name, size, fn))

    def add_bytes(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def skip(self, planned_bytes: int = 0) -> None:
        """A file found up to date; planned_bytes leave the bar's total if it had them."""
        with self._lock:
            self.result.skipped += 1
            self._done += 1
            if self._bar is not None and planned_bytes:
                self._bar.total -= planned_bytes
        self._tick()

    def transferred(self, size: int) -> None:
        with self._lock:
            self.result.transferred += 1
            self.result.transferred_bytes += size
            self._done += 1
        self._tick()

    def fail(self, name: str, reason: str) -> None:
        with self._lock:
            self.result.failed.append(f"{name}: {reason}")
            self._done += 1
        self._tick()

    def _tick(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self._done}/{self._total_files} files", refresh=False)

    def _run(self, name: str, fn: Callable[[], None]) -> None:
        if self._abort is not None:
            self.fail(name, f"not attempted: {self._abort}")
            return
        try:
            fn()
        except RetriesExhausted as exc:
            self._abort = str(exc)  # the endpoint is gone: do not wait out the deadline per file
            self.fail(name, str(exc))
        except StorageError as exc:
            self.fail(name, str(exc))
        except OSError as exc:
            self.fail(name, f"local file error: {exc}")

    def run(self) -> SyncResult:
        """Run the planned tasks; a crash in one task is reported as that file's failure."""
        if self._tasks:
            self._bar = tqdm(
                total=sum(size for _, size, _ in self._tasks), unit="B", unit_scale=True,
                unit_divisor=1024, desc=self._desc, disable=not self._progress,
                dynamic_ncols=True,
            )
            self._tick()
            pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="sync")
            try:
                futures = {pool.submit(self._run, name, fn): name for name, _, fn in self._tasks}
                for fut in as_completed(futures):
                    exc = fut.exception()
                    if exc is not None:
                        self.fail(futures[fut], _short(exc))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                self._bar.close()
        self.result.failed.sort()
        return self.result


def _local_kind(info: ObjectInfo) -> str | None:
    """Which hash decides whether a local copy matches: crc32c, else md5, else none."""
    if info.crc32c is not None:
        return "crc32c"
    return "md5" if info.md5 is not None else None


def sync_down(
    store: Store,
    dest: Path,
    prefix: str = "",
    *,
    max_files: int | None = None,
    workers: int = 8,
    dry_run: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> SyncResult:
    """Mirror store[prefix] into dest, keeping the folder structure; never deletes local files.

    One listing decides everything: a local file whose size and crc32c (md5 if the object has
    no crc32c) match is skipped without a byte transferred; its hash comes from the dest cache
    unless the file changed or verify=True. Everything else downloads to a temporary and is
    renamed into place only after it verifies. Objects without any hash are always fetched.
    """
    dest = Path(dest)
    objects = sorted(store.list(prefix), key=lambda o: o.name)
    if max_files is not None:
        objects = objects[: max(0, max_files)]
    cache = HashCache(dest)
    t = _Transfers(len(objects), workers, progress, "download")
    t.result.dry_run = dry_run

    def download(info: ObjectInfo, local: Path) -> None:
        if not dry_run:
            store.download_file(info.name, local, expected=info, on_bytes=t.add_bytes)
            cache.record(info.name, local.stat(), info.crc32c, info.md5)
        t.transferred(info.size)

    def check_then_download(info: ObjectInfo, local: Path, kind: str) -> None:
        if cache.get(info.name, local, kind=kind, force=verify) == getattr(info, kind):
            t.skip(info.size)
        else:
            download(info, local)

    try:
        for info in objects:
            try:
                local = _safe_local_path(dest, info.name)
                st: os.stat_result | None = local.stat()
            except StorageError as exc:
                t.fail(info.name, str(exc))
                continue
            except FileNotFoundError:
                st = None
            except NotADirectoryError:
                t.fail(info.name, f"a parent folder of {dest / info.name} is a file; move it")
                continue
            if st is not None and not stat.S_ISREG(st.st_mode):
                t.fail(info.name, f"{local} exists and is not a regular file; move it away")
                continue
            kind = _local_kind(info)
            if st is None or st.st_size != info.size or kind is None:
                t.plan(info.name, info.size, lambda i=info, p=local: download(i, p))
            elif not verify and cache.lookup(info.name, st, kind) == getattr(info, kind):
                t.skip()
            else:
                t.plan(
                    info.name, info.size,
                    lambda i=info, p=local, k=kind: check_then_download(i, p, k),
                )
        result = t.run()
    finally:
        if not dry_run:
            cache.save()
    result.hashed = cache.hashed
    return result


def _walk_files(src: Path) -> list[str]:
    """Visible regular files under src as '/'-separated relative names, sorted."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(src).as_posix()
        for fname in filenames:
            rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
            if _visible(rel) and Path(dirpath, fname).is_file():
                out.append(rel)
    return sorted(out)


def sync_up(
    src: Path, store: Store, prefix: str = "", *, workers: int = 8, progress: bool = True
) -> SyncResult:
    """Upload src's tree to store[prefix], skipping objects whose size and crc32c match.

    Used by data prep and the checkpoint uploader: one listing, local hashes cached in
    src/.sync-cache.json, every upload verified; nothing is deleted on either side.
    """
    src = Path(src)
    if not src.is_dir():
        raise StorageError(f"upload source {src} is not a directory; check the path")
    prefix = _join(prefix)
    files = _walk_files(src)
    remote = {o.name: o for o in store.list(f"{prefix}/" if prefix else "")}
    cache = HashCache(src)
    t = _Transfers(len(files), workers, progress, "upload")

    def upload(rel: str, name: str, size: int) -> None:
        path = src / rel
        crc = cache.get(rel, path)
        info = remote.get(name)
        if info is not None and info.size == size and info.crc32c == crc:
            t.skip(size)
            return
        store.upload_file(path, name, crc32c=crc)
        t.add_bytes(size)
        t.transferred(size)

    try:
        for rel in files:
            st = (src / rel).stat()
            size = st.st_size
            name = _join(prefix, rel)
            info = remote.get(name)
            known = cache.lookup(rel, st) if info is not None and info.size == size else None
            if known is not None and known == info.crc32c:
                t.skip()
                continue
            t.plan(rel, size, lambda r=rel, n=name, s=size: upload(r, n, s))
        result = t.run()
    finally:
        cache.save()
    result.hashed = cache.hashed
    return result

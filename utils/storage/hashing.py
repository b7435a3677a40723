"""crc32c/md5 of files and bytes, base64 like GCS, and the per-directory cache of them."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from utils.errors import StorageError
from utils.fs import atomic_write

log = logging.getLogger(__name__)

CACHE_FILE = ".sync-cache.json"
HASH_CHUNK_BYTES = 4 * 1024 * 1024


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
        while chunk := f.read(HASH_CHUNK_BYTES):
            checksum.update(chunk)
    return _b64(checksum.digest())


def bytes_crc32c(data: bytes) -> str:
    """crc32c of an in-memory object, same encoding as file_crc32c."""
    return _b64(_crc32c_module().Checksum(data).digest())


def file_md5(path: Path) -> str:
    """md5 of a file, base64 like GCS; only used for objects that lack a crc32c."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
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
            atomic_write(self.path, payload)
        except OSError as exc:
            log.warning("could not write hash cache %s (%s); next sync re-hashes", self.path, exc)

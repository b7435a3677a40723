"""open_store: the Store for a URL (gs://, file:// or a plain path)."""

from __future__ import annotations

import re
from pathlib import Path

from utils.errors import StorageError
from utils.storage.base import Store
from utils.storage.gcs import _open_gcs
from utils.storage.local import LocalStore


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

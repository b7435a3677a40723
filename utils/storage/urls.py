"""open_store: the Store for a URL (gs://, file:// or a plain path); open_bucket: for a config."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

from utils.errors import StorageError
from utils.storage.base import Store
from utils.storage.gcs import BILLING_PROJECT_ENV, open_gcs
from utils.storage.local import LocalStore
from utils.storage.slices import DEFAULT_STREAMS


class BucketSettings(Protocol):
    """What opens a bucket: ``configs.training_config.BucketSettings``, the section of a run's
    settings the storage layer is handed (a protocol, so storage imports no config)."""

    bucket: str
    credentials: str
    billing_project: str
    upload_streams: int


def open_store(
    url: str,
    credentials: str | None = None,
    retry_deadline_s: float = 120.0,
    billing_project: str | None = None,
    streams: int = DEFAULT_STREAMS,
) -> Store:
    """The store for gs://bucket/prefix, file://path or a plain directory path.

    billing_project names the project billed for a requester-pays bucket's requests (sent as
    userProject on every one); when empty, HARNESS_BILLING_PROJECT is used, and when both
    are empty nothing is sent (the bucket's own project pays). Local stores ignore it.
    streams: how many parallel requests move one large file (GCS: ~200 MiB/s per stream);
    local stores ignore it.
    """
    url = url.strip()
    if not url:
        raise StorageError("empty storage URL; use gs://BUCKET/prefix or a local directory")
    if url.startswith("gs://"):
        billing = billing_project or os.environ.get(BILLING_PROJECT_ENV, "").strip() or None
        return open_gcs(url, credentials, retry_deadline_s, billing, streams)
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


def open_bucket(settings: BucketSettings, retry_deadline_s: float = 120.0) -> Store:
    """The config's bucket, opened with its credentials and billing project.

    One place for what every call site would otherwise repeat, so none forgets the billing
    project of a requester-pays bucket.
    """
    return open_store(
        settings.bucket,
        credentials=settings.credentials or None,
        retry_deadline_s=retry_deadline_s,
        billing_project=settings.billing_project or None,
        streams=settings.upload_streams,
    )

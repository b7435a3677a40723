"""One storage interface over GCS and a local directory, plus skip-existing sync.

Training data and checkpoints live either in a GCS bucket (``gs://bucket/prefix``) or, for
users without a bucket, in a plain directory (a path or ``file://``). Both backends answer
the same calls, so the data sync and the checkpoint uploader do not care which one they get.
The GCS client is imported only when a gs:// URL is opened: the GPU machines train from a
local store and do not have google-cloud-storage installed.

Modules: ``base`` (the Store interface, ObjectInfo, errors), ``hashing`` (crc32c/md5 and the
hash cache), ``local`` and ``gcs`` (the backends), ``slices`` (large files as slices on
parallel streams: the plan, positioned readers and writers, the thread runner), ``gcs_http``
(the session adapter that makes request timeouts no-progress limits), ``credentials`` (Google keys;
check_credentials_value refuses a key's contents where its path belongs), ``urls``
(open_store; open_bucket for a config's bucket, credentials and requester-pays billing project)
and ``sync`` (sync_down/sync_up).
"""

from __future__ import annotations

from utils.errors import StorageError
from utils.storage.base import (
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ProgressFn,
    RetriesExhausted,
    Store,
)
from utils.storage.credentials import check_credentials_value
from utils.storage.gcs import BILLING_PROJECT_ENV, GcsStore
from utils.storage.hashing import CACHE_FILE, HashCache, bytes_crc32c, file_crc32c, file_md5
from utils.storage.local import LocalStore
from utils.storage.sync import SyncResult, sync_down, sync_up
from utils.storage.urls import BucketSettings, open_bucket, open_store

__all__ = [
    "BILLING_PROJECT_ENV",
    "BucketSettings",
    "CACHE_FILE",
    "GcsStore",
    "HashCache",
    "LocalStore",
    "ObjectExists",
    "ObjectInfo",
    "ObjectNotFound",
    "ProgressFn",
    "RetriesExhausted",
    "StorageError",
    "Store",
    "SyncResult",
    "bytes_crc32c",
    "check_credentials_value",
    "file_crc32c",
    "file_md5",
    "open_bucket",
    "open_store",
    "sync_down",
    "sync_up",
]

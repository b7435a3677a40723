"""The Store interface every backend implements, its errors, and helpers shared by backends."""

from __future__ import annotations

import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from utils.errors import StorageError
from utils.storage.hashing import file_crc32c, file_md5

ProgressFn = Callable[[int], None]


class ObjectNotFound(StorageError):
    """The named object does not exist (the store itself is reachable)."""


class ObjectExists(StorageError):
    """A write with if_absent=True found the object already there; nothing was replaced."""


def changed_error(url: str, name: str) -> ObjectExists:
    """The one line for a compare-and-swap write that lost: another writer came first."""
    return ObjectExists(f"{url}/{name} was changed by another writer since it was read; "
                        "read it again before replacing it")


def exists_error(url: str, name: str, detail: str = "") -> ObjectExists:
    """The one line for an if_absent write that lost: which object, and what to do."""
    return ObjectExists(
        f"{url}/{name} already exists{detail} and was not replaced (written only if absent); "
        "write it under a new name, or delete the old object first if it is stale"
    )


class RetriesExhausted(StorageError):
    """Transient errors outlasted the retry deadline; later transfers would fail the same way."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object: name relative to the store root ('/'-separated), hashes base64 like GCS."""

    name: str
    size: int
    crc32c: str | None
    md5: str | None


def tmp_name(final: Path) -> Path:
    """Hidden temporary next to the final file, so rename is atomic and listings skip it."""
    return final.parent / f".{final.name}.part-{secrets.token_hex(4)}"


# What tmp_name (and utils.fs.atomic_write) name their temporaries: .NAME.part-<8 hex>.
TMP_RE = re.compile(r"^\..+\.part-[0-9a-f]{8}$")


def visible(rel: str) -> bool:
    """Hidden names (our caches, .part- temporaries, OS junk) are never listed or uploaded."""
    return bool(rel) and not any(part.startswith(".") for part in rel.split("/"))


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def hint_levels(key: str) -> list[str]:
    """Where to look for what a key that holds nothing was meant to be: its parent, the root."""
    parent = key.rstrip("/").rpartition("/")[0]
    return [parent, ""] if parent else [""]


def safe_local_path(root: Path, name: str) -> Path:
    """Map an object name under root; names that would escape it are refused."""
    parts = name.split("/")
    if any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
        raise StorageError(
            f"object name {name!r} is not a safe relative path; rename it in the bucket"
        )
    return root.joinpath(*parts)


def short_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def verify_file(path: Path, expected: ObjectInfo, where: str) -> None:
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
    def upload_file(
        self, local: Path, name: str, *, crc32c: str | None = None, if_absent: bool = False
    ) -> ObjectInfo:
        """Upload and verify remote crc32c == local crc32c (pass crc32c if already known).

        if_absent: create the object only if no object has that name (a GCS generation
        precondition, so two writers never silently replace each other); ObjectExists if
        one does. Without it an existing object is replaced.
        """

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
    def write_bytes(self, name: str, data: bytes, *, if_absent: bool = False,
                    if_version: str | None = None) -> str:
        """Write a small object (atomically: readers see the old or the new content); returns
        its new version.

        if_absent: as for upload_file, ObjectExists instead of replacing an existing object.
        if_version: replace the object only if it still has this version (from
        ``read_versioned``), else ObjectExists: a compare-and-swap, so of two writers that
        read the same version only one wins (a run lease's renewal and takeover).
        """

    @abstractmethod
    def read_versioned(self, name: str) -> tuple[bytes, str]:
        """A small object's content and its version (GCS: the generation); ObjectNotFound if
        missing."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove one object; a missing object is fine (retried deletes must not fail)."""

    @abstractmethod
    def check_access(self, write: bool = False) -> None:
        """Raise StorageError unless the store exists and is readable (and writable)."""

    def remove_stale_parts(self, prefix: str = "") -> int:
        """Delete what killed uploads left in the folder prefix (hidden, never listed or
        counted, but stored and billed); returns how many objects went.

        Run it at start, before this process uploads there: it cannot tell a part of an
        upload in flight from one a killed process left. This fallback, for stores whose
        writes leave nothing behind (wrappers that do not forward it), removes nothing.
        """
        return 0

    def nearby(self, prefix: str, limit: int = 5) -> list[str]:
        """Up to limit URLs that do exist next to prefix (its parent level, else the root).

        Only a hint for the error about a prefix that holds nothing (a typo such as
        gs://B/trainng), so one cheap listing per level and [] when there is nothing to say.
        """
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def read_range(self, name: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes of an object from byte ``start`` (fewer at its end).

        Streaming reads only a shard's header this way before downloading it. Both backends
        override it with a real ranged read; this fallback (the whole object, sliced) keeps
        wrappers that do not forward it working.
        """
        return self.read_bytes(name)[start:start + max(0, length)]

"""LocalStore: a plain directory used as a bucket, for users without GCS."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from utils.errors import StorageError
from utils.fs import atomic_write
from utils.storage.base import (
    TMP_RE,
    ObjectInfo,
    ObjectNotFound,
    ProgressFn,
    Store,
    changed_error,
    exists_error,
    hint_levels,
    join_key,
    safe_local_path,
    tmp_name,
    verify_file,
    visible,
)
from utils.storage.hashing import HASH_CHUNK_BYTES, HashCache, file_crc32c


def _link_new(tmp: Path, final: Path) -> bool:
    """Publish a finished temporary as final only if final does not exist yet.

    A hard link is atomic and fails if the name is taken, so readers never see a partial
    file and two writers cannot both win; file systems without hard links fall back to an
    O_EXCL create plus copy. False when final already exists.
    """
    try:
        os.link(tmp, final)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    try:
        with open(tmp, "rb") as src, open(final, "xb") as dst:
            _copy_stream(src, dst, None)
            dst.flush()
            os.fsync(dst.fileno())
    except FileExistsError:
        return False
    return True


def _version(path: Path) -> str:
    """A local object's version: every write renames a new file into place, so its inode and
    modification time change (the stand-in for a GCS generation)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return ""
    return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"


def _copy_stream(src: BinaryIO, dst: BinaryIO, on_bytes: ProgressFn | None) -> None:
    while chunk := src.read(HASH_CHUNK_BYTES):
        dst.write(chunk)
        if on_bytes is not None:
            on_bytes(len(chunk))


class LocalStore(Store):
    """A directory used as a bucket: the embedded default for users without GCS.

    Its hashes come from a HashCache in the directory, standing in for the metadata GCS keeps.
    """

    def __init__(self, base: Path, prefix: str = "") -> None:
        self.base = Path(base).expanduser().resolve()
        self.prefix = join_key(prefix)
        self.root = self.base.joinpath(*self.prefix.split("/")) if self.prefix else self.base
        self.url = str(self.root)
        self._cache = HashCache(self.root)

    def child(self, prefix: str) -> LocalStore:
        if join_key(prefix):  # a prefix that climbs out (``..``) would reach another run's data
            safe_local_path(self.root, join_key(prefix))
        return LocalStore(self.base, join_key(self.prefix, prefix))

    def _path(self, name: str) -> Path:
        return safe_local_path(self.root, name)

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
            start = safe_local_path(self.root, prefix.rsplit("/", 1)[0])
        out: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for fname in sorted(filenames):
                rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
                path = Path(dirpath, fname)
                if not visible(rel) or not rel.startswith(prefix) or not path.is_file():
                    continue
                out.append(self._info(rel, path))
        self._cache.save()
        return out

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def upload_file(
        self, local: Path, name: str, *, crc32c: str | None = None, if_absent: bool = False
    ) -> ObjectInfo:
        local = Path(local)
        crc = crc32c or file_crc32c(local)
        final = self._path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(final)
        try:
            with open(local, "rb") as src, open(tmp, "wb") as dst:
                _copy_stream(src, dst, None)
            got = file_crc32c(tmp)
            if got != crc:
                raise StorageError(
                    f"{self.url}/{name}: stored copy has crc32c {got}, expected {crc} "
                    f"({local} changed while uploading?); upload it again"
                )
            if not if_absent:
                os.replace(tmp, final)
            elif not _link_new(tmp, final):
                raise exists_error(self.url, name)
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
        tmp = tmp_name(local)
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                _copy_stream(fin, fout, on_bytes)
            verify_file(tmp, expected, f"{self.url}/{name}")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def read_bytes(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"{self.url}/{name} does not exist; check the name") from exc

    def write_bytes(self, name: str, data: bytes, *, if_absent: bool = False,
                    if_version: str | None = None) -> str:
        final = self._path(name)
        final.parent.mkdir(parents=True, exist_ok=True)
        if if_version is not None:
            with self._locked(final):
                if not final.is_file() or _version(final) != if_version:
                    raise changed_error(self.url, name)
                atomic_write(final, data)
                return _version(final)
        if not if_absent:
            atomic_write(final, data)
            return _version(final)
        tmp = tmp_name(final)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if not _link_new(tmp, final):
                raise exists_error(self.url, name)
        finally:
            tmp.unlink(missing_ok=True)
        return _version(final)

    def read_versioned(self, name: str) -> tuple[bytes, str]:
        path = self._path(name)
        with self._locked(path):
            return self.read_bytes(name), _version(path)

    @staticmethod
    @contextmanager
    def _locked(final: Path) -> Iterator[None]:
        """An exclusive lock beside ``final`` (a hidden file), so a compare-and-swap reads the
        version and replaces the object as one step for every process on this machine."""
        lock = final.parent / f".{final.name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def remove_stale_parts(self, prefix: str = "") -> int:
        """The temporaries of killed writes (``.NAME.part-XXXXXXXX`` next to their target)."""
        removed = 0
        for dirpath, _dirs, files in os.walk(self._path(prefix) if join_key(prefix) else self.root):
            for fname in files:
                if TMP_RE.match(fname):
                    Path(dirpath, fname).unlink(missing_ok=True)
                    removed += 1
        return removed

    def nearby(self, prefix: str, limit: int = 5) -> list[str]:
        key = join_key(self.prefix, prefix.lstrip("/"))
        for level in hint_levels(key):
            try:
                folder = safe_local_path(self.base, level) if level else self.base
                with os.scandir(folder) as it:
                    entries = sorted((e for e in it if not e.name.startswith(".")),
                                     key=lambda e: e.name)
            except (OSError, StorageError):
                continue  # only a hint: an unreadable or unsafe level has nothing to say
            if entries:
                return [f"{e.path}/" if e.is_dir() else e.path for e in entries[:limit]]
        return []

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

    def read_range(self, name: str, start: int, length: int) -> bytes:
        try:
            with open(self._path(name), "rb") as f:
                f.seek(start)
                return f.read(max(0, length))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"{self.url}/{name} does not exist; check the name") from exc

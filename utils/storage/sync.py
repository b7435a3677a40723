"""Skip-existing, verified, parallel sync between a local directory tree and a Store.

A download that fills the disk ends the sync with the disk-full line (StorageError naming the
folder, the room still needed and the room left), never a failure per remaining file.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from utils.errors import StorageError, disk_full, no_space
from utils.storage.base import (
    ObjectInfo,
    RetriesExhausted,
    Store,
    join_key,
    safe_local_path,
    short_error,
    visible,
)
from utils.storage.hashing import HashCache

try:
    import fcntl
except ImportError:  # not POSIX: no lock, so stale temporaries are never removed
    fcntl = None  # type: ignore[assignment]

_EXCLUSIVE = fcntl.LOCK_EX | fcntl.LOCK_NB if fcntl is not None else 1
_SHARED = fcntl.LOCK_SH if fcntl is not None else 0

# A sync holds this (hidden, so never listed or uploaded) for its duration; see _sync_lock.
LOCK_FILE = ".sync-lock"
# What tmp_name and utils.fs.atomic_write name their temporaries: .NAME.part-<8 hex>.
_PART_RE = re.compile(r"^\..+\.part-[0-9a-f]{8}$")


@dataclass
class SyncResult:
    """What a sync did; failed holds 'name: reason' per file that did not make it."""

    transferred: int = 0
    transferred_bytes: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    hashed: int = 0
    dry_run: bool = False
    cleaned: int = 0  # stale temporaries of interrupted syncs removed from the destination
    cleaned_bytes: int = 0

    def summary(self, verb: str) -> str:
        """E.g. 'downloaded 3 (1.2 MB), skipped 10, failed 0[, removed 2 stale ...]'."""
        mb = self.transferred_bytes / 1e6
        line = (
            f"{verb} {self.transferred} ({mb:.1f} MB), "
            f"skipped {self.skipped}, failed {len(self.failed)}"
        )
        if self.cleaned:
            line += (f", removed {self.cleaned} stale temporary file(s) of interrupted syncs "
                     f"({self.cleaned_bytes / 1e6:.1f} MB freed)")
        return f"dry run: would have {line}" if self.dry_run else line


class _Transfers:
    """Thread pool + tqdm bar (bytes, rate, files) + bookkeeping shared by both syncs.

    Files are planned first (skips and refusals counted without the bar), then start() opens
    the bar with the total bytes of the planned work and the pool runs it.
    """

    def __init__(self, total_files: int, workers: int, progress: bool, desc: str,
                 dest: Path | None = None) -> None:
        self.result = SyncResult()
        self.dest = dest  # downloads: the folder a full disk is reported for
        self.no_space = ""  # the disk-full line, once a download filled the disk
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
        except (StorageError, OSError) as exc:
            if self.dest is not None and disk_full(exc):  # no other file fits either
                self.no_space = self._abort = no_space(
                    self.dest, name, self._bytes_left(),
                    "free space or choose a folder on a larger disk, then sync again")
                self.fail(name, self.no_space)
            else:
                self.fail(name, str(exc) if isinstance(exc, StorageError)
                          else f"local file error: {exc}")

    def _bytes_left(self) -> int:
        """Bytes of planned work not yet transferred (what the disk still has to take)."""
        return sum(size for _, size, _ in self._tasks) - self.result.transferred_bytes

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
                        self.fail(futures[fut], short_error(exc))
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


def _no_objects_error(store: Store, prefix: str) -> StorageError:
    """A prefix that holds nothing is almost always a typo: name it and what does exist."""
    url = f"{store.url}/{prefix.lstrip('/')}" if prefix.strip("/") else store.url
    found = store.nearby(prefix)
    hint = f" (found instead: {', '.join(found)})" if found else ""
    return StorageError(
        f"{url}: no objects under this prefix, so there is nothing to download; check the "
        f"bucket URL and prefix for a typo{hint}"
    )


def _stale_parts(dest: Path, started: float) -> list[tuple[Path, int]]:
    """Download temporaries (.NAME.part-XXXXXXXX) under dest last written before started.

    Only that exact pattern, only regular files, never in hidden folders (downloads never
    go there) and never through symlinks; a temporary written since the sync started may
    belong to a concurrent writer.
    """
    found: list[tuple[Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(dest):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fname in filenames:
            if not _PART_RE.match(fname):
                continue
            path = Path(dirpath, fname)
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_mtime < started:
                found.append((path, st.st_size))
    return found


def _remove_stale_parts(dest: Path, started: float, result: SyncResult) -> None:
    """Remove what interrupted syncs left (a SIGTERM mid-download keeps its temporary)."""
    for path, size in _stale_parts(dest, started):
        if not result.dry_run:
            try:
                path.unlink()
            except OSError:
                continue  # gone already, or in use (Windows): the next sync tries again
        result.cleaned += 1
        result.cleaned_bytes += size


def _flock(lock: BinaryIO, mode: int) -> bool:
    """flock, False if another process holds it (or the file system has no locks)."""
    if fcntl is None:
        return mode == _SHARED  # no locks at all: nothing can be shown to be alone
    try:
        fcntl.flock(lock, mode)
        return True
    except OSError:  # BlockingIOError: held elsewhere; ENOLCK: an NFS without a lock daemon
        return False


@contextmanager
def _sync_lock(dest: Path, started: float, result: SyncResult) -> Iterator[None]:
    """Hold dest's lock file shared for the whole sync; remove stale temporaries if alone.

    Another process syncing into the same folder (another node on a shared file system)
    holds it shared too, so the exclusive try fails and its temporaries are left alone.
    """
    if result.dry_run:  # change nothing, not even the lock file: only count
        if dest.is_dir():
            _remove_stale_parts(dest, started, result)
        yield
        return
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create the download folder {dest} ({exc.strerror or type(exc).__name__}); "
            "choose a writable folder"
        ) from exc
    try:
        lock: BinaryIO | None = open(dest / LOCK_FILE, "a+b")  # closed in finally
    except OSError:
        lock = None  # a read-only, complete copy can still be checked: just no clean-up
    try:
        if lock is not None and _flock(lock, _EXCLUSIVE):
            _remove_stale_parts(dest, started, result)
        if lock is not None:
            _flock(lock, _SHARED)
        yield
    finally:
        if lock is not None:
            lock.close()


def _plan_downloads(
    objects: list[ObjectInfo], dest: Path, cache: HashCache, t: _Transfers, verify: bool,
    download: Callable[[ObjectInfo, Path], None],
    check_then_download: Callable[[ObjectInfo, Path, str], None],
) -> None:
    """Decide per object: skip (cache says it matches), hash then decide, download, refuse."""
    for info in objects:
        try:
            local = safe_local_path(dest, info.name)
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
            t.plan(info.name, info.size,
                   lambda i=info, p=local, k=kind: check_then_download(i, p, k))


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
    A prefix with no objects is a StorageError (a typo must not look like a finished sync),
    and so is a full disk (the disk-full line); temporaries that interrupted syncs left in
    dest are removed first.
    """
    started = time.time()
    dest = Path(dest)
    objects = sorted(store.list(prefix), key=lambda o: o.name)
    if not objects:
        raise _no_objects_error(store, prefix)
    if max_files is not None:
        objects = objects[: max(0, max_files)]
    cache = HashCache(dest)
    t = _Transfers(len(objects), workers, progress, "download", dest)
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

    with _sync_lock(dest, started, t.result):
        try:
            _plan_downloads(objects, dest, cache, t, verify, download, check_then_download)
            result = t.run()
        finally:
            if not dry_run:
                cache.save()
    if t.no_space:
        raise StorageError(t.no_space)
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
            if visible(rel) and Path(dirpath, fname).is_file():
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
    prefix = join_key(prefix)
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
            name = join_key(prefix, rel)
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

"""Finishes and uploads checkpoints on a background thread so training does not wait.

Per checkpoint, in order: hash the files and write the local marker (the checkpoint now
counts locally), upload every file that the bucket does not already hold with the same
checksum, list the bucket again to check every file's size and crc32c, then upload the
marker last (it now counts remotely), then prune old checkpoints (locally beyond
``keep_local``, in the bucket beyond ``remote_keep``). Failures are retried with backoff
until ``close`` gives up; a full queue blocks the trainer (logged), never drops work.
A checkpoint that is complete locally but was never uploaded (killed, timed out) is picked
up again by ``catch_up`` at the next start. The upload thread runs at a lower CPU priority
(nice 10, Linux), so it takes idle CPU rather than the training loop's.
"""

from __future__ import annotations

import atexit
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from utils import checkpoint
from utils.errors import StorageError
from utils.storage import Store


@dataclass
class Published:
    """One checkpoint's trip through the publisher (perf_counter times; benches read these)."""

    name: str
    size: int = 0
    sent: int = 0  # bytes uploaded (files the bucket already held are skipped)
    submitted: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    uploaded: bool = False


class CheckpointPublisher:
    """Marks checkpoints complete and uploads them to ``store/remote_prefix/<name>/``."""

    def __init__(self, store: Store | None, remote_prefix: str, *, background: bool = True,
                 keep_local: int = 0, remote_keep: int = 0, queue_size: int = 2,
                 max_backoff_s: float = 30.0, exit_timeout_s: float = 60.0, nice: int = 10,
                 log: Callable[[str], None] = print):
        self.store = store
        self.remote_prefix = remote_prefix.strip("/")
        self.background = background
        self.keep_local = keep_local
        self.remote_keep = remote_keep
        self.max_backoff_s = max_backoff_s
        self.exit_timeout_s = exit_timeout_s
        self.nice = nice
        self.log = log
        self.history: list[Published] = []
        self._queue: queue.Queue[Path | None] = queue.Queue(maxsize=queue_size)
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()  # set by close(): stop retrying, wake a backoff sleep
        self._closed = False
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._worker, name="ckpt-upload", daemon=True)
            self._thread.start()
        # An exception out of the training loop still waits (bounded) for earlier uploads.
        atexit.register(self._at_exit)

    # --------------------------------------------------------------- trainer side
    def submit(self, ckpt_dir: Path) -> None:
        """Hand a written checkpoint over; returns at once unless the queue is full."""
        with self._lock:
            self._pending.add(ckpt_dir.name)
            self.history.append(Published(ckpt_dir.name, submitted=time.perf_counter()))
        if not self.background:
            self._publish(ckpt_dir)
            return
        try:
            self._queue.put_nowait(ckpt_dir)
        except queue.Full:
            self.log(f"upload queue full: waiting for an earlier upload before {ckpt_dir.name}")
            self._queue.put(ckpt_dir)

    def catch_up(self, root: Path) -> str | None:
        """Queue the newest local checkpoint if the bucket lacks it (a kill cut its upload)."""
        if self.store is None:
            return None
        local = checkpoint.find_complete(root)
        try:
            remote = checkpoint.remote_complete(self.store, self.remote_prefix)
        except StorageError as err:
            self.log(f"could not list uploaded checkpoints ({err}); not catching up")
            return None
        if not local or local[-1].name in remote:
            return None
        self.log(f"{local[-1].name} is complete locally but not in the bucket: uploading it")
        self.submit(local[-1])
        return local[-1].name

    @property
    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every submitted checkpoint is published; False if ``timeout`` ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        total = len(self.pending)
        with tqdm(total=total, desc="uploading checkpoints", unit="ckpt",
                  disable=total == 0) as bar:
            while self.pending:
                done = total - len(self.pending)
                if done != bar.n:
                    bar.update(done - bar.n)
                if self._thread is not None and not self._thread.is_alive():
                    self.log(f"the upload thread stopped; not uploaded: {', '.join(self.pending)}")
                    return False
                if deadline is not None and time.monotonic() > deadline:
                    self.log(f"gave up waiting for uploads after {timeout:.0f} s; not uploaded: "
                             f"{', '.join(self.pending)} (complete locally; the next run with "
                             f"the same --output-dir uploads the newest)")
                    return False
                time.sleep(0.05)
            bar.update(total - bar.n)
        return True

    def close(self, timeout: float | None = None) -> bool:
        """Wait (bounded) for pending uploads, then stop the thread; True if all were published."""
        done = self.wait(timeout)
        self._closed = True
        self._stop.set()
        atexit.unregister(self._at_exit)
        if self._thread is not None and done:
            self._queue.put(None)
            self._thread.join(timeout=5)
        return done

    def _at_exit(self) -> None:
        if not self._closed and self.pending:
            self.log(f"exiting: waiting up to {self.exit_timeout_s:.0f} s for checkpoint uploads")
            self.close(self.exit_timeout_s)

    # --------------------------------------------------------------- worker side
    def _worker(self) -> None:
        _lower_priority(self.nice)
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._publish(item)
            except Exception as err:  # noqa: BLE001 - one bad checkpoint must not stop the rest
                self.log(f"publishing {item.name} failed ({err!r})")
                if item.name in self.pending:
                    self._finish(item.name, uploaded=False)

    def _record(self, name: str) -> Published:
        with self._lock:
            return next(r for r in reversed(self.history) if r.name == name)

    def _finish(self, name: str, uploaded: bool) -> None:
        record = self._record(name)
        record.finished, record.uploaded = time.perf_counter(), uploaded
        with self._lock:
            self._pending.discard(name)

    def _publish(self, ckpt_dir: Path) -> None:
        record = self._record(ckpt_dir.name)
        record.started = time.perf_counter()
        try:
            if not (ckpt_dir / checkpoint.MARKER).exists():  # catch_up hands over finished ones
                checkpoint.write_manifest(ckpt_dir)
            record.size = sum(f["size"] for f in checkpoint.read_manifest(ckpt_dir).values())
        except (OSError, checkpoint.CheckpointError) as err:
            self.log(f"could not finish checkpoint {ckpt_dir.name} ({err}); it does not count, "
                     f"the previous complete one still does")
            self._finish(ckpt_dir.name, uploaded=False)
            return
        uploaded = self.store is not None and self._upload_with_retries(ckpt_dir)
        self._finish(ckpt_dir.name, uploaded)
        if uploaded:
            seconds = record.finished - record.started
            self.log(f"uploaded {ckpt_dir.name} ({record.sent / 1e6:.0f} of "
                     f"{record.size / 1e6:.0f} MB sent) in {seconds:.1f} s to "
                     f"{self.store.url}/{self.remote_prefix}")
        if self.store is None or uploaded:  # keep every local copy that the bucket lacks
            self._prune(ckpt_dir.parent, protected=set(self.pending) | {ckpt_dir.name})

    def _prune(self, root: Path, protected: set[str]) -> None:
        try:
            checkpoint.prune(root, self.keep_local, protected=protected)
            if self.store is not None and self.remote_keep > 0:
                checkpoint.prune_remote(self.store, self.remote_prefix, self.remote_keep,
                                        protected=protected)
        except (OSError, StorageError) as err:
            self.log(f"could not prune old checkpoints ({err}); trying again after the next one")

    def _upload_with_retries(self, ckpt_dir: Path) -> bool:
        delay = 1.0
        while True:
            try:
                self._upload(ckpt_dir)
                return True
            except Exception as err:  # noqa: BLE001 - any failure is retried, never fatal
                if not ckpt_dir.is_dir():
                    self.log(f"{ckpt_dir} disappeared before its upload finished; skipping it")
                    return False
                if self._stop.is_set():
                    self.log(f"upload of {ckpt_dir.name} stopped unfinished ({err})")
                    return False
                self.log(f"upload of {ckpt_dir.name} failed ({err}); retrying in {delay:.0f} s")
                if self._stop.wait(delay):
                    return False
                delay = min(delay * 2, self.max_backoff_s)

    def _upload(self, ckpt_dir: Path) -> None:
        """Upload what the bucket lacks, check it all, then the marker."""
        record = self._record(ckpt_dir.name)
        manifest = checkpoint.read_manifest(ckpt_dir)
        marker = (ckpt_dir / checkpoint.MARKER).read_bytes()
        target = self.store.child(f"{self.remote_prefix}/{ckpt_dir.name}")
        remote = {o.name: o for o in target.list()}
        if checkpoint.MARKER in remote:
            if target.read_bytes(checkpoint.MARKER) == marker:
                return  # already published (catch_up after a kill between marker and log)
            # Another checkpoint of the same name (a resumed run redoing this step): it must
            # stop counting before its files are replaced.
            target.delete(checkpoint.MARKER)

        # One file at a time: no thread pool, which would refuse work while Python exits.
        for name, info in manifest.items():
            have = remote.get(name)
            if have is None or have.size != info["size"] or have.crc32c != info["crc32c"]:
                target.upload_file(ckpt_dir / name, name, crc32c=info["crc32c"])
                record.sent += info["size"]
        now = {o.name: o for o in target.list()}
        for name, info in manifest.items():
            have = now.get(name)
            if have is None or have.size != info["size"] or have.crc32c != info["crc32c"]:
                raise StorageError(f"{target.url}/{name} does not match the local file after "
                                   f"upload; uploading the checkpoint again")
        target.write_bytes(checkpoint.MARKER, marker)
        record.sent += len(marker)


def _lower_priority(nice: int) -> None:
    """Make this thread yield the CPU to training: on a busy machine an upload thread at
    normal priority slowed steps ~2x, at nice 10+ by a few percent (bench_checkpoint.py).

    Linux only, where niceness is per thread (elsewhere the call would renice the process).
    """
    if sys.platform != "linux" or nice <= 0:
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        pass  # not allowed here: uploads just compete at normal priority

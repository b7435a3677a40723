"""Marks checkpoints complete and uploads them on background threads; training never waits.

Two threads, so that marking never waits behind an upload:

* **mark** (in submission order): hash the files and write the local marker, then prune old
  local checkpoints. A checkpoint counts locally as soon as this is done, whatever happens to
  its upload. A checkpoint that cannot be marked does not count; the previous one still does.
* **upload**: re-check every file against the marker (a local copy corrupted since is never
  uploaded: ``checkpoint X not uploaded: ...; it stays local``), upload what the bucket lacks,
  list it again to check sizes and crc32c, then the marker last (it now counts remotely), then
  prune the bucket. Failures are retried with exponential backoff, ``max_attempts`` times in
  all; then the checkpoint is given up with one line and the next one goes ahead.

The loop is never made to wait. When uploads fall behind (a slow or refusing bucket), at most
``max_waiting`` checkpoints wait for their turn: a newer one pushes out the oldest waiting one,
which stays local (the bucket keeps receiving the newest state). Retention never deletes a
checkpoint that is still waiting or uploading. A checkpoint that is complete locally but not
in the bucket (killed, timed out, given up) is uploaded again by ``catch_up`` at the next
start. The upload thread runs at a lower CPU priority (nice 10, Linux), so it takes idle CPU
rather than the training loop's.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from configs.training_config import RetentionSettings
from utils import checkpoint
from utils.checkpoint import lineage
from utils.errors import StorageError, first_line
from utils.processes import lower_thread_priority
from utils.storage import ObjectExists, ObjectInfo, Store


@dataclass
class Published:
    """One checkpoint's trip through the publisher (perf_counter times; benches read these)."""

    name: str
    size: int = 0
    sent: int = 0  # bytes uploaded (files the bucket already held are skipped)
    submitted: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    marked: bool = False    # complete locally
    uploaded: bool = False  # complete in the bucket
    reason: str = ""        # why it was not uploaded


class CheckpointPublisher:
    """Marks checkpoints complete and uploads them to ``store/remote_prefix/<name>/``."""

    def __init__(self, store: Store | None, remote_prefix: str, *, background: bool = True,
                 keep_local: int = 0, remote_keep: int = 0, keep_every: int = 0,
                 max_waiting: int = 2,
                 max_attempts: int = 6, max_backoff_s: float = 30.0,
                 exit_timeout_s: float = 60.0, nice: int = 10,
                 log: Callable[[str], None] = print):
        self.store = store
        self.remote_prefix = remote_prefix.strip("/")
        self.background = background
        self.keep_local = keep_local
        self.remote_keep = remote_keep
        self.keep_every = keep_every  # in the bucket, every checkpoint at a multiple stays
        self.max_waiting = max(1, max_waiting)
        self.max_attempts = max(1, max_attempts)
        self.max_backoff_s = max_backoff_s
        self.exit_timeout_s = exit_timeout_s
        self.nice = nice
        self.log = log
        self.history: list[Published] = []
        # Called (on a worker thread) with each checkpoint's record once it is settled.
        self.on_finished: Callable[[Published], None] | None = None
        # Why this run may no longer write to the bucket ('' while it may): the run lease
        # was taken over (``ownership_lost``, the lease's ``lost``), or a checkpoint there
        # belongs to another run id. The loop stops on it; uploads stop at once.
        self.ownership_lost: Callable[[], str] = lambda: ""
        self.conflict = ""
        self._parts_cleaned = False  # parts a killed upload left: removed before the first
        self._lock = threading.Lock()
        self._pending: set[str] = set()     # submitted, not yet finished (marking or uploading)
        self._to_mark: queue.Queue[Path | None] = queue.Queue()
        self._waiting: deque[Path] = deque()  # marked, waiting for the upload thread
        self._wake = threading.Condition(self._lock)
        self._stop = threading.Event()  # set by close(): stop retrying, wake a backoff sleep
        self._closed = False
        self._threads: list[threading.Thread] = []
        if background:
            for name, target in (("ckpt-mark", self._mark_worker),
                                 ("ckpt-upload", self._upload_worker)):
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
        # An exception out of the training loop still waits (bounded) for earlier uploads.
        atexit.register(self._at_exit)

    @classmethod
    def for_run(cls, store: Store | None, remote_prefix: str, retention: RetentionSettings,
                main: bool, log: Callable[[str], None]) -> CheckpointPublisher:
        """The loop's publisher, from the run's retention settings; only the main process
        uploads (elsewhere ``store`` is None and nothing runs in the background)."""
        return cls(store if main else None, remote_prefix,
                   background=retention.background_upload and main,
                   keep_local=retention.save_total_limit, remote_keep=retention.remote_keep,
                   keep_every=retention.keep_every_steps,
                   exit_timeout_s=retention.upload_timeout_s, log=log)

    # --------------------------------------------------------------- trainer side
    def submit(self, ckpt_dir: Path) -> None:
        """Hand a written checkpoint over; returns at once (background) and never blocks."""
        with self._lock:
            self._pending.add(ckpt_dir.name)
            self.history.append(Published(ckpt_dir.name, submitted=time.perf_counter()))
        if self.background:
            self._to_mark.put(ckpt_dir)
            return
        if self._mark(ckpt_dir) and self.store is not None:
            self._publish(ckpt_dir)

    def catch_up(self, root: Path) -> str | None:
        """Queue the head checkpoint if the bucket lacks it (a kill cut its upload), and every
        permanent one (``keep_every``) of its line the bucket lacks; returns the head's name."""
        if self.store is None:
            return None
        local = checkpoint.find_complete(root)
        if not local:  # a fresh start: nothing to catch up, no listing to wait on
            return None
        head = lineage.read_local(root)
        if head is not None:
            local = [p for p in local if p.name in head["lineage"]] or local[-1:]
            newest = root / head["checkpoint"] if (root / head["checkpoint"]) in local \
                else local[-1]
        else:
            newest = local[-1]
        try:
            remote = checkpoint.remote_complete(self.store, self.remote_prefix)
        except StorageError as err:
            self.log(f"could not list uploaded checkpoints ({err}); not catching up")
            return None
        missing = [p for p in local if p.name not in remote and (
            p == newest or checkpoint.permanent(p.name, self.keep_every))]
        for path in missing:
            self.log(f"{path.name} is complete locally but not in the bucket: uploading it")
            self.submit(path)
        return newest.name if newest in missing else None

    @property
    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    @property
    def local_only(self) -> list[tuple[str, str]]:
        """(name, reason) of every checkpoint that was marked but not uploaded (with a bucket)."""
        if self.store is None:
            return []
        with self._lock:
            return [(r.name, r.reason) for r in self.history
                    if r.marked and not r.uploaded and r.name not in self._pending]

    def wait(self, timeout: float | None = None,
             interrupted: Callable[[], bool] = lambda: False,
             after_interrupt_s: float = 0.0) -> bool:
        """Block until every submitted checkpoint is finished; False if time ran out.

        ``interrupted()`` turning true (a SIGTERM during the wait) shortens the wait to
        ``after_interrupt_s`` from then.
        """
        began = time.monotonic()
        deadline = None if timeout is None else began + timeout
        total, cut_short = len(self.pending), False
        with tqdm(total=total, desc="uploading checkpoints", unit="ckpt",
                  disable=total == 0) as bar:
            while self.pending:
                bar.update(total - len(self.pending) - bar.n)
                if not cut_short and interrupted():
                    cut_short, limit = True, time.monotonic() + after_interrupt_s
                    deadline = limit if deadline is None else min(deadline, limit)
                    self.log(f"signal received: waiting at most {after_interrupt_s:.0f} s more "
                             f"for checkpoint uploads")
                if any(not t.is_alive() for t in self._threads):
                    self.log(f"the upload thread stopped; not uploaded: {', '.join(self.pending)}")
                    return False
                if deadline is not None and time.monotonic() > deadline:
                    self.log(f"gave up waiting for uploads after "
                             f"{time.monotonic() - began:.0f} s; not uploaded: "
                             f"{', '.join(self.pending)} (complete locally; the next run with "
                             f"the same --output-dir uploads the newest)")
                    return False
                time.sleep(0.05)
            bar.update(total - bar.n)
        return True

    def close(self, timeout: float | None = None,
              interrupted: Callable[[], bool] = lambda: False,
              after_interrupt_s: float = 0.0) -> bool:
        """Wait (bounded) for pending work, then stop the threads; True if all of it finished."""
        done = self.wait(timeout, interrupted, after_interrupt_s)
        self._closed = True
        self._stop.set()
        atexit.unregister(self._at_exit)
        self._to_mark.put(None)
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout=5 if done else 0.1)
        return done and not self.local_only

    def _at_exit(self) -> None:
        if not self._closed and self.pending:
            self.log(f"exiting: waiting up to {self.exit_timeout_s:.0f} s for checkpoint uploads")
            self.close(self.exit_timeout_s)

    # --------------------------------------------------------------- worker side
    def _record(self, name: str) -> Published:
        with self._lock:
            return next(r for r in reversed(self.history) if r.name == name)

    def _finish(self, name: str, uploaded: bool, reason: str = "") -> None:
        record = self._record(name)
        with self._lock:
            record.finished, record.uploaded, record.reason = time.perf_counter(), uploaded, reason
            self._pending.discard(name)
        if self.on_finished is not None:
            self.on_finished(record)

    def _mark_worker(self) -> None:
        lower_thread_priority(self.nice)  # hashing gigabytes is CPU work training needs
        while (item := self._to_mark.get()) is not None:
            try:
                if self._mark(item) and self.store is not None:
                    self._enqueue_upload(item)
            except Exception as err:  # noqa: BLE001 - one bad checkpoint must not stop the rest
                self.log(f"finishing checkpoint {item.name} failed ({first_line(err)})")
                self._finish(item.name, uploaded=False, reason=first_line(err))
            finally:
                self._to_mark.task_done()
        self._to_mark.task_done()

    def wait_marked(self) -> None:
        """Return once every submitted checkpoint is marked (or failed to be).

        The checkpoint writer calls this before it writes the next one: marking still writes
        to the disk (the manifest), and a next write that filled the disk meanwhile would
        leave the previous checkpoint unmarked, so not resumable."""
        if self._threads and self._threads[0].is_alive():  # not after close()
            self._to_mark.join()

    def _mark(self, ckpt_dir: Path) -> bool:
        """Write the marker (unless catch_up handed over a marked one); prune without a bucket."""
        record = self._record(ckpt_dir.name)
        record.started = time.perf_counter()
        # The head moves before the marker: a kill between the two leaves a head one step
        # ahead of the newest complete checkpoint (--resume latest walks back along its line
        # to it), never a complete checkpoint the head does not name (one checkpoint lost).
        try:
            lineage.move_local(ckpt_dir.parent, lineage.head_of(ckpt_dir))
        except (OSError, ValueError, KeyError) as err:
            self.log(f"could not record {ckpt_dir.name} as the run's head ({first_line(err)})")
        try:
            if not (ckpt_dir / checkpoint.MARKER).exists():
                checkpoint.write_manifest(ckpt_dir)
            record.size = sum(f["size"] for f in checkpoint.read_manifest(ckpt_dir).values())
        except (OSError, checkpoint.CheckpointError) as err:
            self.log(f"could not finish checkpoint {ckpt_dir.name} ({first_line(err)}); it does "
                     f"not count, the previous complete one still does")
            self._finish(ckpt_dir.name, uploaded=False, reason="not complete")
            return False
        record.marked = True
        if self.store is None:
            self._finish(ckpt_dir.name, uploaded=False)
            self._prune(ckpt_dir.parent)
        return True

    def _enqueue_upload(self, ckpt_dir: Path) -> None:
        """Queue for upload; beyond ``max_waiting``, the oldest waiting one stays local (never a
        permanent one, ``keep_every``: the bucket must hold those; nor the newest)."""
        with self._wake:
            self._waiting.append(ckpt_dir)
            dropped = None
            if len(self._waiting) > self.max_waiting:  # the newest always waits its turn
                dropped = next((p for p in list(self._waiting)[:-1]
                                if not checkpoint.permanent(p.name, self.keep_every)), None)
                if dropped is not None:
                    self._waiting.remove(dropped)
            self._wake.notify_all()
        if dropped is not None:
            reason = f"uploads fell behind and {ckpt_dir.name} is newer"
            self.log(f"checkpoint {dropped.name} not uploaded: {reason}; it stays local")
            self._finish(dropped.name, uploaded=False, reason=reason)

    def _upload_worker(self) -> None:
        lower_thread_priority(self.nice)
        while True:
            with self._wake:
                while not self._waiting and not self._stop.is_set():
                    self._wake.wait()
                if not self._waiting:
                    return
                item = self._waiting.popleft()
            try:
                self._publish(item)
            except Exception as err:  # noqa: BLE001 - one bad checkpoint must not stop the rest
                self.log(f"checkpoint {item.name} not uploaded: {first_line(err)}; it stays local")
                self._finish(item.name, uploaded=False, reason=first_line(err))

    def _remove_stale_parts(self) -> None:
        """Before this run's first upload: the hidden slices a killed upload left in the run's
        folder (never counted, but stored and billed). Safe then: the run lease means no
        other process uploads there."""
        if self._parts_cleaned:
            return
        self._parts_cleaned = True
        try:
            removed = self.store.remove_stale_parts(self.remote_prefix)
        except StorageError as err:
            self.log(f"could not remove parts of interrupted uploads ({first_line(err)}); they "
                     f"are never counted, and the next start tries again")
            return
        if removed:
            self.log(f"removed {removed} part(s) of interrupted uploads from "
                     f"{self.store.url}/{self.remote_prefix}")

    def _publish(self, ckpt_dir: Path) -> None:
        """Verify, upload with bounded retries, then prune; one line whatever the outcome."""
        self._remove_stale_parts()
        record = self._record(ckpt_dir.name)
        problem = checkpoint.verify(ckpt_dir, hashes=True)
        if problem:
            reason = f"its local copy is damaged ({problem})"
        else:
            reason = self._upload_with_retries(ckpt_dir)
        if reason:
            self.log(f"checkpoint {ckpt_dir.name} not uploaded: {reason}; it stays local")
            self._finish(ckpt_dir.name, uploaded=False, reason=reason)
        else:
            self._finish(ckpt_dir.name, uploaded=True)
            self.log(f"uploaded {ckpt_dir.name} ({record.sent / 1e6:.0f} of "
                     f"{record.size / 1e6:.0f} MB sent) in {record.finished - record.started:.1f}"
                     f" s to {self.store.url}/{self.remote_prefix}")
        self._prune(ckpt_dir.parent)

    def _move_remote_head(self, ckpt_dir: Path) -> None:
        """The bucket's head follows the line, moved just before the checkpoint's marker there
        (as locally, see ``_mark``): a kill between the two leaves a head a step ahead of the
        bucket's newest complete checkpoint, which a resume walks back from."""
        try:
            lineage.move_remote(self.store, self.remote_prefix, lineage.head_of(ckpt_dir))
        except (OSError, ValueError, KeyError, StorageError) as err:
            self.log(f"could not record {ckpt_dir.name} as the run's head in the bucket "
                     f"({first_line(err)}); --resume latest still finds it by its line")

    def _prune(self, root: Path) -> None:
        """Retention of this line's checkpoints, never touching one still being marked,
        waiting or uploading, nor a local one that is the only copy of its state."""
        protected = set(self.pending)
        head = lineage.read_local(root)
        line = set(head["lineage"]) if head is not None else None
        try:
            uploaded = None
            if self.store is not None:
                if self._stopped_owning():
                    return
                uploaded = set(checkpoint.remote_complete(self.store, self.remote_prefix))
            checkpoint.prune(root, self.keep_local, protected=protected,
                             keep_every=self.keep_every, line=line, uploaded=uploaded)
            if self.store is not None and self.remote_keep > 0:
                checkpoint.prune_remote(self.store, self.remote_prefix, self.remote_keep,
                                        protected=protected, keep_every=self.keep_every,
                                        line=line)
        except (OSError, StorageError) as err:
            self.log(f"could not prune old checkpoints ({err}); trying again after the next one")

    def _stopped_owning(self) -> str:
        """Why this run may not change the bucket any more ('' while it may)."""
        if not self.conflict:
            self.conflict = self.ownership_lost()
        return self.conflict

    def _upload_with_retries(self, ckpt_dir: Path) -> str:
        """'' once uploaded, else why not (after ``max_attempts``, or when closing)."""
        delay = 1.0
        for attempt in range(1, self.max_attempts + 1):
            if self._stopped_owning():
                return self.conflict
            try:
                self._upload(ckpt_dir)
                return ""
            except RunConflict as err:
                self.conflict = str(err)
                return self.conflict
            except Exception as err:  # noqa: BLE001 - any failure is retried, then given up
                if not ckpt_dir.is_dir():
                    return "its folder disappeared before the upload finished"
                if self._stop.is_set():
                    return f"the run ended before the upload did ({first_line(err)})"
                if attempt == self.max_attempts:
                    return f"{self.max_attempts} attempts failed, the last with {first_line(err)}"
                self.log(f"upload of {ckpt_dir.name} failed ({first_line(err)}); attempt "
                         f"{attempt + 1} of {self.max_attempts} in {delay:.0f} s")
                if self._stop.wait(delay):
                    return f"the run ended before the upload did ({first_line(err)})"
                delay = min(delay * 2, self.max_backoff_s)
        return "no attempt made"

    def _upload(self, ckpt_dir: Path) -> None:
        """Upload what the bucket lacks, check it all, then the marker."""
        record = self._record(ckpt_dir.name)
        manifest = checkpoint.read_manifest(ckpt_dir)
        marker = (ckpt_dir / checkpoint.MARKER).read_bytes()
        target = self.store.child(f"{self.remote_prefix}/{ckpt_dir.name}")
        remote = {o.name: o for o in target.list()}
        if checkpoint.MARKER in remote:
            theirs = target.read_bytes(checkpoint.MARKER)
            if theirs == marker:  # already published (catch_up after a kill between the
                self._move_remote_head(ckpt_dir)  # marker and the log line)
                return
            ours, owner = lineage.marker_run_id(marker), lineage.marker_run_id(theirs)
            if owner and owner != ours:
                raise RunConflict(f"{target.url} belongs to another run (run id {owner}, this "
                                  f"run is {ours}); it was left as it is and this run stopped "
                                  f"writing to the bucket: give each run its own --run-name")
            # This run's own earlier checkpoint of that name (a resume redoing the step): it
            # must stop counting before its files are replaced.
            target.delete(checkpoint.MARKER)

        # One file at a time: no thread pool, which would refuse work while Python exits.
        for name, info in manifest.items():
            have = remote.get(name)
            if _same(have, info):
                continue
            if have is not None:  # a stale copy from an earlier attempt at this step
                target.delete(name)
            self._create(target, name, info, lambda n=name, i=info: target.upload_file(
                ckpt_dir / n, n, crc32c=i["crc32c"], if_absent=True))
            record.sent += info["size"]
        now = {o.name: o for o in target.list()}
        for name, info in manifest.items():
            if not _same(now.get(name), info):
                raise StorageError(f"{target.url}/{name} does not match the local file after "
                                   f"upload; uploading the checkpoint again")
        self._move_remote_head(ckpt_dir)
        self._create(target, checkpoint.MARKER, None, lambda: target.write_bytes(
            checkpoint.MARKER, marker, if_absent=True))
        record.sent += len(marker)

    @staticmethod
    def _create(target: Store, name: str, info: dict | None, write: Callable[[], object]) -> None:
        """Write an object only if it is absent (a generation precondition on GCS), so two
        live writers of one checkpoint never silently replace each other's files. Finding our
        own copy there (a client retry whose first attempt had landed) is success."""
        try:
            write()
        except ObjectExists:
            theirs = {o.name: o for o in target.list()}.get(name)
            if info is not None and _same(theirs, info):
                return
            raise StorageError(f"{target.url}/{name} was written by another process while this "
                               f"one uploaded it; two runs are writing the same checkpoint "
                               f"(give each its own --run-name)") from None


class RunConflict(StorageError):
    """The bucket holds another run's checkpoint where this run would write: never retried."""


def _same(have: ObjectInfo | None, info: dict) -> bool:
    """Whether the bucket's object is the manifest's file (size and crc32c)."""
    return have is not None and have.size == info["size"] and have.crc32c == info["crc32c"]

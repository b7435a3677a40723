"""Mirrors a run's TensorBoard event files and metrics.jsonl to the bucket while it trains.

With a bucket (``--bucket gs://B/p`` or a local directory standing in for one), the files of
``OUTPUT_DIR/logs/<run_name>/`` and ``OUTPUT_DIR/metrics.jsonl`` are copied to
``BUCKET/logs/<run_name>/`` every ``--log-upload-minutes`` and once more at the end, so
``tensorboard --logdir gs://B/p/logs`` shows a run while it trains. On Vertex AI, where
``AIP_TENSORBOARD_LOG_DIR`` is set, they go there instead (with or without a bucket).

The work runs on one background thread (at a lower CPU priority, as the checkpoint uploader):
the training step never waits for it. Each pass asks the trackers to flush their event files,
then uploads only the files whose size or modification time changed since their last upload
(a snapshot of the file as it was, so a file growing meanwhile uploads consistently on the
next pass). A failed pass is reported once (one line; a full disk as the disk-full line) and
retried at the next; it never stops training. The thread itself never dies silently: whatever
stops it is reported, and a mirror whose last copy failed or did not finish does not claim
(``copied_to``) that the logs are in the bucket. After a stop request (SIGTERM) no periodic
pass starts and a pass under way stops between files: the preemption budget is the
checkpoint's; the final pass at close gets what it left. Objects in the bucket are only ever
added or replaced, never deleted, so the event files of an earlier attempt at a resumed run
stay next to the new ones.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from utils.errors import StorageError, disk_full, first_line, no_space
from utils.processes import lower_thread_priority
from utils.storage import Store, open_store

AIP_ENV = "AIP_TENSORBOARD_LOG_DIR"
METRICS = "metrics.jsonl"
GOODPUT = "goodput.json"  # utils.loop.goodput's account, kept next to metrics.jsonl
MIN_INTERVAL_S = 1.0  # GCS takes about one write per second to the same object
EXIT_TIMEOUT_S = 10.0  # an abort (exception, sys.exit) still mirrors, this long at most
WAIT_SLICE_S = 1.0  # the thread's waits look at the loop's stop flag this often


def mirror_target(run_name: str, store: Store | None, credentials: str | None = None,
                  environ: dict[str, str] | None = None) -> Store | None:
    """Where the logs go: $AIP_TENSORBOARD_LOG_DIR, else ``logs/<run_name>`` of the bucket,
    else nowhere (None)."""
    aip = (environ if environ is not None else os.environ).get(AIP_ENV, "").strip()
    if aip:
        return open_store(aip, credentials=credentials)
    if store is None:
        return None
    return store.child(f"logs/{run_name}")


class LogMirror:
    """A background thread copying ``log_dir``'s files and ``metrics`` to ``target``."""

    def __init__(self, target: Store, log_dir: Path, metrics: Path, every_s: float,
                 flush: Callable[[], None] = lambda: None,
                 log: Callable[[str], None] = print, nice: int = 10,
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.target = target
        self.log_dir = log_dir
        self.metrics = metrics
        # <= 0: only the final pass (at close).
        self.every_s = max(every_s, MIN_INTERVAL_S) if every_s > 0 else 0.0
        self.flush = flush
        self.log = log
        self.nice = nice
        self.stopping = stopping  # the loop's stop flag (a SIGTERM)
        self.passes = 0        # passes finished (tests and benches read these)
        self.uploaded = 0      # files uploaded, all passes
        self._sent: dict[str, tuple[int, int]] = {}  # remote name -> (size, mtime_ns) uploaded
        self._failing = False  # a failure was reported; stays quiet until a pass succeeds
        self._complete = False  # the final pass ran and copied everything
        self._stop = threading.Event()
        self._scratch = Path(tempfile.mkdtemp(prefix="log-mirror-"))
        self._thread = threading.Thread(target=self._run, name="log-mirror", daemon=True)
        self._closed = False

    def start(self) -> LogMirror:
        """Start the thread (after ``restore_metrics``); an exit without ``close`` (an
        exception out of the loop) still makes the final pass, bounded."""
        self._thread.start()
        atexit.register(self._at_exit)
        return self

    def restore_metrics(self) -> None:
        """A resumed run on a machine without its metrics.jsonl and goodput.json (a replaced
        spot VM) starts from the mirrored copies, so the bucket's are not cut down to the new
        steps and sessions. Called before the metrics writer and the goodput account open
        them; a failure only costs the earlier lines."""
        for local in (self.metrics, self.metrics.with_name(GOODPUT)):
            if local.exists():
                continue
            try:
                if self.target.exists(local.name):
                    self.target.download_file(local.name, local)
                    self.log(f"restored {local.name} of the earlier attempt from "
                             f"{self.target.url}")
            except (StorageError, OSError) as err:
                self.log(f"could not restore {local.name} from {self.target.url} "
                         f"({first_line(err)}); the mirrored copy will hold this attempt's "
                         f"records only")

    def close(self, timeout: float | None = 60.0) -> bool:
        """The final pass, then stop; True when it finished within ``timeout`` and copied
        everything."""
        if self._closed:
            return True
        self._closed = True
        atexit.unregister(self._at_exit)
        self._stop.set()
        if self._thread.ident is None:  # never started: the final pass on this thread
            self._last_pass()
        else:
            self._thread.join(timeout)
        done = not self._thread.is_alive()
        if not done:
            self.log(f"the last copy of the logs to {self.target.url} did not finish within "
                     f"{timeout:.0f} s; they are complete locally in {self.log_dir.parent}")
        return done and self._complete

    @property
    def copied_to(self) -> str:
        """The target's URL once the final pass copied everything ('' otherwise: a failing
        bucket, a final pass cut short, a thread that stopped): what the summary may claim."""
        return self.target.url if self._complete else ""

    def _at_exit(self) -> None:
        self.close(EXIT_TIMEOUT_S)

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            lower_thread_priority(self.nice)
            while not self._wait():
                self.mirror_once()
            self._last_pass()
        except Exception as err:  # noqa: BLE001 - reported; training goes on without copies
            self.log(f"copying the logs to {self.target.url} stopped ({type(err).__name__}: "
                     f"{first_line(err)}); they are complete locally in {self.log_dir.parent}")

    def _wait(self) -> bool:
        """Until the next periodic pass is due (False) or close() was called (True). In
        slices, so that after a stop request no periodic pass starts (any interval, however
        large, is only a number here)."""
        due = time.monotonic() + (self.every_s or math.inf)
        while self.stopping() or time.monotonic() < due:
            left = due - time.monotonic()
            if self._stop.wait(WAIT_SLICE_S if self.stopping() or left > WAIT_SLICE_S else left):
                return True
        return False

    def _last_pass(self) -> None:
        self.mirror_once()
        self._complete = not self._failing
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _files(self) -> list[tuple[Path, str]]:
        """(local file, remote name) of everything to mirror; hidden names are skipped."""
        found = []
        if self.log_dir.is_dir():
            for path in sorted(self.log_dir.rglob("*")):
                rel = path.relative_to(self.log_dir).as_posix()
                if path.is_file() and not any(p.startswith(".") for p in rel.split("/")):
                    found.append((path, rel))
        for local in (self.metrics, self.metrics.with_name(GOODPUT)):
            if local.is_file():
                found.append((local, local.name))
        return found

    def mirror_once(self) -> int:
        """One pass: flush, then upload what changed; the number of files uploaded."""
        try:
            self.flush()
        except Exception:  # noqa: BLE001 - a writer closed meanwhile: its file is complete
            pass
        sent, writing = 0, (self._scratch, "", 0)
        try:
            for path, name in self._files():
                if self.stopping() and not self._stop.is_set():
                    break  # a periodic pass after a stop request: the final one follows
                stat = path.stat()
                signature = (stat.st_size, stat.st_mtime_ns)
                if self._sent.get(name) == signature:
                    continue
                snapshot = self._scratch / "upload"
                writing = (self._scratch, name, stat.st_size)
                with open(path, "rb") as src, open(snapshot, "wb") as dst:
                    shutil.copyfileobj(_Limited(src, stat.st_size), dst)
                writing = (Path(self.target.url), name, stat.st_size)  # a local bucket's disk
                self.target.upload_file(snapshot, name)
                self._sent[name] = signature
                sent += 1
        except Exception as err:  # noqa: BLE001 - never stops training; retried next pass
            if not self._failing:
                self._failing = True
                reason = (no_space(*writing, "free space; copying the logs is retried every "
                                             "pass, training goes on") if disk_full(err) else
                          f"copying the logs to {self.target.url} failed ({first_line(err)}); "
                          f"retrying every pass, training goes on")
                self.log(reason)
        else:
            if self._failing:
                self._failing = False
                self.log(f"copying the logs to {self.target.url} works again")
        self.uploaded += sent
        self.passes += 1
        return sent


class _Limited:
    """The first ``size`` bytes of a file being appended to (what its stat saw)."""

    def __init__(self, f, size: int) -> None:
        self.f, self.left = f, size

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        data = self.f.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(data)
        return data


def start_log_mirror(config, store: Store | None, output_dir: Path, flush: Callable[[], None],
                     log: Callable[[str], None], resumed: bool,
                     stopping: Callable[[], bool] = lambda: False) -> LogMirror | None:
    """The run's mirror (main process only), or None without a bucket or Vertex log folder;
    ``stopping`` is the loop's stop flag."""
    try:
        target = mirror_target(config.run_name, store, config.credentials or None)
    except StorageError as err:
        log(f"not copying the logs to {os.environ.get(AIP_ENV)} ({first_line(err)})")
        return None
    if target is None:
        return None
    mirror = LogMirror(target, output_dir / "logs" / config.run_name,
                       output_dir / METRICS, config.log_upload_minutes * 60, flush, log,
                       stopping=stopping)
    if resumed:
        mirror.restore_metrics()
    return mirror.start()

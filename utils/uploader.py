"""Finishes and uploads checkpoints on a background thread so training does not wait.

Per checkpoint, in order: hash the files and write the local marker (the
checkpoint now counts locally), upload every file that the bucket does not
already hold with the same checksum, then upload the marker last (it now counts
remotely), then prune old local checkpoints. Failures are retried with backoff
until ``wait`` gives up; a full queue blocks the trainer (logged), never drops work.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from utils import checkpoint


class CheckpointPublisher:
    def __init__(self, store, remote_prefix: str, *, background: bool = True,
                 keep_local: int = 0, queue_size: int = 2, log: Callable[[str], None] = print):
        self.store = store
        self.remote_prefix = remote_prefix.strip("/")
        self.background = background
        self.keep_local = keep_local
        self.log = log
        self.uploaded: list[str] = []
        self._queue: queue.Queue[Path | None] = queue.Queue(maxsize=queue_size)
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._worker, name="ckpt-upload", daemon=True)
            self._thread.start()

    # --------------------------------------------------------------- trainer side
    def submit(self, ckpt_dir: Path) -> None:
        """Hand a written checkpoint over; returns at once unless the queue is full."""
        with self._lock:
            self._pending.add(ckpt_dir.name)
        if not self.background:
            self._publish(ckpt_dir)
            return
        try:
            self._queue.put_nowait(ckpt_dir)
        except queue.Full:
            self.log(f"upload queue full: waiting for an earlier upload before {ckpt_dir.name}")
            self._queue.put(ckpt_dir)

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
                if deadline is not None and time.monotonic() > deadline:
                    self.log(f"gave up waiting for uploads after {timeout:.0f} s; not uploaded: "
                             f"{', '.join(self.pending)} (complete locally; rerun to upload)")
                    return False
                time.sleep(0.05)
            bar.update(total - bar.n)
        return True

    def close(self, timeout: float | None = None) -> bool:
        done = self.wait(timeout)
        self._closing = True
        if self._thread is not None and done:
            self._queue.put(None)
            self._thread.join(timeout=5)
        return done

    # --------------------------------------------------------------- worker side
    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._publish(item)

    def _publish(self, ckpt_dir: Path) -> None:
        checkpoint.write_manifest(ckpt_dir)
        if self.store is not None:
            delay = 1.0
            while not self._closing:
                try:
                    self._upload(ckpt_dir)
                    break
                except Exception as err:  # noqa: BLE001 - any failure is retried, never fatal
                    self.log(f"upload of {ckpt_dir.name} failed ({err}); retrying in {delay:.0f} s")
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
        with self._lock:
            self._pending.discard(ckpt_dir.name)
        checkpoint.prune(ckpt_dir.parent, self.keep_local, protected=set(self.pending))

    def _upload(self, ckpt_dir: Path) -> None:
        manifest = json.loads((ckpt_dir / checkpoint.MARKER).read_text())["files"]
        target = self.store.child(f"{self.remote_prefix}/{ckpt_dir.name}")
        remote = {o.name: o for o in target.list()}
        for name, info in manifest.items():
            have = remote.get(name)
            if have is None or have.size != info["size"] or have.crc32c != info["crc32c"]:
                target.upload_file(ckpt_dir / name, name)
        target.upload_file(ckpt_dir / checkpoint.MARKER, checkpoint.MARKER)
        self.uploaded.append(ckpt_dir.name)

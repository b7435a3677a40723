"""ShardCache: fetch shards in the order training needs them, under a bounded local cache.

One background thread per machine (its local main process) downloads the shards the block
order (``utils.data.blocks``) will read next, a few ahead, and evicts the ones this epoch is
done with when the next one would not fit under the limit. Every reader, in any process
(DataLoader workers, the other ranks of the machine), learns that a shard is usable from a
marker file, ``.ready/<name>``, written only after the file was verified against the
bucket's listing in this session; ``.failed/<name>`` holds why a shard could not be had.
The readers' side is :class:`ShardWait`, the hook ``TokenWindows.from_table`` calls before
opening a shard.

Outages of the bucket only make training wait (the download is retried until it answers);
a shard that keeps failing verification stops the readers with its name, and so does a
verified shard holding a token id the model's vocabulary cannot embed (the check synced data
gets at start, made as each shard arrives). A full disk stops them with the disk-full line
(the folder, the room needed and left), never with advice about the shard.

A run asked to stop (SIGTERM) while its readers wait for a shard must not wait for the
bucket: :class:`StopWatch` turns the loop's stop flag into a marker file, ``.stream-stop``,
that every waiting reader sees (in any process) and answers with :class:`WaitStopped`; the
loop then saves the steps it finished and exits within its preemption budget.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.data import TokenWindows
from utils.data.shards import vocab_problem
from utils.errors import DataError, StorageError, disk_full, first_line, no_space
from utils.fs import atomic_write
from utils.processes import lower_thread_priority
from utils.storage import ObjectInfo, RetriesExhausted, Store, file_crc32c, file_md5
from utils.streaming.index import RemoteShard

READY_DIR = ".ready"  # .ready/<name>: verified in this session, safe to open
FAILED_DIR = ".failed"  # .failed/<name>: the one-line reason the shard cannot be had
STOPPED_NAME = ".stream-stopped"  # the downloader died: the reason, for every waiting reader
STOP_NAME = ".stream-stop"  # the run was asked to stop: waiting readers give up (WaitStopped)
ATTEMPTS = 4  # a shard failing verification is downloaded at most this often (3 retries)
OUTAGE_RETRY_S = 1.0  # between attempts while the bucket does not answer
IDLE_S = 1.0  # the downloader re-plans at least this often without a new position
CLOSE_WAIT_S = 5.0
STOP_POLL_S = 0.05  # how often StopWatch reads the loop's stop flag
_PART_RE = re.compile(r"^\.(.+)\.part-[0-9a-f]{8}$")  # download temporaries (storage.base)

Schedule = Callable[[int], list[tuple[int, int, int]]]


def _marker(root: Path, kind: str, name: str) -> Path:
    return root.joinpath(kind, *name.split("/"))


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g}"


class WaitStopped(Exception):
    """A reader was waiting for a shard when the run was asked to stop.

    Not a HarnessError: it is no failure, the loop answers it by saving the finished steps.
    One optional string argument, so a DataLoader worker's copy re-raises as this type.
    """

    def __init__(self, message: str = "stopped while waiting for a shard") -> None:
        super().__init__(message)


def stop_readers(roots: Collection[Path]) -> None:
    """Make every reader waiting under ``roots`` (any process of this machine) stop now."""
    for root in roots:
        (Path(root) / STOP_NAME).touch()  # an empty file: room for it even on a full disk


class StopWatch:
    """Turns the loop's stop flag into the stop marker of ``roots``, from a daemon thread.

    The signal handler only sets a flag, and the main process may be blocked meanwhile in a
    reader's wait (or in a DataLoader queue fed by one): this thread is what notices the flag
    during that wait. It polls a bool every ``STOP_POLL_S`` until the flag is set or it is
    closed.
    """

    def __init__(self, requested: Callable[[], bool], roots: Collection[Path]) -> None:
        self._requested, self._roots = requested, list(roots)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-stop-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.wait(STOP_POLL_S):
            if self._requested():
                stop_readers(self._roots)
                return

    def close(self) -> None:
        self._closed.set()


@dataclass(frozen=True)
class ShardWait:
    """The readers' hook: return once shard ``k`` is local and verified, else keep waiting.

    Plain data (the local root and the shard names), so it pickles into DataLoader workers
    and works in any process of the machine; it polls marker files, which costs a stat or
    four per poll, and only when a shard is opened. DataError when the shard cannot be had,
    WaitStopped when the run was asked to stop meanwhile.
    """

    root: Path
    names: tuple[str, ...]
    poll_s: float = 0.03
    warn_after_s: float = 10.0

    def __call__(self, k: int) -> None:
        name = self.names[k]
        ready = _marker(self.root, READY_DIR, name)
        failed = _marker(self.root, FAILED_DIR, name)
        stopped, stop = self.root / STOPPED_NAME, self.root / STOP_NAME
        start, warned = time.monotonic(), False
        while not ready.exists():
            for reason in (failed, stopped):
                if reason.exists():
                    raise DataError(reason.read_text(encoding="utf-8").strip())
            if stop.exists():
                raise WaitStopped(f"stopped while waiting for shard {name}")
            if not warned and time.monotonic() - start > self.warn_after_s:
                print(f"waiting for shard {name} from the bucket", file=sys.stderr, flush=True)
                warned = True
            time.sleep(self.poll_s)


def stream_windows(
    shards: Sequence[RemoteShard], seq_len: int, local_root: Path
) -> TokenWindows:
    """The windows of streamed shards: each shard is opened once the cache has it."""
    wait = ShardWait(Path(local_root), tuple(r.name for r in shards))
    return TokenWindows.from_table([r.shard for r in shards], seq_len, wait=wait,
                                   root=Path(local_root))


def minimum_bytes(
    sizes: Sequence[int], pinned: Collection[int], block_shards: int, prefetch: int
) -> int:
    """The smallest limit streaming works under: the pinned shards plus the largest shards
    that can be needed at once. Readers use all shards of a block together; at a block
    boundary they still finish the old block while starting the next (two blocks), and in
    mid-block the block plus ``prefetch`` shards ahead are local. (This assumes a block
    holds more windows than the readers span, as any shard of a real dataset does.)"""
    pinned = set(pinned)
    others = sorted((s for k, s in enumerate(sizes) if k not in pinned), reverse=True)
    count = block_shards + max(block_shards, prefetch)
    return sum(sizes[k] for k in pinned) + sum(others[:count])


def _mismatch(path: Path, info: ObjectInfo) -> str | None:
    """Why a local file is not the listed object (None: it is), comparing what GCS keeps."""
    try:
        size = path.stat().st_size
        if size != info.size:
            return f"has {size} bytes, the bucket {info.size}"
        if info.crc32c is not None and file_crc32c(path) != info.crc32c:
            return "does not match the bucket's crc32c"
        if info.crc32c is None and info.md5 is not None and file_md5(path) != info.md5:
            return "does not match the bucket's md5"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    return None


def _is_outage(exc: BaseException) -> bool:
    """The bucket did not answer (wait for it), as opposed to this shard being bad."""
    return isinstance(exc, RetriesExhausted) or (
        isinstance(exc, StorageError) and isinstance(exc.__cause__, OSError)
    )


class _Closed(Exception):
    """Raised from the progress callback to cut a download short on close()."""


@dataclass
class _Plan:
    """One epoch's schedule as arrays (by first use) plus a lookup by shard."""

    shards: np.ndarray
    first: np.ndarray
    last: np.ndarray
    where: dict[int, int]

    @classmethod
    def of(cls, schedule: list[tuple[int, int, int]]) -> _Plan:
        arr = np.array(schedule, dtype=np.int64).reshape(-1, 3)
        return cls(arr[:, 0], arr[:, 1], arr[:, 2], {int(k): i for i, k in enumerate(arr[:, 0])})

    @property
    def length(self) -> int:
        return int(self.last.max()) + 1 if len(self.last) else 0


class ShardCache:
    """Keeps the shards training needs next on local disk, under ``limit_bytes``.

    Run it on each machine's local main process only, created before any process of the
    machine reads (it removes the markers of earlier runs), and call :meth:`set_position`
    with the consumed data position every step. ``schedule(epoch)`` is
    ``shard_schedule(block_order(...), cum)`` of that epoch; ``margin_windows`` is how far
    behind the position a reader may still be (one global batch) and ``read_ahead_windows``
    how far ahead readers read (the loader's prefetched batches). ``pinned`` shards (e.g.
    the held-out ones) are fetched right after those the first steps need, and never evicted.
    """

    def __init__(
        self, store: Store, local_root: Path, shards: Sequence[RemoteShard], *,
        limit_bytes: int | None, prefetch: int, block_shards: int, schedule: Schedule,
        margin_windows: int, read_ahead_windows: int = 0, pinned: Collection[int] = (),
        position: tuple[int, int] = (0, 0), log: Callable[[str], None] = print,
        vocab_size: int | None = None,
    ) -> None:
        self._store, self._root, self._shards = store, Path(local_root), list(shards)
        self._limit = limit_bytes or None
        self._prefetch, self._schedule = prefetch, schedule
        self._margin, self._ahead = margin_windows, read_ahead_windows
        self._pinned = sorted(set(pinned))
        self._log = log
        self._vocab = vocab_size
        self._check_limit(block_shards)
        self._pos = position
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._plans: dict[int, _Plan] = {}
        self._local: dict[int, int] = {}  # shard -> bytes of its file on disk (maybe unverified)
        self._ready: set[int] = set()  # verified in this session, marker written
        self._failed: set[int] = set()
        self._attempts: dict[int, int] = {}
        self._used = self._inflight = 0
        self._outage_since: float | None = None
        self._stall_since: float | None = None
        self._stats = dict.fromkeys(
            ("bytes_downloaded", "shards_fetched", "refetches", "evictions"), 0)
        self._wait_s = self._outage_s = 0.0
        self._start_fresh()
        self._peak = self._used
        self._thread = threading.Thread(target=self._run, name="shard-cache", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the loop's side

    def set_position(self, epoch: int, offset: int) -> None:
        """The data position training has consumed (global windows of this epoch)."""
        with self._cond:
            self._pos = (epoch, offset)
            self._cond.notify()

    def close(self) -> None:
        """Stop the downloader; a download under way is cut short (its temporary removed).

        After a stop request the thread is not waited for: a bucket that does not answer
        could hold it for seconds the preemption budget does not have, and the next start
        removes a temporary it leaves."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        stopping = (self._root / STOP_NAME).exists()
        self._thread.join(timeout=0.0 if stopping else CLOSE_WAIT_S)

    def stats(self) -> dict[str, float]:
        """Counters for the end-of-run summary. wait_s: how long a shard the readers needed
        was missing, as seen each time the downloader re-plans (during an outage it looks
        only between attempts: the loop's own time waiting for batches is exact);
        outage_s: how long the bucket did not answer."""
        now = time.monotonic()
        stall, outage = self._stall_since, self._outage_since
        wait = self._wait_s + (now - stall if stall is not None else 0.0)
        down = self._outage_s + (now - outage if outage is not None else 0.0)
        return {**self._stats, "peak_local_bytes": self._peak, "local_bytes": self._used,
                "wait_s": round(wait, 3), "outage_s": round(down, 3)}

    # ------------------------------------------------------------------ start

    def _check_limit(self, block_shards: int) -> None:
        """One line at start instead of a run that thrashes or stalls for want of space."""
        if self._limit is None:
            return
        sizes = [r.size for r in self._shards]
        need = minimum_bytes(sizes, self._pinned, block_shards, self._prefetch)
        if self._limit < need:
            raise DataError(
                f"--cache-limit-gb {_gb(self._limit)} is too small: streaming needs ≥ "
                f"{_gb(need)} GB (block of {block_shards} shards + {self._prefetch} "
                f"prefetched, two blocks at a block boundary, largest shard "
                f"{_gb(max(sizes))} GB); raise --cache-limit-gb or lower "
                "--shuffle-block-shards/--prefetch-shards"
            )

    def _start_fresh(self) -> None:
        """Forget earlier runs' markers; count their shard files (verified before use) and
        remove their download temporaries and wrong-size files."""
        for kind in (READY_DIR, FAILED_DIR):
            shutil.rmtree(self._root / kind, ignore_errors=True)
        for name in (STOPPED_NAME, STOP_NAME):
            (self._root / name).unlink(missing_ok=True)
        index = {r.name: k for k, r in enumerate(self._shards)}
        for dirpath, dirnames, filenames in os.walk(self._root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self._root).as_posix()
            for fname in filenames:
                part = _PART_RE.match(fname)  # a temporary of shard part[1]
                base = part[1] if part is not None else fname
                k = index.get(base if rel_dir == "." else f"{rel_dir}/{base}")
                path = Path(dirpath, fname)
                if k is not None and part is not None:
                    path.unlink(missing_ok=True)
                elif k is not None and path.is_file():
                    self._adopt(k, path)

    def _adopt(self, k: int, path: Path) -> None:
        size = path.stat().st_size
        if size != self._shards[k].size:
            path.unlink()
            return
        self._local[k] = size
        self._used += size

    # ------------------------------------------------------------------ the downloader

    def _run(self) -> None:
        lower_thread_priority()
        try:
            while not self._stop.is_set():
                pos = self._pos
                targets, active = self._targets(*pos)
                self._track_stall(targets[:active])
                self._evict_for(0, targets, pos)  # a smaller limit than the last run's
                k = next((k for k in targets if k not in self._ready and k not in self._failed),
                         None)
                if k is not None and self._evict_for(self._shards[k].size - self._local.get(k, 0),
                                                     targets, pos):
                    self._fetch(k)
                else:
                    self._idle(pos)
        except _Closed:
            pass
        except Exception as exc:  # a bug here must not leave every reader waiting forever
            reason = (str(exc) if isinstance(exc, DataError)
                      else f"streaming stopped: {type(exc).__name__}: {first_line(exc)}")
            atomic_write(self._root / STOPPED_NAME, reason)
            self._log(reason)

    def _idle(self, pos: tuple[int, int]) -> None:
        with self._cond:
            if self._pos == pos and not self._stop.is_set():
                self._cond.wait(timeout=IDLE_S)

    def _plan(self, epoch: int) -> _Plan:
        """The schedule of ``epoch``, cached for it and the next (the only ones planned)."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e in (epoch - 1, epoch + 1)}
            self._plans[epoch] = _Plan.of(self._schedule(epoch))
        return self._plans[epoch]

    def _targets(self, epoch: int, offset: int) -> tuple[list[int], int]:
        """(shards to keep local, in the order to fetch them; how many of the first ones
        readers need now).

        This epoch's shards not yet done, by first use: first those readers can reach (first
        use within the read-ahead), then the pinned ones, then ``prefetch`` more; near the
        epoch's end the next epoch's first shards follow.
        """
        cur = self._plan(epoch)
        undone = cur.last >= offset - self._margin
        order = cur.shards[undone].tolist()
        reach = offset + self._ahead
        now = int(np.searchsorted(cur.first[undone], reach, side="right"))
        want = now + self._prefetch
        if len(order) < want:
            nxt = self._plan(epoch + 1)
            now += int(np.searchsorted(nxt.first, reach - cur.length, side="right"))
            seen = set(order)
            order += [k for k in nxt.shards.tolist() if k not in seen]
            want = max(want, now)
        needed = order[:now]
        return list(dict.fromkeys(needed + self._pinned + order[now:want])), len(needed)

    def _next_use(self, k: int, epoch: int, offset: int) -> float:
        """Offset (from this epoch's start) at which shard ``k`` is read next."""
        cur, nxt = self._plan(epoch), self._plan(epoch + 1)
        i = cur.where.get(k)
        if i is not None and cur.last[i] >= offset - self._margin:
            return float(cur.first[i])
        j = nxt.where.get(k)
        return float(cur.length + nxt.first[j]) if j is not None else float("inf")

    def _evict_for(self, need: int, targets: list[int], pos: tuple[int, int]) -> bool:
        """Make room for ``need`` more bytes under the limit by deleting local shards that no
        reader can reach (none of ``targets``, not pinned), read next the latest first.
        False if even that is not enough: the caller waits for the position to move on."""
        if self._limit is None or self._used + need <= self._limit:
            return True
        keep = set(targets) | set(self._pinned)
        victims = sorted((k for k in self._local if k not in keep),
                         key=lambda k: self._next_use(k, *pos), reverse=True)
        for k in victims:
            self._drop(k)
            self._stats["evictions"] += 1
            if self._used + need <= self._limit:
                return True
        return False

    def _drop(self, k: int) -> None:
        """Delete shard ``k``'s marker, then its file (a reader never sees a marker alone)."""
        name = self._shards[k].name
        _marker(self._root, READY_DIR, name).unlink(missing_ok=True)
        self._ready.discard(k)
        self._shards[k].shard.path.unlink(missing_ok=True)
        self._used -= self._local.pop(k, 0)

    def _fetch(self, k: int) -> None:
        """Make shard ``k`` ready: verify a file already there, else download it."""
        r = self._shards[k]
        if k in self._local:
            problem = _mismatch(r.shard.path, r.info)
            if problem is None:
                self._set_ready(k)
                return
            self._log(f"streaming: the local copy of {r.name} {problem}; fetching it again")
            self._drop(k)
            self._stats["refetches"] += 1
        started = time.monotonic()
        try:
            self._store.download_file(r.name, r.shard.path, expected=r.info,
                                      on_bytes=self._on_bytes)
        except _Closed:
            raise
        except Exception as exc:
            self._inflight = 0
            self._failed_download(k, exc, started)
            return
        self._inflight = 0
        self._local[k] = r.size
        self._used += r.size
        self._stats["bytes_downloaded"] += r.size
        self._stats["shards_fetched"] += 1
        if self._outage_since is not None:
            waited = time.monotonic() - self._outage_since
            self._log(f"streaming: {self._store.url} answers again (after {waited:.0f} s)")
            self._outage_s += waited
            self._outage_since = None
        self._set_ready(k)

    def _on_bytes(self, n: int) -> None:
        if self._stop.is_set():
            raise _Closed()
        self._inflight += n
        self._peak = max(self._peak, self._used + self._inflight)

    def _set_ready(self, k: int) -> None:
        """Mark verified shard ``k`` usable, unless its token ids do not fit the model."""
        problem = self._vocab and vocab_problem(self._shards[k].shard, self._vocab)
        if problem:
            self._give_up(k, problem)
            return
        marker = _marker(self._root, READY_DIR, self._shards[k].name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        self._ready.add(k)
        self._peak = max(self._peak, self._used)

    def _failed_download(self, k: int, exc: Exception, started: float) -> None:
        """An outage waits and retries without limit; a bad shard gets ATTEMPTS downloads; a
        full disk stops every reader with the disk-full line (DataError, see _run)."""
        name = self._shards[k].name
        if disk_full(exc):
            raise DataError(no_space(
                self._root, f"{self._store.url}/{name}", self._shards[k].size,
                "free space, pass a --data-dir on a larger disk, or lower --cache-limit-gb"
                )) from None
        if _is_outage(exc):
            if self._outage_since is None:
                self._outage_since = started
                self._log(f"streaming: cannot reach {self._store.url} ({first_line(exc)}); "
                          "training waits, retrying until it answers")
            self._stop.wait(OUTAGE_RETRY_S)
            return
        n = self._attempts[k] = self._attempts.get(k, 0) + 1
        if n < ATTEMPTS:
            self._log(f"streaming: download {n} of {name} failed ({first_line(exc)}); "
                      "fetching it again")
            self._stats["refetches"] += 1
            self._stop.wait(0.2 * n)
            return
        self._give_up(k, f"{self._store.url}/{name}: still bad after {n} downloads "
                         f"({first_line(exc, 300)}); re-upload the shard or remove it from "
                         f"the bucket")

    def _give_up(self, k: int, reason: str) -> None:
        """Shard ``k`` cannot be had: readers that reach it stop with ``reason``."""
        self._failed.add(k)
        path = _marker(self._root, FAILED_DIR, self._shards[k].name)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, reason)
        self._log(f"streaming: {reason}")

    def _track_stall(self, needed: list[int]) -> None:
        """Accumulate the time during which a shard readers need is not ready."""
        missing = any(k not in self._ready for k in needed)
        now = time.monotonic()
        if missing and self._stall_since is None:
            self._stall_since = now
        elif not missing and self._stall_since is not None:
            self._wait_s += now - self._stall_since
            self._stall_since = None

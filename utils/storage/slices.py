"""Sliced transfers: a large file moves as slices on parallel streams, each request bounded.

One stream to GCS carries ~200 MiB/s, so a 17 GB neox-1.2b checkpoint takes ~85 s as one
stream per file, against a spot VM's 30 s notice; parallel streams reach many GiB/s. A backend
uploads each slice of a file as a hidden part object and composes them (GcsStore), and
downloads an object as ranged reads written in place into one pre-allocated file.

Nothing here imports google-cloud-storage: the plan, the readers and writers and the thread
runner are plain Python, so the GPU machines (no GCS client) import this module too.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from utils.storage.base import ProgressFn

T = TypeVar("T")

# Bytes in one upload request. Bounded because the GCS client hands a request body to the
# socket as one piece: a resumable upload's default 100 MiB request needs ~100 s at 1 MB/s,
# far past any timeout. 8 MiB is a multiple of 256 KiB (GCS's rule for chunks), the size the
# client itself sends as one multipart request, and large enough that the per-request round
# trip stays small next to the transfer (the emulator crawls at 256 KiB chunks).
CHUNK_BYTES = 8 * 2**20
# Files up to SLICE_THRESHOLD_BYTES go as one stream: at GCS's ~200 MiB/s per stream 12 MiB
# takes ~60 ms, about what a sliced upload adds (a compose, the parts' deletes), so slicing
# cannot win below it on a fast link (on a slow one the file is small anyway). A slice is
# never smaller than MIN_SLICE_BYTES (each part costs a few requests) nor larger than
# MAX_SLICE_BYTES (a slice found corrupt is sent again whole, and smaller slices keep every
# stream busy to the end of a big file).
SLICE_THRESHOLD_BYTES = 12 * 2**20
MIN_SLICE_BYTES = 2**20
MAX_SLICE_BYTES = 256 * 2**20
DEFAULT_STREAMS = 16
# Part objects live under a folder of this name next to their final object: a name with a
# component starting with "." is never listed (base._visible), so nothing counts them.
PARTS_DIR = ".parts"


def plan_slices(size: int, streams: int) -> list[tuple[int, int]]:
    """(offset, length) of each slice of a file of ``size`` bytes moved on ``streams`` streams.

    One slice (the whole file) when one stream is asked for or the file is at most
    SLICE_THRESHOLD_BYTES; otherwise about one slice per stream, within [MIN_SLICE_BYTES,
    MAX_SLICE_BYTES].
    """
    if streams < 2 or size <= SLICE_THRESHOLD_BYTES:
        return [(0, size)]
    length = min(max(-(-size // streams), MIN_SLICE_BYTES), MAX_SLICE_BYTES)
    return [(offset, min(length, size - offset)) for offset in range(0, size, length)]


def part_folder(name: str, token: str) -> str:
    """The hidden folder of one sliced upload of ``name``: ``dir/.parts/base.token``."""
    folder, _, base = name.rpartition("/")
    return "/".join(p for p in (folder, PARTS_DIR, f"{base}.{token}") if p)


def is_part(name: str) -> bool:
    """Whether an object name is a part (or an intermediate compose) of a sliced upload."""
    return PARTS_DIR in name.split("/")


class SliceReader:
    """A read-only view of ``length`` bytes of a file from ``offset``, positioned from 0.

    The GCS client streams a resumable upload from it a chunk at a time and seeks back within
    it to resend a chunk, so memory holds one chunk per stream, never the slice.
    """

    def __init__(self, path: Path, offset: int, length: int) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close() / the with block
        self._offset = offset
        self._length = length
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        left = self._length - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        self._f.seek(self._offset + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = min(max(base + offset, 0), self._length)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SliceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SliceWriter:
    """Writes a ranged download into its place in a shared pre-allocated file.

    Positioned writes (pwrite), so slices on other threads never move this one's offset; a
    retried read resumes where the previous attempt stopped, so writes arrive in order.
    """

    def __init__(self, fd: int, offset: int, on_bytes: ProgressFn | None) -> None:
        self._fd = fd
        self._pos = offset
        self._on_bytes = on_bytes

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, self._pos)
            self._pos += written
            view = view[written:]
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        return len(data)


def preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks up front where the system can (a full disk fails now, not
    after minutes of transfer), else just set its length."""
    if size > 0 and hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:
        os.ftruncate(fd, size)


def locked(on_bytes: ProgressFn | None) -> ProgressFn | None:
    """A progress callback safe to call from several slices at once."""
    if on_bytes is None:
        return None
    lock = threading.Lock()

    def report(n: int) -> None:
        with lock:
            on_bytes(n)

    return report


def run_parallel(
    tasks: Sequence[Callable[[], T]], streams: int, slots: threading.Semaphore
) -> list[T]:
    """Run tasks on up to ``streams`` threads, each holding one of ``slots`` while it works;
    the results in the tasks' order.

    ``slots`` (``streams`` of them) is shared by every transfer of a store, so all files moving
    at once use at most that many streams (at most streams x CHUNK_BYTES of request bodies in
    memory).
    Plain threads, not a ThreadPoolExecutor: checkpoints are flushed from atexit handlers,
    when executors refuse new work. The first error stops tasks not yet started and is
    raised once the running ones have finished (none is left writing behind the caller).
    """
    results: list[T | None] = [None] * len(tasks)
    errors: list[BaseException] = []
    indices = itertools.count()  # next() on it is atomic under the GIL

    def worker() -> None:
        while not errors:
            i = next(indices)
            if i >= len(tasks):
                return
            with slots:
                if errors:
                    return
                try:
                    results[i] = tasks[i]()
                except BaseException as exc:  # noqa: BLE001 - re-raised by the caller below
                    errors.append(exc)

    threads = [threading.Thread(target=worker, name="slice", daemon=True)
               for _ in range(min(streams, len(tasks)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]

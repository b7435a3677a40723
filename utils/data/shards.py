"""Pre-tokenized shards -> fixed-length training windows, memory-mapped.

Shards live in nested folders under a data root (``data/training/`` by default):

* ``.npy`` - a 1-D token stream or 2-D rows of any unsigned/signed integer dtype,
* ``.npz`` - the same, stored as the array ``input_ids``,
* ``.bin`` - raw tokens with no header (nanoGPT's format); the dtype comes from the
  ``dataset.json`` in the same folder or the nearest ancestor (``{"dtype": "uint16"}``),
  ``uint16`` when there is none.

Everything is memory-mapped (compressed ``.npz`` members excepted, which cannot be), so a
100 GB dataset costs page cache, not RAM. numpy only: both engines read the same windows.
Only the most recently used maps stay open (each holds a file descriptor), and the largest
token id of every shard is cached in the hidden ``.shard-stats.json`` of the data root.
Streaming (``utils/streaming``) describes shards before they are downloaded (``npy_shard``,
``bin_shard``) and builds the windows with ``TokenWindows.from_table``, whose hook waits for
each file to arrive.
"""

from __future__ import annotations

import errno
import io
import json
import mmap  # noqa: F401 - np.memmap imports it on first use, which fails with no fd left
import os
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import DataError
from utils.fs import atomic_write, read_cache

try:  # imported now: with no descriptor left, even an import fails
    import resource  # Unix only: the open-file limit that errors name
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

SHARD_SUFFIXES = (".npy", ".npz", ".bin")
META_NAME = "dataset.json"
BIN_DTYPES = ("uint16", "uint32")
HOW_TO_GET_DATA = (
    "prepare a sample with `python -m data.prepare` or fetch the training data with "
    "`python download_training_data.py`"
)
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, skipped fields, name and extra lengths
MAX_OPEN_SHARDS = 128  # memory maps kept open per process (each holds a file descriptor)
STATS_NAME = ".shard-stats.json"  # hidden: find_shards and the storage sync skip it
_STATS_VERSION = 1
_STATS_CHUNK_BYTES = 4 << 20
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, struct.error, zlib.error)


def _shard_sort_key(root: Path, path: Path) -> tuple[str, ...]:
    return path.relative_to(root).parts


def find_shards(root: Path, max_files: int | None = None) -> list[Path]:
    """All shard files below ``root`` in sorted relative-path order, the first ``max_files``.

    Sorting by path parts (not by string) keeps ``a/b.npy`` before ``a-b.npy`` and makes the
    order, hence the windows, identical on every machine. Hidden files (temporary files of an
    interrupted write) are skipped.
    """
    root = Path(root)
    if max_files is not None and max_files < 1:
        raise DataError(f"max_files={max_files} must be >= 1 (or None for all shards)")
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; {HOW_TO_GET_DATA}")
    shards = sorted(
        (
            p
            for p in root.rglob("*")
            if p.suffix in SHARD_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: _shard_sort_key(root, p),
    )
    if not shards:
        raise DataError(
            f"no shards ({', '.join(SHARD_SUFFIXES)}) found under {root}; {HOW_TO_GET_DATA}"
        )
    return shards[:max_files]


def _load_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable dataset metadata ({e}); fix or delete it") from e
    if not isinstance(meta, dict):
        raise DataError(
            f"{path}: dataset metadata must be a JSON object, not {type(meta).__name__}"
        )
    return meta


def read_dataset_meta(root: Path) -> dict[str, Any] | None:
    """The ``dataset.json`` nearest to ``root``: its own, else the shallowest below (sorted).

    The training loops read vocab size and special-token ids from it; ``None`` when the data
    came without one (e.g. a plain download of ``.bin`` shards).
    """
    root = Path(root)
    if (root / META_NAME).is_file():
        return _load_json(root / META_NAME)
    if not root.is_dir():
        return None
    found = sorted(root.rglob(META_NAME), key=lambda p: (len(p.relative_to(root).parts), p.parts))
    return _load_json(found[0]) if found else None


def _bin_dtype(path: Path, root: Path | None, cache: dict[Path, np.dtype]) -> np.dtype:
    """dtype of a headerless ``.bin`` shard from the nearest ``dataset.json`` that names one."""
    folder = path.parent
    searched: list[Path] = []
    dtype = np.dtype("uint16")
    while True:
        if folder in cache:
            dtype = cache[folder]
            break
        searched.append(folder)
        meta_path = folder / META_NAME
        if meta_path.is_file():
            name = _load_json(meta_path).get("dtype")
            if name is not None:
                if name not in BIN_DTYPES:
                    raise DataError(
                        f"{meta_path}: dtype {name!r} is not supported for .bin shards; "
                        f"use one of {', '.join(BIN_DTYPES)}"
                    )
                dtype = np.dtype(name)
                break
        if folder == root or folder.parent == folder:
            break
        folder = folder.parent
    for f in searched:
        cache[f] = dtype
    return dtype


@dataclass(frozen=True)
class Shard:
    """Where one shard's tokens sit; cheap to pickle (DataLoader workers get a copy)."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool
    offset: int | None  # byte offset of the tokens in the file; None: compressed .npz member

    @property
    def num_tokens(self) -> int:
        return int(np.prod(self.shape))


def _read_npy_header(fp: Any, path: Path) -> tuple[np.dtype, tuple[int, ...], bool]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise DataError(f"{path}: unsupported .npy format version {version}; re-save it with numpy")
    return np.dtype(dtype), tuple(int(d) for d in shape), bool(fortran)


def _checked(
    path: Path, dtype: np.dtype, shape: tuple[int, ...], fortran: bool,
    offset: int | None, data_bytes: int,
) -> Shard:
    """Validate dtype, rank, emptiness and size against the bytes actually present."""
    if dtype.kind not in "ui":
        raise DataError(f"{path}: tokens must be integers, found dtype {dtype}; re-tokenize it")
    if len(shape) not in (1, 2):
        raise DataError(f"{path}: tokens must be 1-D or 2-D, found shape {shape}; re-tokenize it")
    shard = Shard(path, dtype, shape, fortran, offset)
    if shard.num_tokens == 0:
        raise DataError(f"{path}: shard is empty (0 tokens); delete it or re-create it")
    need = shard.num_tokens * dtype.itemsize
    if data_bytes < need:
        raise DataError(
            f"{path}: shard is truncated ({data_bytes} of {need} bytes of tokens present); "
            "re-create or re-download it"
        )
    return shard


def _inspect_npy(path: Path) -> Shard:
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: shard is empty (0 bytes); delete it or re-create it")
    with open(path, "rb") as f:
        dtype, shape, fortran = _read_npy_header(f, path)
        offset = f.tell()
    return _checked(path, dtype, shape, fortran, offset, size - offset)


def _inspect_npz(path: Path) -> Shard:
    """Read the ``input_ids`` header; an uncompressed (``np.savez``) member is memory-mapped."""
    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo("input_ids.npy")
        except KeyError:
            names = ", ".join(n.removesuffix(".npy") for n in zf.namelist()) or "nothing"
            raise DataError(
                f"{path}: .npz has no array 'input_ids' (found: {names}); save tokens under "
                "that name"
            ) from None
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                sig, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(
                    f.read(_ZIP_LOCAL_HEADER.size)
                )
                if sig != b"PK\x03\x04":
                    raise DataError(f"{path}: corrupt zip entry for input_ids; re-create it")
                start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len
                f.seek(start)
                dtype, shape, fortran = _read_npy_header(f, path)
                offset: int | None = f.tell()
                data_bytes = info.file_size - (f.tell() - start)
        else:
            with zf.open(info) as member:
                dtype, shape, fortran = _read_npy_header(member, path)
                header_len = member.tell()
            offset, data_bytes = None, info.file_size - header_len
    return _checked(path, dtype, shape, fortran, offset, data_bytes)


def bin_shard(
    path: Path, size: int, root: Path | None = None, dtypes: dict[Path, np.dtype] | None = None
) -> Shard:
    """A ``.bin`` shard of ``size`` bytes; the file itself need not exist yet (streaming).

    The dtype comes from the nearest ``dataset.json`` up to ``root``, which must be local;
    ``dtypes`` caches it per folder across calls.
    """
    dtype = _bin_dtype(path, root, {} if dtypes is None else dtypes)
    if size == 0:
        raise DataError(f"{path}: shard is empty (0 bytes); delete it or re-create it")
    if size % dtype.itemsize:
        raise DataError(
            f"{path}: size {size} is not a multiple of {dtype.itemsize} bytes ({dtype}): "
            "truncated, or the dtype in dataset.json is wrong"
        )
    return _checked(path, dtype, (size // dtype.itemsize,), False, 0, size)


def npy_shard(path: Path, head: bytes, size: int) -> Shard:
    """A ``.npy`` shard from its first bytes (the whole header) and its size, without the file.

    Streaming learns a shard's layout from a ranged read of the bucket object, so that
    windows can be numbered before any shard is downloaded.
    """
    f = io.BytesIO(head)
    try:
        dtype, shape, fortran = _read_npy_header(f, path)
    except _READ_ERRORS as e:
        raise DataError(f"{path}: unreadable .npy header ({type(e).__name__}: {e}); "
                        "re-create it") from e
    return _checked(path, dtype, shape, fortran, f.tell(), size - f.tell())


def _inspect_bin(path: Path, root: Path | None, cache: dict[Path, np.dtype]) -> Shard:
    return bin_shard(path, path.stat().st_size, root, cache)


def _inspect(path: Path, root: Path | None, cache: dict[Path, np.dtype]) -> Shard:
    try:
        if path.suffix == ".npy":
            return _inspect_npy(path)
        if path.suffix == ".npz":
            return _inspect_npz(path)
        if path.suffix == ".bin":
            return _inspect_bin(path, root, cache)
    except DataError:
        raise
    except _READ_ERRORS as e:
        raise _unreadable(path, e) from e
    raise DataError(f"{path}: unknown shard type; use one of {', '.join(SHARD_SUFFIXES)}")


def _open_file_limit() -> int | None:
    """This process's soft limit on open files (``ulimit -n``); None if unlimited or unknown."""
    if resource is None:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _unreadable(path: Path, e: BaseException) -> DataError:
    """The one-line error for a shard that could not be opened or parsed.

    Running out of file descriptors is not the shard's fault: advising to re-create a good
    file sends the user the wrong way, so name the real cause and the limit to raise.
    """
    what = f"{type(e).__name__}: {e}"
    code = e.errno if isinstance(e, OSError) else None
    if code == errno.EMFILE:
        limit = _open_file_limit()
        now = f", now {limit}" if limit else ""
        return DataError(
            f"{path}: cannot open shard: this process has too many open files ({what}); the "
            f"shard is fine: raise the open-file limit (`ulimit -n 65536` before starting{now})"
        )
    if code == errno.ENFILE:
        return DataError(
            f"{path}: cannot open shard: the system has too many open files ({what}); the "
            "shard is fine: close other programs or raise the system limit (sysctl fs.file-max)"
        )
    return DataError(f"{path}: unreadable shard ({what}); re-create it")


def _open_tokens(s: Shard) -> np.ndarray:
    """The shard's tokens in their stored shape: a read-only map, or in RAM if compressed."""
    if s.offset is None:
        with np.load(s.path) as z:
            return z["input_ids"]
    return np.memmap(  # a str, not a Path, which numpy would resolve: a stat per folder level
        os.fspath(s.path), dtype=s.dtype, mode="r", offset=s.offset, shape=s.shape,
        order="F" if s.fortran else "C",
    )


def _id_range(s: Shard) -> tuple[int, int]:
    """(smallest, largest) token id of a shard, streamed in chunks of a few MB.

    A 10 GB shard must not be read into RAM to find one number: a flat map is reduced chunk by
    chunk (the order of the tokens does not matter for a minimum and a maximum).
    """
    if s.offset is None:  # a compressed member is decompressed whole anyway when trained on
        with np.load(s.path) as z:
            arr = z["input_ids"]
        return int(arr.min()), int(arr.max())
    flat = np.memmap(
        os.fspath(s.path), dtype=s.dtype, mode="r", offset=s.offset, shape=(s.num_tokens,)
    )
    step = max(1, _STATS_CHUNK_BYTES // s.dtype.itemsize)
    lo, hi = int(flat[0]), int(flat[0])
    for start in range(0, s.num_tokens, step):
        chunk = flat[start : start + step]
        lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
    return lo, hi


def _save_stats(path: Path, entries: dict[str, Any]) -> None:
    """Write the cache atomically; a read-only data folder just goes without one."""
    try:
        atomic_write(path, json.dumps({"version": _STATS_VERSION, "shards": entries}))
    except OSError:
        pass


def _fresh_stats(entry: Any, st: os.stat_result, dtype: np.dtype) -> bool:
    """A well-formed entry [size, mtime_ns, dtype, min, max] for the file as it is now.

    The dtype is part of the key: a ``.bin`` read as uint32 instead of uint16 (``dataset.json``
    edited) holds other ids in the same unchanged bytes.
    """
    return (
        isinstance(entry, list) and len(entry) == 5
        and entry[:3] == [st.st_size, st.st_mtime_ns, dtype.str]
        and all(isinstance(v, int) for v in entry[3:])
    )


def _vocab_error(s: Shard, lo: int, hi: int, vocab_size: int, others: int) -> DataError:
    """One line naming the shard, the offending id, the vocabulary size and the likely fixes."""
    more = f" (and {others} more shard(s) like it)" if others else ""
    if lo < 0:
        return DataError(
            f"{s.path}: shard has token id {lo}, below 0{more}; it holds something other than "
            "token ids (label masks? padding?): re-create it with `python -m data.prepare`"
        )
    problem = f"has token id {hi} >= vocabulary size {vocab_size} (ids 0..{vocab_size - 1})"
    fix = (
        "the data was made with another tokenizer: re-tokenize it with this model's tokenizer "
        "or use a model whose vocabulary covers it"
    )
    if s.path.suffix == ".bin":
        fix += f"; or its dtype is wrong (read as {s.dtype}): set \"dtype\" in {META_NAME}"
    return DataError(f"{s.path}: shard {problem}{more}; {fix}")


def vocab_problem(s: Shard, vocab_size: int) -> str | None:
    """One line on why shard ``s`` (local) cannot train a model of ``vocab_size`` ids, or None.

    For a shard checked alone when it arrives (streaming), outside a ``TokenWindows``."""
    lo, hi = _id_range(s)
    return str(_vocab_error(s, lo, hi, vocab_size, 0)) if lo < 0 or hi >= vocab_size else None


def _default_max_open() -> int:
    """``MAX_OPEN_SHARDS``, or a quarter of a low open-file limit (macOS starts at 256)."""
    limit = _open_file_limit()
    return MAX_OPEN_SHARDS if limit is None else max(4, min(MAX_OPEN_SHARDS, limit // 4))


def _check_args(shards: Sequence[Any], seq_len: int, max_open: int | None) -> None:
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} must be >= 1")
    if not shards:
        raise DataError(f"no shards given; {HOW_TO_GET_DATA}")
    if max_open is not None and max_open < 1:
        raise DataError(f"max_open={max_open} must be >= 1 (or None for the default)")


def _inode(path: Path) -> int | None:
    """The file's inode now; None if it is gone."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class TokenWindows:
    """Map-style dataset of windows of ``seq_len + 1`` tokens (inputs plus shifted targets).

    Window ``j`` of a shard starts at token ``j * seq_len``: consecutive windows share one
    token so every token is a target exactly once. A window never crosses shards (shards are
    separate token streams); 2-D shards are read as their rows concatenated. All shards are
    validated up front from their headers and sizes, so a bad file fails at startup, not hours
    into a run. Memory maps open lazily per process, at most ``max_open`` at a time (least
    recently used closed first), and are not pickled.
    """

    def __init__(
        self, shards: list[Path], seq_len: int, *, root: Path | None = None,
        max_open: int | None = None,
    ) -> None:
        """``root`` bounds the upward search for the ``dataset.json`` giving ``.bin`` dtypes
        and holds the id cache (default: the shards' common folder); ``max_open`` defaults to
        ``MAX_OPEN_SHARDS``, less under a low ``ulimit -n``."""
        _check_args(shards, seq_len, max_open)
        cache: dict[Path, np.dtype] = {}
        self._build([_inspect(Path(p), root, cache) for p in shards], seq_len, root, max_open)

    @classmethod
    def from_table(
        cls, shards: Sequence[Shard], seq_len: int, *, wait: Callable[[int], None],
        root: Path | None = None, max_open: int | None = None,
    ) -> TokenWindows:
        """Windows over shards described up front (``npy_shard``/``bin_shard``) whose files
        may not exist yet: streaming numbers the windows before the downloads.

        ``wait(k)`` runs before shard ``k`` is opened and returns once its file is local and
        verified (or raises ``DataError``); it is pickled into DataLoader workers, so it must
        be a picklable object, not a thread or a lock.
        """
        _check_args(shards, seq_len, max_open)
        self = cls.__new__(cls)
        self._build(list(shards), seq_len, root, max_open, wait)
        return self

    def _build(
        self, shards: list[Shard], seq_len: int, root: Path | None, max_open: int | None,
        wait: Callable[[int], None] | None = None,
    ) -> None:
        self.seq_len = seq_len
        self._shards = shards
        self._wait = wait
        self._inodes: dict[int, int | None] = {}  # streaming: the file each open map came from
        self.num_tokens = sum(s.num_tokens for s in self._shards)
        per_shard = [max(0, (s.num_tokens - 1) // seq_len) for s in self._shards]
        self._cum = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
        if self._cum[-1] == 0:
            raise DataError(
                f"the {len(shards)} shard(s) hold {self.num_tokens} tokens, but none has the "
                f"{seq_len + 1} tokens of one window; lower seq_len or add data"
            )
        self._stats_root = Path(root) if root is not None else Path(
            os.path.commonpath([os.path.abspath(s.path.parent) for s in self._shards])
        )
        self._max_open = max_open or _default_max_open()
        self._arrays: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return int(self._cum[-1])

    @property
    def shard_windows(self) -> np.ndarray:
        """Windows per shard, in shard order (shard ``k`` holds ids ``cum[k]..cum[k+1]-1``)."""
        return np.diff(self._cum)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the shard table only: each worker maps the files itself."""
        return {**self.__dict__, "_arrays": OrderedDict(), "_inodes": {}}

    def _array(self, k: int) -> np.ndarray:
        """Shard ``k``'s tokens from the LRU of open maps, opening (and evicting) on a miss.

        Every map holds a file descriptor, so keeping all of them open ran 2,000 shards into
        ``ulimit -n 1024``. A hit costs a dict lookup and a move: with fewer shards than
        ``max_open`` every map is opened once, as before.
        """
        arr = self._arrays.get(k)
        if arr is not None:
            self._arrays.move_to_end(k)
            return arr
        if self._wait is not None:
            self._wait(k)
            self._close_replaced()
        arr = self._open(k)
        self._arrays[k] = arr
        if len(self._arrays) > self._max_open:
            old, _ = self._arrays.popitem(last=False)  # the last reference: map and fd close
            self._inodes.pop(old, None)
        return arr

    def _close_replaced(self) -> None:
        """Streaming: close the maps of files the cache deleted (or replaced) since we opened
        them. A deleted file keeps its disk space while mapped, so an LRU of 128 open maps
        would otherwise hold up to 128 evicted shards on disk beyond the cache limit."""
        for j in [j for j in self._arrays if _inode(self._shards[j].path) != self._inodes.get(j)]:
            del self._arrays[j]
            self._inodes.pop(j, None)

    def _open(self, k: int) -> np.ndarray:
        """Open shard ``k``; out of descriptors, close all our maps and try once more."""
        s = self._shards[k]
        if self._wait is not None:
            self._inodes[k] = _inode(s.path)
        try:
            return _open_tokens(s)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or not self._arrays:
                raise _unreadable(s.path, e) from e
            self._arrays.clear()  # other code holds the rest: give ours back, then retry
        except _READ_ERRORS as e:
            raise _unreadable(s.path, e) from e
        try:
            return _open_tokens(s)
        except _READ_ERRORS as e:
            raise _unreadable(s.path, e) from e

    def _id_ranges(self) -> list[tuple[int, int]]:
        """(smallest, largest) token id per shard, cached in ``root/.shard-stats.json``.

        Reading a 100 GB dataset on every start would cost minutes; an entry keyed by relative
        path, size, mtime_ns and dtype costs a stat, and a changed shard is read again.
        """
        cache_path = self._stats_root / STATS_NAME
        entries = read_cache(cache_path, _STATS_VERSION, "shards")
        root = os.path.abspath(self._stats_root)
        ranges: list[tuple[int, int]] = []
        changed = False
        for s in self._shards:
            key = Path(os.path.relpath(os.path.abspath(s.path), root)).as_posix()
            try:
                st = s.path.stat()
                entry = entries.get(key)
                if not _fresh_stats(entry, st, s.dtype):
                    entry = [st.st_size, st.st_mtime_ns, s.dtype.str, *_id_range(s)]
                    entries[key] = entry
                    changed = True
            except _READ_ERRORS as e:
                raise _unreadable(s.path, e) from e
            ranges.append((entry[3], entry[4]))
        if changed:
            _save_stats(cache_path, entries)
        return ranges

    def check_vocab(self, vocab_size: int) -> None:
        """Raise one ``DataError`` line if a token id cannot index ``vocab_size`` embeddings.

        Unchecked, such an id ends deep in the model as ``IndexError: index out of range in
        self`` (a device-side assert on a GPU) naming no file. Usual causes: shards made with
        another tokenizer, or uint32 ``.bin`` data read as uint16. Ids are cached per shard.
        """
        if vocab_size < 1:
            raise DataError(f"vocab_size={vocab_size} must be >= 1")
        ranges = self._id_ranges()
        bad = [k for k, (lo, hi) in enumerate(ranges) if lo < 0 or hi >= vocab_size]
        if bad:
            lo, hi = ranges[bad[0]]
            raise _vocab_error(self._shards[bad[0]], lo, hi, vocab_size, len(bad) - 1)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"window {i} out of range [0, {n})")
        k = int(np.searchsorted(self._cum, i, side="right")) - 1
        start = (int(i) - int(self._cum[k])) * self.seq_len
        end = start + self.seq_len + 1
        arr = self._array(k)
        if arr.ndim == 1:
            return np.array(arr[start:end], dtype=np.int64)  # a copy: never a view of the map
        cols = arr.shape[1]
        first_row = start // cols
        rows = arr[first_row : (end - 1) // cols + 1]  # only the rows this window touches
        flat = np.array(rows, dtype=np.int64).reshape(-1)
        return flat[start - first_row * cols : end - first_row * cols]

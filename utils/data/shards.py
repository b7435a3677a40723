"""Pre-tokenized shards -> fixed-length training windows, memory-mapped.

Shards live in nested folders under a data root (``data/training/`` by default):

* ``.npy`` - a 1-D token stream or 2-D rows of any unsigned/signed integer dtype,
* ``.npz`` - the same, stored as the array ``input_ids``,
* ``.bin`` - raw tokens with no header (nanoGPT's format); the dtype comes from the
  ``dataset.json`` in the same folder or the nearest ancestor (``{"dtype": "uint16"}``),
  ``uint16`` when there is none.

Everything is memory-mapped (compressed ``.npz`` members excepted, which cannot be), so a
100 GB dataset costs page cache, not RAM. numpy only: both engines read the same windows.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import DataError

SHARD_SUFFIXES = (".npy", ".npz", ".bin")
META_NAME = "dataset.json"
BIN_DTYPES = ("uint16", "uint32")
HOW_TO_GET_DATA = (
    "prepare a sample with `python -m data.prepare` or fetch the training data with "
    "`python download_training_data.py`"
)
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, skipped fields, name and extra lengths


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
class _Shard:
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
) -> _Shard:
    """Validate dtype, rank, emptiness and size against the bytes actually present."""
    if dtype.kind not in "ui":
        raise DataError(f"{path}: tokens must be integers, found dtype {dtype}; re-tokenize it")
    if len(shape) not in (1, 2):
        raise DataError(f"{path}: tokens must be 1-D or 2-D, found shape {shape}; re-tokenize it")
    shard = _Shard(path, dtype, shape, fortran, offset)
    if shard.num_tokens == 0:
        raise DataError(f"{path}: shard is empty (0 tokens); delete it or re-create it")
    need = shard.num_tokens * dtype.itemsize
    if data_bytes < need:
        raise DataError(
            f"{path}: shard is truncated ({data_bytes} of {need} bytes of tokens present); "
            "re-create or re-download it"
        )
    return shard


def _inspect_npy(path: Path) -> _Shard:
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: shard is empty (0 bytes); delete it or re-create it")
    with open(path, "rb") as f:
        dtype, shape, fortran = _read_npy_header(f, path)
        offset = f.tell()
    return _checked(path, dtype, shape, fortran, offset, size - offset)


def _inspect_npz(path: Path) -> _Shard:
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


def _inspect_bin(path: Path, root: Path | None, cache: dict[Path, np.dtype]) -> _Shard:
    dtype = _bin_dtype(path, root, cache)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path}: shard is empty (0 bytes); delete it or re-create it")
    if size % dtype.itemsize:
        raise DataError(
            f"{path}: size {size} is not a multiple of {dtype.itemsize} bytes ({dtype}): "
            "truncated, or the dtype in dataset.json is wrong"
        )
    return _checked(path, dtype, (size // dtype.itemsize,), False, 0, size)


def _inspect(path: Path, root: Path | None, cache: dict[Path, np.dtype]) -> _Shard:
    try:
        if path.suffix == ".npy":
            return _inspect_npy(path)
        if path.suffix == ".npz":
            return _inspect_npz(path)
        if path.suffix == ".bin":
            return _inspect_bin(path, root, cache)
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, struct.error) as e:
        raise DataError(f"{path}: unreadable shard ({type(e).__name__}: {e}); re-create it") from e
    raise DataError(f"{path}: unknown shard type; use one of {', '.join(SHARD_SUFFIXES)}")


class TokenWindows:
    """Map-style dataset of windows of ``seq_len + 1`` tokens (inputs plus shifted targets).

    Window ``j`` of a shard starts at token ``j * seq_len``: consecutive windows share one
    token so every token is a target exactly once. A window never crosses shards (shards are
    separate token streams); 2-D shards are read as their rows concatenated. All shards are
    validated up front from their headers and sizes, so a bad file fails at startup, not hours
    into a run. Memory maps open lazily per process and are not pickled.
    """

    def __init__(self, shards: list[Path], seq_len: int, *, root: Path | None = None) -> None:
        """``root`` bounds the upward search for the ``dataset.json`` giving ``.bin`` dtypes."""
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be >= 1")
        if not shards:
            raise DataError(f"no shards given; {HOW_TO_GET_DATA}")
        self.seq_len = seq_len
        cache: dict[Path, np.dtype] = {}
        self._shards = [_inspect(Path(p), root, cache) for p in shards]
        self.num_tokens = sum(s.num_tokens for s in self._shards)
        per_shard = [max(0, (s.num_tokens - 1) // seq_len) for s in self._shards]
        self._cum = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
        if self._cum[-1] == 0:
            raise DataError(
                f"the {len(shards)} shard(s) hold {self.num_tokens} tokens, but none has the "
                f"{seq_len + 1} tokens of one window; lower seq_len or add data"
            )
        self._arrays: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self._cum[-1])

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the shard table only: each worker maps the files itself."""
        return {**self.__dict__, "_arrays": {}}

    def _array(self, k: int) -> np.ndarray:
        arr = self._arrays.get(k)
        if arr is None:
            s = self._shards[k]
            try:
                if s.offset is None:
                    with np.load(s.path) as z:
                        arr = z["input_ids"]
                else:
                    arr = np.memmap(
                        s.path, dtype=s.dtype, mode="r", offset=s.offset, shape=s.shape,
                        order="F" if s.fortran else "C",
                    )
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise DataError(
                    f"{s.path}: unreadable shard ({type(e).__name__}: {e}); re-create it"
                ) from e
            self._arrays[k] = arr
        return arr

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

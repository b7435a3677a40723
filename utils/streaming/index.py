"""The shard table of a bucket, built from one listing without downloading a shard.

Streaming must number every window before the first shard arrives (the block order and the
download order depend on it). A ``.bin`` shard's windows follow from its size and the dtype
in the nearest ``dataset.json`` (small: downloaded); a ``.npy`` shard's from its header, read
with one ranged request. Headers are cached in ``.stream-index.json`` under the local root,
keyed by name, size and hash, so a restart costs one listing.

Besides shards, streaming downloads only what the loop reads from the data folder: the
``dataset.json`` files and the tokenizer folder the top one names, at most
``METADATA_LIMIT_BYTES`` together. Anything else in the prefix (a README, a 20 MB archive)
stays in the bucket: ``--cache-limit-gb`` bounds the shards, and nothing outside its
accounting may grow without bound.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from utils.data import META_NAME, SHARD_SUFFIXES
from utils.data.shards import bin_shard, npy_shard
from utils.errors import DataError, StorageError, disk_full, no_space
from utils.fs import atomic_write, read_cache
from utils.storage import ObjectInfo, Store, file_crc32c
from utils.storage.base import safe_local_path

if TYPE_CHECKING:
    from utils.data.shards import Shard

INDEX_NAME = ".stream-index.json"  # hidden: never a shard, never synced
_INDEX_VERSION = 1
_HEAD_BYTES = 4096  # one ranged read holds any ordinary .npy header
# dataset.json files and a tokenizer folder together; a 50k-vocabulary tokenizer.json is ~2 MB
METADATA_LIMIT_BYTES = 64 * 2**20
_FULL_DISK_FIX = "free space or pass a --data-dir on a larger disk"


@dataclass(frozen=True)
class RemoteShard:
    """One shard: its listing (size and hash to verify a download against) and its layout,
    whose ``path`` is where the file goes under the local root."""

    info: ObjectInfo
    shard: Shard

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def size(self) -> int:
        return self.info.size


def _sort_key(name: str) -> tuple[str, ...]:
    """find_shards' order (by path parts), so both paths number the windows alike."""
    return tuple(name.split("/"))


def _is_shard(name: str) -> bool:
    return PurePosixPath(name).suffix in SHARD_SUFFIXES


def _select(objects: list[ObjectInfo], url: str, max_files: int | None) -> list[ObjectInfo]:
    """The shard objects in find_shards' order, the first ``max_files``; .npz refused."""
    if max_files is not None and max_files < 1:
        raise DataError(f"max_files={max_files} must be >= 1 (or None for all shards)")
    shards = sorted((o for o in objects if _is_shard(o.name)), key=lambda o: _sort_key(o.name))
    if not shards:
        raise DataError(
            f"{url}: no shards ({', '.join(SHARD_SUFFIXES)}) to stream; check the bucket "
            "and --data-prefix"
        )
    shards = shards[:max_files]
    npz = next((o for o in shards if o.name.endswith(".npz")), None)
    if npz is not None:
        raise DataError(
            f"streaming reads .npy and .bin shards; {url}/{npz.name} is .npz: convert it or "
            "use --sync-data"
        )
    return shards


@contextmanager
def disk_full_is_one_line(root: Path, writing: str, need_bytes: int) -> Iterator[None]:
    """A full disk while writing under ``root`` raises the disk-full line (DataError)."""
    try:
        yield
    except (OSError, StorageError) as exc:
        if not disk_full(exc):
            raise
        raise DataError(no_space(root, writing, need_bytes, _FULL_DISK_FIX)) from None


def _tokenizer_prefix(root: Path) -> str | None:
    """``dir/`` of the tokenizer folder the local top ``dataset.json`` names, when that is a
    folder inside the data (relative, no ``..``); None otherwise (a local path, or none)."""
    try:
        name = json.loads((root / META_NAME).read_text(encoding="utf-8")).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None  # the loop reads dataset.json again and names what is wrong with it
    if not isinstance(name, str) or not name.strip():
        return None
    path = PurePosixPath(name.strip())
    if path.is_absolute() or ".." in path.parts or str(path) == ".":
        return None
    return f"{path.as_posix()}/"


def _download_metadata(store: Store, root: Path, wanted: list[ObjectInfo], what: str) -> None:
    """Download ``wanted`` unless present and matching, refusing more than the bound."""
    total = sum(info.size for info in wanted)
    if total > METADATA_LIMIT_BYTES:
        largest = max(wanted, key=lambda info: info.size)
        raise DataError(
            f"{store.url}: {what} take {total / 2**20:,.1f} MiB (largest "
            f"{largest.name}, {largest.size / 2**20:,.1f} MiB), more than the "
            f"{METADATA_LIMIT_BYTES // 2**20} MiB streaming fetches besides shards; keep "
            f"only dataset.json and the tokenizer files there, or use --sync-data")
    for info in wanted:
        local = safe_local_path(root, info.name)
        if local.is_file() and local.stat().st_size == info.size and (
            info.crc32c is None or file_crc32c(local) == info.crc32c
        ):
            continue
        with disk_full_is_one_line(root, f"{store.url}/{info.name}", info.size):
            store.download_file(info.name, local, expected=info)


def _fetch_small_files(store: Store, root: Path, objects: list[ObjectInfo]) -> None:
    """Download the ``dataset.json`` files, then the tokenizer folder the top one names.

    ``.bin`` dtypes come from the local ``dataset.json``, and the loop reads the vocabulary
    and tokenizer from the data folder as it does for synced data. No other non-shard object
    is fetched: it would sit outside ``--cache-limit-gb``, and nothing reads it.
    """
    metas = [o for o in objects if PurePosixPath(o.name).name == META_NAME]
    _download_metadata(store, root, metas, "the dataset.json files")
    prefix = _tokenizer_prefix(root)
    if prefix is not None:
        tokenizer = [o for o in objects if o.name.startswith(prefix) and not _is_shard(o.name)]
        _download_metadata(store, root, metas + tokenizer,
                           f"the dataset.json files and the tokenizer folder {prefix}")


def _key(info: ObjectInfo) -> list[Any]:
    return [info.size, info.crc32c or info.md5]


def _npy_header_size(head: bytes) -> int:
    """Bytes of magic, version, length field and header (format 1.0: 2-byte length, else 4)."""
    if len(head) < 12:
        return len(head)  # too short to be a .npy file: npy_shard says so
    if head[6] == 1:
        return 10 + struct.unpack_from("<H", head, 8)[0]
    return 12 + struct.unpack_from("<I", head, 8)[0]


def _npy_head(store: Store, info: ObjectInfo) -> bytes:
    """The object's .npy header, from one ranged read (two for an unusually long header)."""
    head = store.read_range(info.name, 0, min(_HEAD_BYTES, info.size))
    need = min(_npy_header_size(head), info.size)
    if need > len(head):
        head = store.read_range(info.name, 0, need)
    return head[:need]


def remote_shards(
    store: Store, local_root: Path, max_files: int | None = None,
    objects: list[ObjectInfo] | None = None,
) -> list[RemoteShard]:
    """Every shard under ``store`` (one listing, or ``objects``: a listing made elsewhere),
    in find_shards' order, described for ``TokenWindows.from_table`` with paths under
    ``local_root``; nothing is downloaded but the dataset's metadata (dataset.json files,
    its tokenizer). DataError for .npz shards, a bucket without shards, metadata past
    METADATA_LIMIT_BYTES, or a full disk."""
    root = Path(local_root)
    objects = store.list() if objects is None else objects
    chosen = _select(objects, store.url, max_files)
    root.mkdir(parents=True, exist_ok=True)
    _fetch_small_files(store, root, objects)
    index_path = root / INDEX_NAME
    cached = read_cache(index_path, _INDEX_VERSION, "shards")
    entries: dict[str, Any] = {}
    dtypes: dict[Path, Any] = {}
    out: list[RemoteShard] = []
    for info in chosen:
        path = safe_local_path(root, info.name)
        if info.name.endswith(".bin"):
            out.append(RemoteShard(info, bin_shard(path, info.size, root, dtypes)))
            continue
        entry = cached.get(info.name)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == _key(info):
            head = base64.b64decode(entry[2])
        else:
            head = _npy_head(store, info)
        entries[info.name] = [*_key(info), base64.b64encode(head).decode("ascii")]
        out.append(RemoteShard(info, npy_shard(path, head, info.size)))
    if entries != cached:
        data = json.dumps({"version": _INDEX_VERSION, "shards": entries})
        with disk_full_is_one_line(root, str(index_path), len(data)):
            atomic_write(index_path, data)
    return out


"""The shard table of a bucket, built from one listing without downloading a shard.

Streaming must number every window before the first shard arrives (the block order and the
download order depend on it). A ``.bin`` shard's windows follow from its size and the dtype
in the nearest ``dataset.json`` (small: downloaded); a ``.npy`` shard's from its header, read
with one ranged request. Headers are cached in ``.stream-index.json`` under the local root,
keyed by name, size and hash, so a restart costs one listing.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from utils.data import SHARD_SUFFIXES
from utils.data.shards import bin_shard, npy_shard
from utils.errors import DataError
from utils.fs import atomic_write, read_cache
from utils.storage import ObjectInfo, Store, file_crc32c
from utils.storage.base import _safe_local_path

if TYPE_CHECKING:
    from utils.data.shards import _Shard

INDEX_NAME = ".stream-index.json"  # hidden: never a shard, never synced
_INDEX_VERSION = 1
_HEAD_BYTES = 4096  # one ranged read holds any ordinary .npy header


@dataclass(frozen=True)
class RemoteShard:
    """One shard: its listing (size and hash to verify a download against) and its layout,
    whose ``path`` is where the file goes under the local root."""

    info: ObjectInfo
    shard: _Shard

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


def _fetch_small_files(store: Store, root: Path, objects: list[ObjectInfo]) -> None:
    """Download the dataset's non-shard files (dataset.json, a tokenizer) unless present.

    ``.bin`` dtypes come from the local ``dataset.json``, and the loop reads the vocabulary
    and tokenizer from the data folder as it does for synced data (the sync fetches them too).
    """
    for info in objects:
        if _is_shard(info.name):
            continue
        local = _safe_local_path(root, info.name)
        if local.is_file() and local.stat().st_size == info.size and (
            info.crc32c is None or file_crc32c(local) == info.crc32c
        ):
            continue
        store.download_file(info.name, local, expected=info)


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
    ``local_root``; nothing is downloaded but the small non-shard files. DataError for .npz
    shards or a bucket without shards."""
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
        path = _safe_local_path(root, info.name)
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
        atomic_write(index_path, json.dumps({"version": _INDEX_VERSION, "shards": entries}))
    return out


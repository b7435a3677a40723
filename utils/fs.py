"""Crash-safe local writes: a reader sees the old content or the new, never half of one.

Folders (checkpoints, merged models, downloads) are written under a hidden ``.tmp-`` name and
renamed into place; single files through a hidden temporary and ``os.replace``. Every
``.tmp-`` folder is ours and may be removed whenever no write is under way.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def tmp_dir_for(final: Path) -> Path:
    """The hidden folder that ``final`` is written in before it is renamed into place."""
    return final.parent / f"{TMP_PREFIX}{final.name}"


def remove_stale_tmp(root: Path, pattern: str = "*") -> None:
    """Remove ``.tmp-`` folders under root left by writes a crash cut short."""
    for stale in root.glob(f"{TMP_PREFIX}{pattern}"):
        shutil.rmtree(stale, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry, not just the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write ``path`` through a hidden temporary next to it, fsynced, then renamed over it."""
    tmp = path.parent / f".{path.name}.part-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish_dir(tmp: Path, final: Path) -> Path:
    """Move a finished folder into place: ``final`` is always either the old or the new one."""
    if final.exists():
        old = final.parent / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.replace(old)
        tmp.replace(final)
        shutil.rmtree(old)
    else:
        tmp.replace(final)
    fsync_dir(final.parent)
    return final


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A fresh hidden folder to write ``final`` in; renamed into place when the block ends,
    removed when it fails (a full disk, a crash in a writer): nothing half-written remains."""
    tmp = tmp_dir_for(final)
    shutil.rmtree(tmp, ignore_errors=True)  # our own write, cut short earlier
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)


def read_cache(path: Path, version: int, key: str) -> dict[str, Any]:
    """``{key: {...}}`` of a JSON cache written as ``{"version": version, key: {...}}``; a
    missing, corrupt or foreign (other version) file only costs recomputing: ``{}``."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("version") != version:
        return {}
    entries = raw.get(key)
    return entries if isinstance(entries, dict) else {}

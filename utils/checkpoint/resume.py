"""Choosing the checkpoint to resume from: newest good one, local or in the bucket, verified.

Every candidate's files are checked against its manifest's crc32c before it is used; a bad
copy is set aside (hidden, never deleted) and the next older checkpoint is tried.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from utils.checkpoint import lineage
from utils.checkpoint.format import MARKER, by_step, find_complete, step_of, verify
from utils.errors import CheckpointError, StorageError
from utils.fs import TMP_PREFIX, fsync_dir
from utils.storage import Store, sync_down


def remote_complete(store: Store, prefix: str) -> list[str]:
    """Checkpoint names under store/prefix whose marker is there, oldest first."""
    names = {o.name.split("/")[0] for o in store.child(prefix).list()
             if o.name.count("/") == 1 and o.name.endswith("/" + MARKER)}
    return sorted((n for n in names if step_of(n) is not None), key=by_step)


def download(store: Store, dest: Path) -> Path:
    """Fetch a remote checkpoint into a hidden folder, check every hash, then rename it to dest.

    A download cut short is resumed by the next call (skip-existing sync into the same
    folder); dest never holds a half-copied checkpoint.
    """
    tmp = dest.parent / f"{TMP_PREFIX}download-{dest.name}"
    result = sync_down(store, tmp)
    if result.failed:
        raise CheckpointError(f"{store.url}: {len(result.failed)} file(s) failed to download "
                              f"({result.failed[0]}); check the bucket and retry")
    problem = verify(tmp, hashes=True)
    if problem:
        raise CheckpointError(f"{store.url} downloaded but {problem}")
    if dest.exists():
        _set_aside(dest)
    tmp.replace(dest)
    fsync_dir(dest.parent)
    return dest


def _set_aside(path: Path) -> Path:
    """Move a bad local copy out of the way (hidden, so nothing counts it) instead of deleting."""
    aside = path.parent / f".bad-{path.name}-{int(time.time())}"
    path.replace(aside)
    return aside


def choose_resume(wanted: str, root: Path, store: Store | None = None, remote_prefix: str = "",
                  log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from, downloaded if only the bucket has it; None if none exists.

    ``latest`` follows the run's head (``lineage.py``): the checkpoints of the line being
    trained, newest first, never a higher step of a line a rollback abandoned (before heads
    existed: every complete checkpoint by step). It takes the first whose files pass their
    checksums, preferring the local copy: a corrupted or truncated checkpoint costs one
    checkpoint of progress, not the run. A named checkpoint must pass, or CheckpointError
    says why.
    """
    try:
        remote = set(remote_complete(store, remote_prefix)) if store is not None else set()
    except StorageError as err:
        if wanted != "latest":
            raise
        log(f"could not list {store.url}/{remote_prefix} ({err}); using local checkpoints only")
        remote = set()
    local = {p.name for p in find_complete(root)}
    if wanted == "latest":
        head = lineage.newest_head(root, store, remote_prefix, log)
        names = (sorted(local | remote, key=by_step, reverse=True) if head is None else
                 [n for n in reversed(head["lineage"]) if n in local or n in remote])
    elif wanted in local or wanted in remote:
        names = [wanted]
    else:
        available = ", ".join(sorted(local | remote, key=by_step)) or "none"
        raise CheckpointError(f"no complete checkpoint named {wanted!r} in {root}"
                              f"{f' or {store.url}/{remote_prefix}' if store else ''}; "
                              f"available: {available}")
    for name in names:
        problems = []
        if name in local:
            problem = verify(root / name, hashes=True)
            if problem is None:
                return root / name
            problems.append(f"local copy: {problem}")
        if name in remote:
            try:
                return download(store.child(f"{remote_prefix}/{name}"), root / name)
            except (CheckpointError, StorageError) as err:
                problems.append(f"bucket copy: {err}")
        reason = "; ".join(problems)
        if wanted != "latest":
            raise CheckpointError(f"checkpoint {name} is not usable ({reason}); resume from "
                                  f"another one (--resume latest skips bad ones)")
        log(f"skipping checkpoint {name}: {reason}")
    return None


def fetch(name: str, root: Path, store: Store | None = None, remote_prefix: str = "") -> Path:
    """Make sure this machine holds a verified copy of ``name`` (other nodes of a run)."""
    path = root / name
    if verify(path, hashes=True) is None:
        return path
    if store is None:
        raise CheckpointError(f"checkpoint {name} is not in {root} on this node and there is no "
                              f"bucket to fetch it from; use a shared --output-dir or a --bucket")
    return download(store.child(f"{remote_prefix}/{name}"), path)

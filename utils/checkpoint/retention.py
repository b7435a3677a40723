"""Retention: the oldest complete checkpoints beyond a limit go, marker first, here and remote.

A step that is a multiple of ``keep_every`` marks a permanent checkpoint, never pruned.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from utils.checkpoint.format import MARKER, by_step, find_complete, step_of
from utils.storage import Store


def permanent(name: str, keep_every: int) -> bool:
    """A checkpoint kept forever: its step is a multiple of ``keep_every`` (0: none is)."""
    step = step_of(name)
    return keep_every > 0 and step is not None and step % keep_every == 0


def prune(root: Path, keep: int, protected: set[str] = frozenset(), *,
          keep_every: int = 0) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep`` (never one still uploading).

    ``keep_every`` spares every checkpoint whose step is a multiple of it, as in the bucket;
    on a VM's disk that usually belongs to the bucket alone (the disk would fill up).
    """
    if keep <= 0:
        return []
    complete = find_complete(root)
    doomed = [p for p in complete[:-keep]
              if p.name not in protected and not permanent(p.name, keep_every)]
    for path in doomed:
        (path / MARKER).unlink()  # first: a deletion cut short leaves no complete-looking copy
        shutil.rmtree(path)
    return doomed


def prune_remote(store: Store, prefix: str, keep: int, protected: set[str] = frozenset(),
                 *, keep_every: int = 0) -> list[str]:
    """Delete remote checkpoints beyond the newest ``keep`` complete ones, marker first.

    Two tiers: the newest ``keep`` go on rolling, while one whose step is a multiple of
    ``keep_every`` (> 0) stays forever, for evaluations and rollbacks long after. Removing the
    marker first means a deletion cut short leaves an incomplete (ignored) checkpoint, never a
    complete-looking one with files missing. Incomplete uploads older than the newest ``keep``
    (cut short by a crash) go too, except a permanent one: re-uploading it (catch-up) finishes
    it, and no later checkpoint replaces it. Nothing in ``protected`` (waiting or uploading)
    is touched; ``keep <= 0`` prunes nothing.
    """
    if keep <= 0:
        return []
    run = store.child(prefix)
    objects: dict[str, list[str]] = {}
    for obj in run.list():
        name, _, rest = obj.name.partition("/")
        if rest and step_of(name) is not None:
            objects.setdefault(name, []).append(rest)
    complete = sorted((n for n, files in objects.items() if MARKER in files), key=by_step)
    kept = complete[-keep:]
    oldest_kept = by_step(kept[0]) if kept else (0, "")
    doomed = sorted((n for n, files in objects.items()
                     if n not in kept and n not in protected and not permanent(n, keep_every)
                     and (MARKER in files or by_step(n) < oldest_kept)), key=by_step)
    for name in doomed:
        files = objects[name]
        if MARKER in files:
            run.delete(f"{name}/{MARKER}")
        for rest in files:
            if rest != MARKER:
                run.delete(f"{name}/{rest}")
    return doomed


def delete_run(root: Path, store: Store | None, prefix: str) -> None:
    """Delete every checkpoint of a run (``--overwrite``), each one's marker first.

    A deletion cut short leaves incomplete (ignored) folders and objects, never a complete-
    looking checkpoint with files missing.
    """
    for path in reversed(find_complete(root)):
        (path / MARKER).unlink()
        shutil.rmtree(path)
    if store is None:
        return
    run = store.child(prefix)
    objects = run.list()
    for obj in sorted(objects, key=lambda o: not o.name.endswith("/" + MARKER)):
        run.delete(obj.name)

"""Retention: the oldest complete checkpoints beyond a limit go, marker first, here and remote."""

from __future__ import annotations

import shutil
from pathlib import Path

from utils.checkpoint.format import MARKER, by_step, find_complete, step_of
from utils.storage import Store


def prune(root: Path, keep: int, protected: set[str] = frozenset()) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep`` (never one still uploading)."""
    if keep <= 0:
        return []
    complete = find_complete(root)
    doomed = [p for p in complete[:-keep] if p.name not in protected]
    for path in doomed:
        (path / MARKER).unlink()  # first: a deletion cut short leaves no complete-looking copy
        shutil.rmtree(path)
    return doomed


def prune_remote(store: Store, prefix: str, keep: int,
                 protected: set[str] = frozenset()) -> list[str]:
    """Delete the oldest complete remote checkpoints beyond ``keep``, marker first.

    Removing the marker first means a deletion cut short leaves an incomplete (ignored)
    checkpoint, never a complete-looking one with files missing. Incomplete uploads older
    than every kept checkpoint (cut short by a crash) go too.
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
    doomed = [n for n in complete[:-keep] if n not in protected]
    doomed += [n for n, files in objects.items() if MARKER not in files
               and by_step(n) < oldest_kept and n not in protected]
    for name in doomed:
        files = objects[name]
        if MARKER in files:
            run.delete(f"{name}/{MARKER}")
        for rest in files:
            if rest != MARKER:
                run.delete(f"{name}/{rest}")
    return sorted(doomed, key=by_step)


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

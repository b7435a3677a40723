"""Retention: the oldest complete checkpoints beyond a limit go, marker first, here and remote.

A step that is a multiple of ``keep_every`` marks a permanent checkpoint, never pruned.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from utils.checkpoint.format import MARKER, by_step, find_complete, step_of
from utils.checkpoint.lineage import HEAD
from utils.storage import Store


def permanent(name: str, keep_every: int) -> bool:
    """A checkpoint kept forever: its step is a multiple of ``keep_every`` (0: none is)."""
    step = step_of(name)
    return keep_every > 0 and step is not None and step % keep_every == 0


def prune(root: Path, keep: int, protected: set[str] = frozenset(), *, keep_every: int = 0,
          line: set[str] | None = None, uploaded: set[str] | None = None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep`` (never one still uploading).

    ``line``: only checkpoints of this line of training count and go (an abandoned line's are
    left alone; None: all). ``uploaded`` (with a bucket: the names complete there): a local
    checkpoint is the only copy until it is in the bucket, so it stays while it is not, unless
    a newer checkpoint of the line is there (which supersedes it); a permanent one
    (``keep_every``) stays until it is uploaded itself. Without a bucket the disk is the only
    home, so permanent ones stay.
    """
    if keep <= 0:
        return []
    complete = [p for p in find_complete(root) if line is None or p.name in line]
    newest_uploaded = max((by_step(p.name) for p in complete if p.name in (uploaded or ())),
                          default=None)

    def may_go(path: Path) -> bool:
        if path.name in protected:
            return False
        if uploaded is None:
            return not permanent(path.name, keep_every)
        if path.name in uploaded:
            return True
        superseded = newest_uploaded is not None and by_step(path.name) < newest_uploaded
        return superseded and not permanent(path.name, keep_every)

    doomed = [p for p in complete[:-keep] if may_go(p)]
    for path in doomed:
        (path / MARKER).unlink()  # first: a deletion cut short leaves no complete-looking copy
        shutil.rmtree(path)
    return doomed


def prune_remote(store: Store, prefix: str, keep: int, protected: set[str] = frozenset(),
                 *, keep_every: int = 0, line: set[str] | None = None) -> list[str]:
    """Delete remote checkpoints beyond the newest ``keep`` complete ones, marker first.

    Two tiers: the newest ``keep`` go on rolling, while one whose step is a multiple of
    ``keep_every`` (> 0) stays forever, for evaluations and rollbacks long after. Removing the
    marker first means a deletion cut short leaves an incomplete (ignored) checkpoint, never a
    complete-looking one with files missing. Incomplete uploads older than the newest ``keep``
    (cut short by a crash) go too, except a permanent one: re-uploading it (catch-up) finishes
    it, and no later checkpoint replaces it. Nothing in ``protected`` (waiting or uploading)
    is touched; ``keep <= 0`` prunes nothing. ``line``: as for ``prune``.
    """
    if keep <= 0:
        return []
    run = store.child(prefix)
    objects: dict[str, list[str]] = {}
    for obj in run.list():
        name, _, rest = obj.name.partition("/")
        if rest and step_of(name) is not None and (line is None or name in line):
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


def delete_run(root: Path, store: Store | None, prefix: str) -> list[str]:
    """Delete this run's checkpoints (``--overwrite``), each one's marker first; what went.

    Exactly the run's own ``checkpoint-*`` folders and its head, here and under ``prefix`` in
    the bucket: never anything else there (another run's nested folder, data, notes), and
    never through a name that leaves the prefix. A deletion cut short leaves incomplete
    (ignored) folders and objects, never a complete-looking checkpoint with files missing.
    """
    gone = []
    if root.is_dir():
        folders = [p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None]
        for path in sorted(folders, key=lambda p: by_step(p.name), reverse=True):
            (path / MARKER).unlink(missing_ok=True)
            shutil.rmtree(path)
            gone.append(str(path))
        (root / HEAD).unlink(missing_ok=True)
    if store is None:
        return gone
    run = store.child(prefix)
    objects = [o.name for o in run.list() if step_of(o.name.partition("/")[0]) is not None
               and o.name.partition("/")[2]]
    for name in sorted(objects, key=lambda n: not n.endswith("/" + MARKER)):
        run.delete(name)
    run.delete(HEAD)
    gone += sorted({f"{run.url}/{n.partition('/')[0]}" for n in objects})
    return gone

"""Run identity and lineage: which checkpoints are this run's line of training.

A run gets an id when it starts from scratch (kept by every resume, recorded in each
checkpoint's state and marker), so a checkpoint written by another run of the same name is
recognised and never replaced. Each checkpoint also records its **lineage**: the names of the
checkpoints of its line of training, oldest first, ending with itself.

``HEAD.json`` (in the local checkpoint folder, and in the bucket next to the checkpoints)
names the newest checkpoint of the line being trained. It moves only forward along a line: a
checkpoint becomes the head only if it extends the current head (or the head belongs to an
earlier run id). A resume from an older checkpoint makes that checkpoint the head, so the line
forks there and ``--resume latest`` follows the new line; the abandoned line's later
checkpoints stay where they are (never resumed, pruned or deleted automatically, except by
``--overwrite``).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from utils.errors import StorageError
from utils.fs import atomic_write
from utils.storage import ObjectNotFound, Store

HEAD = "HEAD.json"
LINEAGE_MAX = 512  # names kept per checkpoint: enough to walk back past any damage


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def extend(lineage: list[str], name: str) -> list[str]:
    """The lineage of a new checkpoint ``name`` that follows ``lineage``."""
    if lineage and lineage[-1] == name:
        return list(lineage[-LINEAGE_MAX:])
    return [*lineage[-(LINEAGE_MAX - 1):], name]


def head_of(ckpt_dir: Path, start_line: bool = False) -> dict | None:
    """The head record that names ``ckpt_dir`` (from its trainer_state.json); None for a
    checkpoint written before lineages were recorded, unless ``start_line`` (a resume from
    it: the line starts there)."""
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())["state"]
    lineage = [str(n) for n in state.get("lineage") or []]
    if not lineage:
        if not start_line:
            return None
        lineage = [ckpt_dir.name]
    return {"run_id": str(state.get("run_id") or ""), "checkpoint": ckpt_dir.name,
            "lineage": lineage, "written": time.time()}


def _parse(data: bytes) -> dict | None:
    try:
        head = json.loads(data)
        return {"run_id": str(head["run_id"]), "checkpoint": str(head["checkpoint"]),
                "lineage": [str(n) for n in head["lineage"]], "written": float(head["written"])}
    except (ValueError, KeyError, TypeError, RecursionError):
        return None  # a damaged head is no head: resume falls back to the newest checkpoint


def read_local(root: Path) -> dict | None:
    try:
        return _parse((root / HEAD).read_bytes())
    except OSError:
        return None


def read_remote(store: Store | None, prefix: str) -> dict | None:
    if store is None:
        return None
    try:
        return _parse(store.child(prefix).read_bytes(HEAD))
    except ObjectNotFound:
        return None


def advances(head: dict | None, record: dict) -> bool:
    """Whether ``record`` may become the head: it extends the head, or the head is stale."""
    return (head is None or head["run_id"] != record["run_id"]
            or head["checkpoint"] in record["lineage"])


def move_local(root: Path, record: dict | None, force: bool = False) -> bool:
    """Make ``record`` the local head if it advances it (``force``: a resume's fork)."""
    if record is None or not (force or advances(read_local(root), record)):
        return False
    atomic_write(root / HEAD, json.dumps(record))
    return True


def move_remote(store: Store, prefix: str, record: dict | None, force: bool = False) -> bool:
    """The same in the bucket, written after the checkpoint's own marker."""
    if record is None or not (force or advances(read_remote(store, prefix), record)):
        return False
    store.child(prefix).write_bytes(HEAD, json.dumps(record).encode())
    return True


def newest_head(root: Path, store: Store | None, prefix: str,
                log=print) -> dict | None:
    """The head to resume from: local or bucket, whichever extends the other (else the one
    written last, e.g. another VM continued the run from the bucket); None when neither
    exists (checkpoints from before heads were written)."""
    try:
        remote = read_remote(store, prefix)
    except StorageError as err:
        log(f"could not read {store.url}/{prefix}/{HEAD} ({err}); following the local head")
        remote = None
    local = read_local(root)
    if local is None or remote is None:
        return local or remote
    if local["checkpoint"] in remote["lineage"]:
        return remote
    if remote["checkpoint"] in local["lineage"]:
        return local
    return max(local, remote, key=lambda head: head["written"])


def marker_run_id(data: bytes) -> str:
    """The run id a checkpoint's marker records ('' for markers written before run ids)."""
    try:
        return str(json.loads(data).get("run_id") or "")
    except (ValueError, AttributeError, RecursionError):
        return ""


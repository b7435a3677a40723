"""Two-tier retention: the newest K checkpoints roll, every N-th step stays forever.

Real stores throughout: the session's fake-gcs-server and a plain directory used as a bucket.
Checkpoints are small real folders with a real manifest, uploaded file by file, marker last,
the way the publisher does it; an upload "cut short" is the same without its marker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from utils.checkpoint import MARKER, find_complete, prune, prune_remote, remote_complete
from utils.checkpoint.format import write_manifest
from utils.storage import LocalStore, Store, open_store

PREFIX = "checkpoints/run"
FILES = {"config.json": b"{}", "model.safetensors": b"w" * 64, "optimizer.pt": b"o" * 32,
         "trainer_state.json": b"{}"}


def _name(step: int) -> str:
    return f"checkpoint-epoch0-step{step}-files1"


def _local(root: Path, step: int) -> Path:
    """A complete local checkpoint: small files, then the marker (write_manifest)."""
    path = root / _name(step)
    path.mkdir(parents=True)
    for name, data in FILES.items():
        (path / name).write_bytes(data)
    write_manifest(path)
    return path


def _upload(store: Store, folder: Path, complete: bool = True) -> None:
    """Upload like the publisher: every file, then the marker last (none: cut short)."""
    target = store.child(f"{PREFIX}/{folder.name}")
    for name in FILES:
        target.upload_file(folder / name, name)
    if complete:
        target.upload_file(folder / MARKER, MARKER)


def _folders(store: Store) -> set[str]:
    """Every checkpoint folder with at least one object left, complete or not."""
    return {o.name.split("/")[0] for o in store.child(PREFIX).list()}


@pytest.fixture(params=["gcs", "dir"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The bucket (emulator) and a local directory store: both must behave the same."""
    if request.param == "gcs":
        return open_store(request.getfixturevalue("gcs_bucket"), retry_deadline_s=20)
    (tmp_path / "bucket").mkdir()
    return open_store(str(tmp_path / "bucket"))


@pytest.fixture
def local(tmp_path: Path) -> Path:
    """Complete local checkpoints at steps 100..1200, every 100."""
    root = tmp_path / "local"
    for step in range(100, 1300, 100):
        _local(root, step)
    return root


def test_newest_roll_and_multiples_stay_forever(store: Store, local: Path) -> None:
    for folder in find_complete(local):
        _upload(store, folder)
    doomed = prune_remote(store, PREFIX, 2, keep_every=500)
    survivors = [_name(s) for s in (500, 1000, 1100, 1200)]
    assert remote_complete(store, PREFIX) == survivors
    assert _folders(store) == set(survivors)  # no orphaned files left behind
    assert doomed == [_name(s) for s in range(100, 1000, 100) if s != 500]
    assert prune_remote(store, PREFIX, 2, keep_every=500) == []  # stable once pruned


def test_without_keep_every_only_the_newest_stay(store: Store, local: Path) -> None:
    for folder in find_complete(local)[-4:]:
        _upload(store, folder)
    prune_remote(store, PREFIX, 2)
    assert remote_complete(store, PREFIX) == [_name(1100), _name(1200)]


def test_keep_zero_prunes_nothing(store: Store, local: Path) -> None:
    for folder in find_complete(local)[:3]:
        _upload(store, folder)
    assert prune_remote(store, PREFIX, 0, keep_every=500) == []
    assert prune_remote(store, PREFIX, -1, keep_every=500) == []
    assert len(remote_complete(store, PREFIX)) == 3


def test_protected_and_unfinished_uploads(store: Store, local: Path) -> None:
    """Protected (still uploading) survives; of the cut-short uploads older than the newest K,
    the permanent one stays (catch-up finishes it), the others go; a newer one may be
    in flight and stays."""
    folders = {int(p.name.split("step")[1].split("-")[0]): p for p in find_complete(local)}
    for step in (100, 200, 600, 700, 900, 1100, 1200):
        _upload(store, folders[step])
    for step in (300, 400, 500, 1000):  # cut short: no marker
        _upload(store, folders[step], complete=False)
    extra = _local(local, 1250)
    _upload(store, extra, complete=False)  # newer than the oldest kept: maybe uploading now
    doomed = prune_remote(store, PREFIX, 2, protected={_name(200), _name(300)},
                          keep_every=500)
    assert doomed == [_name(s) for s in (100, 400, 600, 700, 900)]
    assert remote_complete(store, PREFIX) == [_name(s) for s in (200, 1100, 1200)]
    assert _folders(store) == {_name(s) for s in (200, 300, 500, 1000, 1100, 1200, 1250)}


def test_marker_goes_first(tmp_path: Path, local: Path) -> None:
    """A deletion cut short must leave an incomplete checkpoint, never a complete-looking one
    with files missing: each checkpoint's marker is deleted before its files."""
    deleted: list[str] = []

    class Recording(LocalStore):
        def child(self, prefix: str) -> Recording:
            return Recording(self.base, f"{self.prefix}/{prefix}".strip("/"))

        def delete(self, name: str) -> None:
            deleted.append(name)
            super().delete(name)

    (tmp_path / "bucket").mkdir()
    store = Recording(tmp_path / "bucket")
    for folder in find_complete(local)[:3]:
        _upload(store, folder)
    assert prune_remote(store, PREFIX, 1, keep_every=200) == [_name(100)]
    assert deleted[0] == f"{_name(100)}/{MARKER}"
    assert sorted(deleted[1:]) == [f"{_name(100)}/{n}" for n in sorted(FILES)]


def test_local_prune_keeps_multiples_too(local: Path) -> None:
    removed = prune(local, 2, protected={_name(300)}, keep_every=500)
    assert [p.name for p in removed] == [_name(s) for s in (100, 200, 400, 600, 700, 800, 900)]
    assert [p.name for p in find_complete(local)] == [_name(s)
                                                     for s in (300, 500, 1000, 1100, 1200)]
    assert sorted(p.name for p in local.iterdir()) == sorted(
        _name(s) for s in (300, 500, 1000, 1100, 1200))
    assert prune(local, 0, keep_every=500) == []

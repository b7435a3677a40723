"""The storage layer against real backends: a local directory and a real fake-gcs-server."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gcs_emulator import FaultProxy, GcsEmulator
from helpers import finish

from utils.storage import (
    CACHE_FILE,
    GcsStore,
    LocalStore,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ProgressFn,
    StorageError,
    Store,
    bytes_crc32c,
    file_crc32c,
    open_store,
    sync_down,
    sync_up,
)

REPO = Path(__file__).resolve().parent.parent
TREE = {
    "top.bin": 3000,
    "shards/train/00000.bin": 70_000,
    "shards/train/00001.bin": 65_536,
    "shards/val/00000.bin": 1234,
    "shards/val/deep/er/x.json": 17,
    "empty.txt": 0,
}


def _content(name: str, size: int) -> bytes:
    """Deterministic, name-dependent bytes so swapped files would be noticed."""
    seed = name.encode() * (size // max(len(name), 1) + 1)
    return bytes((b * 31 + i) % 251 for i, b in enumerate(seed[:size]))


def _make_tree(root: Path, tree: dict[str, int] = TREE) -> None:
    for name, size in tree.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_content(name, size))


def _parts(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".part-" in p.name]


@pytest.fixture(params=["local", "gcs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same contract runs against a local directory and the GCS emulator."""
    if request.param == "local":
        (tmp_path / "bucket").mkdir()
        return open_store(str(tmp_path / "bucket"))
    return open_store(request.getfixturevalue("gcs_bucket"), retry_deadline_s=5)


@pytest.fixture
def filled(store: Store, tmp_path: Path) -> Store:
    """A store holding TREE (uploaded with sync_up from a local tree)."""
    src = tmp_path / "src"
    _make_tree(src)
    sync_up(src, store, progress=False)
    return store


class Delegate(Store):
    """A real store seen through hooks, to act at exact moments (a concurrent writer, a crash)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url

    def child(self, prefix: str) -> Store:
        return self.inner.child(prefix)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        return self.inner.list(prefix)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def upload_file(
        self, local: Path, name: str, *, crc32c: str | None = None, if_absent: bool = False
    ) -> ObjectInfo:
        return self.inner.upload_file(local, name, crc32c=crc32c, if_absent=if_absent)

    def download_file(
        self,
        name: str,
        local: Path,
        *,
        expected: ObjectInfo | None = None,
        on_bytes: ProgressFn | None = None,
    ) -> None:
        self.inner.download_file(name, local, expected=expected, on_bytes=on_bytes)

    def read_bytes(self, name: str) -> bytes:
        return self.inner.read_bytes(name)

    def write_bytes(self, name: str, data: bytes, *, if_absent: bool = False,
                    if_version: str | None = None) -> str:
        return self.inner.write_bytes(name, data, if_absent=if_absent, if_version=if_version)

    def read_versioned(self, name: str) -> tuple[bytes, str]:
        return self.inner.read_versioned(name)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def check_access(self, write: bool = False) -> None:
        self.inner.check_access(write)


# ---------------------------------------------------------------- hashing


def test_file_crc32c_matches_gcs_encoding(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"123456789")
    assert file_crc32c(path) == "4waSgw=="  # the standard check value 0xE3069283, big-endian
    assert bytes_crc32c(b"hello") == "mnG7TA=="  # what GCS reports for b"hello"


# ---------------------------------------------------------------- the shared contract


def test_small_objects_round_trip(store: Store) -> None:
    store.write_bytes("dir/meta.json", b'{"step": 3}')
    assert store.exists("dir/meta.json")
    assert store.read_bytes("dir/meta.json") == b'{"step": 3}'
    store.write_bytes("dir/meta.json", b"v2")
    assert store.read_bytes("dir/meta.json") == b"v2"
    store.delete("dir/meta.json")
    assert not store.exists("dir/meta.json")
    store.delete("dir/meta.json")  # deleting twice is fine
    with pytest.raises(ObjectNotFound, match="dir/meta.json"):
        store.read_bytes("dir/meta.json")


def test_compare_and_swap_lets_one_of_two_writers_win(store: Store) -> None:
    """A write conditioned on the version read replaces the object only if nobody wrote in
    between: the run lease's renewal and takeover rest on this (a GCS generation match)."""
    first = store.write_bytes("lease.json", b"a", if_absent=True)
    data, version = store.read_versioned("lease.json")
    assert (data, version) == (b"a", first)
    second = store.write_bytes("lease.json", b"b", if_version=version)
    assert second != version and store.read_bytes("lease.json") == b"b"
    with pytest.raises(ObjectExists):  # a writer that read "a" lost the race
        store.write_bytes("lease.json", b"c", if_version=version)
    with pytest.raises(ObjectExists):
        store.write_bytes("lease.json", b"d", if_absent=True)
    assert store.read_versioned("lease.json") == (b"b", second)


def test_a_local_child_cannot_climb_out_of_its_bucket(tmp_path: Path) -> None:
    """``checkpoints/..`` would reach the bucket's training data; refused, not followed."""
    (tmp_path / "bucket").mkdir()
    store = open_store(str(tmp_path / "bucket"))
    for bad in ("..", "checkpoints/..", "a/../../b"):
        with pytest.raises(StorageError, match="not a safe relative path"):
            store.child(bad)
    assert store.child("checkpoints/run").url.endswith("bucket/checkpoints/run")


def test_list_is_recursive_with_sizes_and_hashes(filled: Store, tmp_path: Path) -> None:
    filled.write_bytes(".hidden/secret", b"x")
    filled.write_bytes("shards/.cache", b"x")
    infos = {o.name: o for o in filled.list()}
    assert set(infos) == set(TREE)
    for name, size in TREE.items():
        assert infos[name].size == size
        assert infos[name].crc32c == bytes_crc32c(_content(name, size))
    assert {o.name for o in filled.list("shards/val/")} == {
        "shards/val/00000.bin", "shards/val/deep/er/x.json"
    }
    assert {o.name for o in filled.list("shards/tr")} == {
        "shards/train/00000.bin", "shards/train/00001.bin"
    }


def test_child_store_names_are_relative(filled: Store) -> None:
    child = filled.child("shards/val")
    assert child.url.rstrip("/").endswith("shards/val")
    assert {o.name for o in child.list()} == {"00000.bin", "deep/er/x.json"}
    child.write_bytes("new.txt", b"n")
    assert filled.read_bytes("shards/val/new.txt") == b"n"


def test_upload_and_download_verify(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(200_000))
    info = store.upload_file(src, "ckpt/model.bin")
    assert info == ObjectInfo("ckpt/model.bin", 200_000, file_crc32c(src), info.md5)
    seen: list[int] = []
    out = tmp_path / "out" / "a" / "b" / "model.bin"
    store.download_file("ckpt/model.bin", out, on_bytes=seen.append)
    assert out.read_bytes() == src.read_bytes()
    assert sum(seen) >= 200_000
    assert not _parts(tmp_path / "out")


def test_download_with_wrong_hash_never_reaches_final_name(store: Store, tmp_path: Path) -> None:
    store.write_bytes("data.bin", b"good bytes")
    info = store.list()[0]
    wrong = ObjectInfo(info.name, info.size, "AAAAAA==", None)
    final = tmp_path / "dl" / "data.bin"
    with pytest.raises(StorageError, match="crc32c"):
        store.download_file("data.bin", final, expected=wrong)
    assert not final.exists()
    final.write_bytes(b"old local")
    with pytest.raises(StorageError, match="data.bin"):
        store.download_file("data.bin", final, expected=wrong)
    assert final.read_bytes() == b"old local"
    assert not _parts(tmp_path / "dl")


def test_object_changed_between_list_and_download(store: Store, tmp_path: Path) -> None:
    store.write_bytes("shard.bin", b"A" * 1000)
    listed = store.list()[0]
    store.write_bytes("shard.bin", b"B" * 1000)  # same size, new content
    final = tmp_path / "shard.bin"
    with pytest.raises(StorageError, match="changed"):
        store.download_file("shard.bin", final, expected=listed)
    assert not final.exists()
    assert not _parts(tmp_path)


def test_missing_object_download(store: Store, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound, match="nope.bin"):
        store.download_file("nope.bin", tmp_path / "nope.bin")
    assert not list(tmp_path.glob("*nope*"))


def test_if_absent_writes_never_replace(store: Store, tmp_path: Path) -> None:
    store.write_bytes("ckpt/COMPLETE.json", b"first", if_absent=True)
    with pytest.raises(ObjectExists, match="ckpt/COMPLETE.json already exists") as err:
        store.write_bytes("ckpt/COMPLETE.json", b"second", if_absent=True)
    assert "\n" not in str(err.value) and store.url in str(err.value)
    assert store.read_bytes("ckpt/COMPLETE.json") == b"first"
    store.write_bytes("ckpt/COMPLETE.json", b"third")  # the default still replaces
    assert store.read_bytes("ckpt/COMPLETE.json") == b"third"

    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(os.urandom(70_000))
    second.write_bytes(os.urandom(70_000))
    info = store.upload_file(first, "ckpt/model.bin", if_absent=True)
    assert info.crc32c == file_crc32c(first)
    with pytest.raises(ObjectExists, match="ckpt/model.bin already exists"):
        store.upload_file(second, "ckpt/model.bin", if_absent=True)
    out = tmp_path / "out.bin"
    store.download_file("ckpt/model.bin", out)
    assert out.read_bytes() == first.read_bytes()
    assert {o.name for o in store.list()} == {"ckpt/COMPLETE.json", "ckpt/model.bin"}
    store.upload_file(second, "ckpt/model.bin")
    store.download_file("ckpt/model.bin", out)
    assert out.read_bytes() == second.read_bytes()
    if isinstance(store, LocalStore):
        assert not _parts(store.root)  # the losing writes left no temporaries


def test_if_absent_large_upload_sends_the_precondition(
    gcs_bucket: str, fault_proxy: Callable[[list[str], str], FaultProxy], tmp_path: Path
) -> None:
    """Over 8 MiB the client starts a resumable upload; the precondition must go with it.

    fake-gcs-server ignores ifGenerationMatch on resumable uploads (it answers 412 only for
    single-request ones), so this checks what reaches the server: real GCS enforces it.
    """
    proxy = fault_proxy([], "none")
    store = open_store(gcs_bucket, retry_deadline_s=10)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 2**20))
    store.upload_file(big, "ckpt/big.bin", if_absent=True)
    starts = [r for r in proxy.requests if r.startswith("POST ") and "uploadType=resumable" in r]
    assert len(starts) == 1 and "ifGenerationMatch=0" in starts[0]
    store.upload_file(big, "ckpt/big.bin")
    starts = [r for r in proxy.requests if r.startswith("POST ") and "uploadType=resumable" in r]
    assert len(starts) == 2 and "ifGenerationMatch" not in starts[1]  # default: replace


def test_if_absent_races_have_one_winner(tmp_path: Path) -> None:
    """Eight threads create the same local object at once: exactly one write lands."""
    store = LocalStore(tmp_path)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        barrier.wait()
        try:
            store.write_bytes("marker", str(i).encode(), if_absent=True)
            outcomes.append(f"won {i}")
        except ObjectExists:
            outcomes.append("lost")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("lost") == 7
    assert store.read_bytes("marker") == winners[0].split()[1].encode()
    assert not _parts(tmp_path)


def test_check_access(store: Store) -> None:
    store.check_access()
    store.check_access(write=True)
    assert store.list() == []  # the write probe cleans up after itself


# ---------------------------------------------------------------- sync down


def test_sync_nested_tree_then_resync_is_free(filled: Store, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    first = sync_down(filled, dest, progress=False)
    assert (first.transferred, first.skipped, first.failed) == (len(TREE), 0, [])
    assert first.transferred_bytes == sum(TREE.values())
    assert first.hashed == 0  # downloads are verified, their hashes go straight to the cache
    for name, size in TREE.items():
        assert (dest / name).read_bytes() == _content(name, size)
    assert (dest / CACHE_FILE).is_file() and not _parts(dest)
    before = {n: (dest / n).stat() for n in TREE}

    second = sync_down(filled, dest, progress=False)
    assert (second.transferred, second.transferred_bytes, second.skipped) == (0, 0, len(TREE))
    assert second.hashed == 0
    assert second.summary("downloaded") == f"downloaded 0 (0.0 MB), skipped {len(TREE)}, failed 0"
    for n, st in before.items():
        after = (dest / n).stat()
        assert (after.st_ino, after.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)

    verified = sync_down(filled, dest, progress=False, verify=True)
    assert (verified.transferred, verified.skipped, verified.hashed) == (0, len(TREE), len(TREE))


def test_corrupt_cache_only_costs_rehashing(filled: Store, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    sync_down(filled, dest, progress=False)
    (dest / CACHE_FILE).write_text('{"version": 1, "files": {"top.bin": [3000]}} trailing')
    again = sync_down(filled, dest, progress=False)
    assert (again.transferred, again.skipped, again.hashed) == (0, len(TREE), len(TREE))
    assert sync_down(filled, dest, progress=False).hashed == 0  # the cache was rewritten


def test_changed_local_files_are_downloaded_again(filled: Store, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    sync_down(filled, dest, progress=False)
    truncated = dest / "shards/train/00000.bin"
    truncated.write_bytes(truncated.read_bytes()[:100])
    altered = dest / "shards/train/00001.bin"
    data = bytearray(altered.read_bytes())
    data[500] ^= 0xFF
    altered.write_bytes(bytes(data))
    result = sync_down(filled, dest, progress=False)
    assert (result.transferred, result.skipped, result.failed) == (2, len(TREE) - 2, [])
    assert result.hashed == 1  # only the same-size file needed hashing to decide
    assert truncated.read_bytes() == _content("shards/train/00000.bin", 70_000)
    assert altered.read_bytes() == _content("shards/train/00001.bin", 65_536)


def test_verify_catches_change_hidden_from_the_cache(filled: Store, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    sync_down(filled, dest, progress=False)
    path = dest / "top.bin"
    st = path.stat()
    path.write_bytes(b"x" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: cache trusts it
    assert sync_down(filled, dest, progress=False).transferred == 0
    result = sync_down(filled, dest, progress=False, verify=True)
    assert result.transferred == 1
    assert path.read_bytes() == _content("top.bin", 3000)


def test_max_files_prefix_and_dry_run(filled: Store, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dry = sync_down(filled, dest, "shards/", dry_run=True, progress=False)
    assert dry.transferred == 4 and dry.summary("download").startswith("dry run: would have")
    assert not dest.exists()
    some = sync_down(filled, dest, "shards/", max_files=2, progress=False)
    assert some.transferred == 2
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.bin"))
    assert files == ["shards/train/00000.bin", "shards/train/00001.bin"]


def test_empty_or_mistyped_prefix_is_an_error(filled: Store, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(StorageError) as err:
        sync_down(filled, dest, "shardz/", progress=False)
    message = str(err.value)
    assert "\n" not in message and f"{filled.url}/shardz/" in message
    assert "no objects" in message and "check the bucket URL and prefix" in message
    assert f"{filled.url}/shards/" in message and f"{filled.url}/top.bin" in message
    assert not dest.exists()

    # The URL form (gs://B/trainng): the listing is of the parent level, here the root.
    with pytest.raises(StorageError, match="no objects") as err:
        sync_down(filled.child("shards/trian"), dest, progress=False)
    assert f"{filled.url}/shards/train/" in str(err.value)

    # An existing, non-empty local folder does not make an empty remote look like success.
    _make_tree(dest, {"mine.txt": 10})
    before = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*"))
    with pytest.raises(StorageError, match="no objects"):
        sync_down(filled, dest, "nothing-here/", progress=False)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == before


def test_empty_bucket_is_an_error(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no objects under this prefix") as err:
        sync_down(store, tmp_path / "dest", progress=False)
    assert "found instead" not in str(err.value)


def _plant(path: Path, size: int, age_s: float) -> Path:
    """A file of size bytes whose mtime is age_s seconds ago (negative: in the future)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"p" * size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_sync_removes_stale_temporaries_only(filled: Store, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    stale = [
        _plant(dest / ".top.bin.part-0123abcd", 3000, 3600),
        _plant(dest / "shards/train/.00000.bin.part-deadbeef", 50_000, 60),
        _plant(dest / "..sync-cache.json.part-00ff00ff", 100, 5),
    ]
    kept = [
        _plant(dest / ".top.bin.part-0123abcd9", 10, 3600),  # not 8 hex digits
        _plant(dest / ".notes.part-xyzxyzxy", 10, 3600),
        _plant(dest / "top.part-12345678", 10, 3600),  # not hidden: someone's file
        _plant(dest / ".hidden/.x.bin.part-12345678", 10, 3600),  # hidden folder: not ours
        _plant(dest / ".empty.txt.part-cafef00d", 10, -30),  # written since the sync began
        _plant(tmp_path / "elsewhere/.top.bin.part-0123abcd", 10, 3600),  # not under dest
    ]
    dry = sync_down(filled, dest, dry_run=True, progress=False)
    assert (dry.cleaned, dry.cleaned_bytes) == (3, 53_100)
    assert all(p.exists() for p in stale)  # a dry run changes nothing

    result = sync_down(filled, dest, progress=False)
    assert (result.transferred, result.failed) == (len(TREE), [])
    assert (result.cleaned, result.cleaned_bytes) == (3, 53_100)
    assert result.summary("downloaded").endswith(
        "failed 0, removed 3 stale temporary file(s) of interrupted syncs (0.1 MB freed)"
    )
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    again = sync_down(filled, dest, progress=False)
    assert again.cleaned == 0 and "removed" not in again.summary("downloaded")


def test_sync_leaves_a_concurrent_syncs_temporaries(filled: Store, tmp_path: Path) -> None:
    """Another process syncing into the same folder holds the lock: its files are in use."""
    import fcntl

    from utils.storage.sync import LOCK_FILE

    dest = tmp_path / "dest"
    busy = _plant(dest / "shards/.00000.bin.part-0badf00d", 1000, 120)
    with open(dest / LOCK_FILE, "a+b") as other:
        fcntl.flock(other, fcntl.LOCK_SH)  # what a running sync holds
        result = sync_down(filled, dest, progress=False)
    assert result.cleaned == 0 and busy.exists()
    assert sync_down(filled, dest, progress=False).cleaned == 1 and not busy.exists()


def test_sync_never_deletes_and_reports_conflicts(filled: Store, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / "mine").mkdir(parents=True)
    (dest / "mine" / "notes.txt").write_text("keep me")
    (dest / "top.bin").mkdir()  # a directory where the bucket has a file
    (dest / "top.bin" / "inside.txt").write_text("keep me too")
    result = sync_down(filled, dest, progress=False)
    assert len(result.failed) == 1 and result.failed[0].startswith("top.bin: ")
    assert "not a regular file" in result.failed[0]
    assert result.transferred == len(TREE) - 1
    assert (dest / "mine" / "notes.txt").read_text() == "keep me"
    assert (dest / "top.bin" / "inside.txt").read_text() == "keep me too"


def test_sync_refuses_unsafe_object_names(gcs_bucket: str, tmp_path: Path) -> None:
    store = open_store(gcs_bucket, retry_deadline_s=5)
    store.write_bytes("a//b", b"x")
    store.write_bytes("ok.txt", b"y")
    result = sync_down(store, tmp_path / "dest", progress=False)
    assert result.transferred == 1
    assert result.failed and "not a safe relative path" in result.failed[0]


class ChangesAfterList(Delegate):
    """Another writer replaces an object right after our listing."""

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        infos = self.inner.list(prefix)
        self.inner.write_bytes("top.bin", b"Z" * 3000)
        return infos


def test_sync_object_changed_after_listing(filled: Store, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    result = sync_down(ChangesAfterList(filled), dest, progress=False)
    assert len(result.failed) == 1 and result.failed[0].startswith("top.bin: ")
    assert not (dest / "top.bin").exists()
    assert not _parts(dest)
    again = sync_down(filled, dest, progress=False)  # the next run picks up the new version
    assert again.transferred == 1 and (dest / "top.bin").read_bytes() == b"Z" * 3000


# ---------------------------------------------------------------- sync up


def test_sync_up_skips_existing(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    (src / ".top.bin.part-1234").write_text("half")
    first = sync_up(src, store, "runs/r1", progress=False)
    assert (first.transferred, first.skipped, first.failed) == (len(TREE), 0, [])
    assert {o.name for o in store.list()} == {f"runs/r1/{n}" for n in TREE}
    second = sync_up(src, store, "runs/r1", progress=False)
    assert (second.transferred, second.skipped, second.hashed) == (0, len(TREE), 0)
    (src / "top.bin").write_bytes(b"new content")
    third = sync_up(src, store, "runs/r1", progress=False)
    assert (third.transferred, third.skipped) == (1, len(TREE) - 1)
    assert store.read_bytes("runs/r1/top.bin") == b"new content"


# ---------------------------------------------------------------- faults


class CrashesServer(Delegate):
    """Kills the emulator just before the Nth download; a thread restarts it after a pause."""

    def __init__(self, inner: Store, emulator: GcsEmulator, at: int, down_s: float) -> None:
        super().__init__(inner)
        self.emulator, self.at, self.down_s = emulator, at, down_s
        self.calls = 0
        self.restarted = threading.Event()
        self._lock = threading.Lock()

    def download_file(
        self,
        name: str,
        local: Path,
        *,
        expected: ObjectInfo | None = None,
        on_bytes: ProgressFn | None = None,
    ) -> None:
        with self._lock:
            self.calls += 1
            crash = self.calls == self.at
        if crash:
            self.emulator.kill()
            if self.down_s > 0:
                threading.Thread(target=self._restart, daemon=True).start()
        super().download_file(name, local, expected=expected, on_bytes=on_bytes)

    def _restart(self) -> None:
        time.sleep(self.down_s)
        self.emulator.start()
        self.restarted.set()


@pytest.fixture
def fs_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GcsEmulator:
    """A private emulator on the filesystem backend, so objects survive a kill."""
    emulator = GcsEmulator(tmp_path / "fs-emulator", backend="filesystem")
    emulator.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    yield emulator
    emulator.stop()


def _fill_many(store: Store, tmp_path: Path, n: int, size: int) -> None:
    src = tmp_path / "many"
    for i in range(n):
        path = src / f"d{i % 3}" / f"{i:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    assert sync_up(src, store, progress=False).transferred == n


def test_emulator_restart_mid_sync_completes(fs_emulator: GcsEmulator, tmp_path: Path) -> None:
    store = open_store(fs_emulator.create_bucket("restart-bucket"), retry_deadline_s=30)
    _fill_many(store, tmp_path, 40, 50_000)
    crashing = CrashesServer(store, fs_emulator, at=10, down_s=1.5)
    dest = tmp_path / "dest"
    result = sync_down(crashing, dest, workers=4, progress=False)
    assert crashing.restarted.is_set()
    assert (result.transferred, result.failed) == (40, [])
    for info in store.list():
        assert file_crc32c(dest / info.name) == info.crc32c
    assert not _parts(dest)


def test_server_gone_fails_fast_and_keeps_local_files(
    fs_emulator: GcsEmulator, tmp_path: Path
) -> None:
    store = open_store(fs_emulator.create_bucket("gone-bucket"), retry_deadline_s=2)
    _fill_many(store, tmp_path, 30, 1000)
    dest = tmp_path / "dest"
    (dest / "d0").mkdir(parents=True)
    (dest / "d0" / "0000.bin").write_bytes(b"stale local copy")
    start = time.monotonic()
    result = sync_down(CrashesServer(store, fs_emulator, at=1, down_s=0), dest, workers=2,
                       progress=False)
    assert time.monotonic() - start < 15  # one retry deadline, not one per file
    assert result.transferred == 0 and len(result.failed) == 30
    assert any("still failing after retrying for 2 s" in f for f in result.failed)
    assert any("not attempted" in f for f in result.failed)
    assert (dest / "d0" / "0000.bin").read_bytes() == b"stale local copy"
    assert not _parts(dest)


@pytest.fixture
def fault_proxy(
    gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[list[str], str], FaultProxy]]:
    """Route the client through a FaultProxy: make(faults, match) -> proxy."""
    proxies: list[FaultProxy] = []

    def make(faults: list[str], match: str) -> FaultProxy:
        proxy = FaultProxy(gcs_emulator.url, faults, match)
        proxy.start()
        proxies.append(proxy)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


def test_transient_errors_are_retried(
    gcs_bucket: str, fault_proxy: Callable[[list[str], str], FaultProxy], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    _make_tree(src)
    sync_up(src, open_store(gcs_bucket), progress=False)
    # The listing gets a 503, then downloads get a reset connection and another 503.
    proxy = fault_proxy(["503", "reset", "503"], "/b/")
    store = open_store(gcs_bucket, retry_deadline_s=20)
    result = sync_down(store, tmp_path / "dest", workers=2, progress=False)
    assert proxy.served == ["503", "reset", "503"]
    assert (result.transferred, result.failed) == (len(TREE), [])
    for name, size in TREE.items():
        assert (tmp_path / "dest" / name).read_bytes() == _content(name, size)


def test_permanent_errors_are_not_retried(
    gcs_bucket: str, fault_proxy: Callable[[list[str], str], FaultProxy], tmp_path: Path
) -> None:
    open_store(gcs_bucket).write_bytes("a.bin", b"a")
    open_store(gcs_bucket).write_bytes("b.bin", b"b")
    fault_proxy(["403"], "alt=media")
    store = open_store(gcs_bucket, retry_deadline_s=60)
    start = time.monotonic()
    result = sync_down(store, tmp_path / "dest", workers=1, progress=False)
    assert time.monotonic() - start < 10
    assert result.transferred == 1 and len(result.failed) == 1
    assert result.failed[0].startswith("a.bin: ") and "access denied (403)" in result.failed[0]
    assert gcs_bucket in result.failed[0] and "\n" not in result.failed[0]
    fault_proxy(["403"], "/o")
    with pytest.raises(StorageError, match="access denied") as err:
        sync_down(open_store(gcs_bucket), tmp_path / "dest", progress=False)
    assert gcs_bucket in str(err.value)


def test_upload_restarts_when_the_server_loses_the_session(
    fs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bucket = fs_emulator.create_bucket("resumable-bucket")
    # The emulator restarts between starting a resumable upload and sending its bytes.
    proxy = FaultProxy(fs_emulator.url, [fs_emulator.restart], match="upload_id")
    proxy.start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        store = open_store(bucket, retry_deadline_s=20)
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(9 * 2**20))  # over 8 MiB: a resumable upload
        info = store.upload_file(big, "ckpt/big.bin")
        listed = store.list()
    finally:
        proxy.stop()
    assert len(proxy.served) == 1
    assert info.crc32c == file_crc32c(big) and info.size == 9 * 2**20
    assert [(o.name, o.crc32c) for o in listed] == [("ckpt/big.bin", info.crc32c)]


def test_missing_bucket_is_one_clear_line(gcs_bucket: str) -> None:
    store = open_store("gs://no-such-bucket-here", retry_deadline_s=5)
    with pytest.raises(StorageError) as err:
        store.list()
    message = str(err.value)
    assert "\n" not in message
    assert "gs://no-such-bucket-here" in message and "does not exist" in message
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        store.check_access()


# ---------------------------------------------------------------- opening stores


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert open_store(f"file://{tmp_path}").url == str(tmp_path)
    assert open_store("rel").url == str(tmp_path / "rel")
    assert open_store("file://rel").url == str(tmp_path / "rel")
    with pytest.raises(StorageError, match="unsupported storage URL scheme"):
        open_store("s3://bucket/x")
    with pytest.raises(StorageError, match="not a valid bucket name"):
        open_store("gs://Bad_Bucket!")
    with pytest.raises(StorageError, match="does not exist"):
        open_store(str(tmp_path / "missing")).list()


def test_gcs_store_url_and_child(gcs_bucket: str) -> None:
    store = open_store(f"{gcs_bucket}/runs/")
    assert isinstance(store, GcsStore)
    assert store.url == f"{gcs_bucket}/runs"
    assert store.child("r1/ckpt-10").url == f"{gcs_bucket}/runs/r1/ckpt-10"


SECRET = "do-not-print-this-refresh-token"


def _key_file(path: Path, mode: int) -> Path:
    path.write_text(json.dumps({
        "type": "authorized_user", "client_id": "id.apps.example", "client_secret": "s",
        "refresh_token": SECRET,
    }))
    path.chmod(mode)
    return path


def test_key_file_readable_by_others_warns_without_contents(
    gcs_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = _key_file(tmp_path / "key.json", 0o644)
    with caplog.at_level(logging.WARNING, logger="utils.storage"):
        store = open_store(gcs_bucket, credentials=str(key))
    assert str(key) in caplog.text and "chmod 600" in caplog.text
    assert SECRET not in caplog.text
    store.write_bytes("x", b"1")  # the emulator still answers (it takes no credentials)
    caplog.clear()
    key.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="utils.storage"):
        open_store(gcs_bucket, credentials=str(key))
    assert "chmod" not in caplog.text


def test_key_named_in_config_is_found_under_credentials_dir(
    gcs_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import utils.storage.credentials

    creds_dir = tmp_path / "credentials"
    creds_dir.mkdir()
    _key_file(creds_dir / "svc.json", 0o600)
    monkeypatch.setattr(utils.storage.credentials, "CREDENTIALS_DIR", creds_dir)
    monkeypatch.chdir(tmp_path / "..")  # not resolvable relative to the cwd
    with caplog.at_level(logging.WARNING, logger="utils.storage"):
        store = open_store(gcs_bucket, credentials="svc.json")
    store.write_bytes("k", b"v")
    assert store.read_bytes("k") == b"v" and not caplog.text


def test_bad_key_files_name_the_path(gcs_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"nope.json \(from --credentials\) not found"):
        open_store(gcs_bucket, credentials="nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "service_account", "private_key": "' + SECRET + '"}')
    broken.chmod(0o600)
    with pytest.raises(StorageError) as err:
        open_store(gcs_bucket, credentials=str(broken))
    assert str(broken) in str(err.value) and SECRET not in str(err.value)


def test_local_store_does_not_import_the_gcs_client(tmp_path: Path) -> None:
    """GPU machines have no google-cloud-storage: local stores must not need it."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f.txt").write_text("x")
    code = (
        "import sys; from utils.storage import open_store, sync_down; "
        f"s = open_store({str(tmp_path / 'b')!r}); "
        f"r = sync_down(s, {str(tmp_path / 'd')!r}, progress=False); "
        "assert r.transferred == 1, r; "
        "assert not [m for m in sys.modules if m.startswith('google.cloud')], 'imported'"
    )
    proc = finish(
        [sys.executable, "-c", code], cwd=REPO)
    assert proc.returncode == 0, proc.stderr

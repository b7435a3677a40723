"""Streaming: block order, the shard table from a listing, and the bounded shard cache against
a local store and the real GCS emulator (outages, corruption, the cache limit)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gcs_emulator import GcsEmulator

from utils.data import TokenWindows, find_shards, train_eval_split
from utils.data.blocks import block_order, shard_schedule
from utils.errors import DataError
from utils.storage import LocalStore, Store, open_store, sync_up
from utils.streaming import (
    INDEX_NAME,
    RemoteShard,
    ShardCache,
    ShardWait,
    StopWatch,
    WaitStopped,
    minimum_bytes,
    remote_shards,
    stream_windows,
)
from utils.streaming.cache import STOP_NAME
from utils.streaming.index import METADATA_LIMIT_BYTES

SEQ = 32
BLOCK, PREFETCH, BATCH = 2, 2, 16


# ---------------------------------------------------------------- data and stores


def make_dataset(root: Path, n: int = 26, seed: int = 0) -> Path:
    """n shards of ~16 KB in nested folders: 1-D and 2-D .npy, and uint32 .bin whose dtype
    comes from a dataset.json; every token distinct per shard so misreads show."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = f"part{i % 3}"
        if i % 5 == 4:
            tokens = rng.integers(0, 100_000, int(rng.integers(3000, 4200)), dtype=np.uint32)
            path = root / "wide" / sub / f"s{i:03d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            tokens.tofile(path)
            continue
        tokens = rng.integers(0, 60_000, int(rng.integers(6000, 8400)), dtype=np.uint16)
        if i % 7 == 3:
            tokens = tokens[: len(tokens) // 40 * 40].reshape(-1, 40)
        path = root / sub / f"s{i:03d}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, tokens)
    (root / "wide").mkdir(exist_ok=True)
    (root / "wide" / "dataset.json").write_text(json.dumps({"dtype": "uint32"}))
    (root / "dataset.json").write_text(json.dumps({"vocab_size": 100_000}))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("streaming") / "src")


@pytest.fixture(scope="module")
def reference(dataset: Path) -> TokenWindows:
    """The same shards read as synced files: what streaming must reproduce exactly."""
    return TokenWindows(find_shards(dataset), SEQ, root=dataset)


@pytest.fixture(params=["local", "gcs"])
def store(request: pytest.FixtureRequest, dataset: Path, tmp_path: Path) -> Store:
    if request.param == "local":
        (tmp_path / "bucket").mkdir()
        bucket = open_store(str(tmp_path / "bucket"))
    else:
        bucket = open_store(request.getfixturevalue("gcs_bucket"), retry_deadline_s=5)
    sync_up(dataset, bucket, progress=False)
    return bucket


@pytest.fixture
def gcs_store(gcs_bucket: str, dataset: Path) -> Store:
    bucket = open_store(gcs_bucket, retry_deadline_s=5)
    sync_up(dataset, bucket, progress=False)
    return bucket


class DiskMeter:
    """Samples the bytes of every file under a folder every 2 ms (temporaries and markers
    included), in a thread: the peak the cache must keep under its limit."""

    def __init__(self, root: Path) -> None:
        self.root, self.peak = root, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self) -> int:
        total = 0
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    pass  # removed while we walked
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._size())
            time.sleep(0.002)

    def __enter__(self) -> DiskMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Stream:
    """A ShardCache plus the windows it serves, over one block order: what the loop builds."""

    def __init__(self, store: Store, root: Path, *, limit: int | None, seed: int = 0,
                 pinned: tuple[int, ...] = (), logs: list[str] | None = None,
                 epoch: int = 0, shards: list[RemoteShard] | None = None,
                 offset: int = 0, read_ahead: int = 2 * BATCH,
                 vocab_size: int | None = None) -> None:
        self.root = root
        self.shards = remote_shards(store, root) if shards is None else shards
        self.windows = stream_windows(self.shards, SEQ, root)
        self.counts = self.windows.shard_windows
        self.cum = np.concatenate([[0], np.cumsum(self.counts)])
        self.train, _ = train_eval_split(len(self.windows), 16, seed)
        self.seed = seed
        self.logs = [] if logs is None else logs
        self.cache = ShardCache(
            store, root, self.shards, limit_bytes=limit, prefetch=PREFETCH, block_shards=BLOCK,
            schedule=self.schedule, margin_windows=BATCH, read_ahead_windows=read_ahead,
            pinned=pinned, position=(epoch, offset), log=self.logs.append,
            vocab_size=vocab_size)

    def order(self, epoch: int) -> np.ndarray:
        return block_order(self.counts, self.train, self.seed, epoch, BLOCK)

    def schedule(self, epoch: int) -> list[tuple[int, int, int]]:
        return shard_schedule(self.order(epoch), self.cum)

    def consume(self, epoch: int, reference: TokenWindows,
                at_step: Callable[[int], None] | None = None) -> int:
        """Train through one epoch: a 'worker' (a pickled copy) reads one batch ahead of
        the loop, as a DataLoader does; every window must equal the synced one."""
        order = self.order(epoch)
        worker = pickle.loads(pickle.dumps(self.windows))
        steps = len(order) // BATCH
        for step in range(steps):
            if at_step is not None:
                at_step(step)
            ahead = order[min(step + 1, steps - 1) * BATCH:][:BATCH]
            for i in ahead:
                np.testing.assert_array_equal(worker[int(i)], reference[int(i)])
            for i in order[step * BATCH:(step + 1) * BATCH]:
                np.testing.assert_array_equal(self.windows[int(i)], reference[int(i)])
            self.cache.set_position(epoch, (step + 1) * BATCH)
        self.cache.set_position(epoch + 1, 0)
        return steps

    def close(self) -> None:
        start = time.monotonic()
        self.cache.close()
        assert time.monotonic() - start < 2, "close() must not hang"


def _limit_for(shards: list[RemoteShard], pinned: tuple[int, ...] = ()) -> int:
    return minimum_bytes([r.size for r in shards], pinned, BLOCK, PREFETCH)


# ---------------------------------------------------------------- block order


def test_block_order_is_a_deterministic_permutation_local_in_shards() -> None:
    counts = np.random.default_rng(1).integers(0, 40, 23)
    cum = np.concatenate([[0], np.cumsum(counts)])
    train, held_out = train_eval_split(int(cum[-1]), 30, seed=5)
    order = block_order(counts, train, 5, 3, 4)
    assert sorted(order.tolist()) == train.tolist()  # every training window once...
    assert not set(order.tolist()) & set(held_out.tolist())  # ...and no held-out one
    np.testing.assert_array_equal(order, block_order(counts, train, 5, 3, 4))
    mask = np.zeros(int(cum[-1]), bool)
    mask[train] = True
    np.testing.assert_array_equal(order, block_order(counts, mask, 5, 3, 4))
    assert not np.array_equal(order, block_order(counts, train, 5, 4, 4))  # epochs differ
    shard_of = np.searchsorted(cum, order, side="right") - 1
    perm = np.random.default_rng([5, 3, 2]).permutation(len(counts))
    start = 0
    for b in range(0, len(perm), 4):  # block by block: windows of the block's shards only
        block = perm[b:b + 4]
        n = sum(int(mask[cum[k]:cum[k + 1]].sum()) for k in block)
        assert set(shard_of[start:start + n].tolist()) <= set(block.tolist())
        start += n
    assert start == len(order)


def test_shard_schedule_first_and_last_use() -> None:
    counts = np.array([5, 0, 7, 3, 9])
    cum = np.concatenate([[0], np.cumsum(counts)])
    order = block_order(counts, np.arange(int(cum[-1])), 0, 0, 2)
    sched = shard_schedule(order, cum)
    shard_of = np.searchsorted(cum, order, side="right") - 1
    assert [k for k, _, _ in sched] == list(dict.fromkeys(shard_of.tolist()))
    for k, first, last in sched:
        hits = np.flatnonzero(shard_of == k)
        assert (first, last) == (hits[0], hits[-1])
    assert shard_schedule(np.zeros(0, np.int64), cum) == []
    with pytest.raises(DataError, match="block_shards=0"):
        block_order(counts, np.arange(3), 0, 0, 0)


# ---------------------------------------------------------------- the shard table


def test_read_range(store: Store) -> None:
    name = next(o.name for o in store.list() if o.name.endswith(".npy"))
    data = store.read_bytes(name)
    assert store.read_range(name, 0, 64) == data[:64]
    assert store.read_range(name, 100, 50) == data[100:150]
    assert store.read_range(name, len(data) - 5, 100) == data[-5:]


class CountingStore(LocalStore):
    """A local store counting ranged reads and downloads (a restart must make none)."""

    ranges = downloads = 0

    def read_range(self, name: str, start: int, length: int) -> bytes:
        self.ranges += 1
        return super().read_range(name, start, length)

    def download_file(self, name: str, local: Path, **kw: Any) -> None:
        self.downloads += 1
        super().download_file(name, local, **kw)


def test_remote_shards_match_find_shards_without_downloading(
    store: Store, dataset: Path, reference: TokenWindows, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    shards = remote_shards(store, root)
    assert [r.name for r in shards] == [p.relative_to(dataset).as_posix()
                                        for p in find_shards(dataset)]
    for r, ref in zip(shards, reference._shards, strict=True):
        assert r.shard.path == root / r.name
        assert (r.shard.dtype, r.shard.shape, r.shard.fortran, r.shard.offset) == (
            ref.dtype, ref.shape, ref.fortran, ref.offset)
    assert not any(r.shard.path.exists() for r in shards)  # no shard was downloaded...
    assert json.loads((root / "wide" / "dataset.json").read_text()) == {"dtype": "uint32"}
    assert (root / INDEX_NAME).is_file()  # ...but the small files were, and headers cached
    windows = stream_windows(shards, SEQ, root)
    assert len(windows) == len(reference)
    np.testing.assert_array_equal(windows.shard_windows, reference.shard_windows)


def test_restart_costs_one_listing_and_limits_apply(tmp_path: Path, dataset: Path) -> None:
    (tmp_path / "bucket").mkdir()
    inner = open_store(str(tmp_path / "bucket"))
    sync_up(dataset, inner, progress=False)
    root = tmp_path / "cache"
    first = CountingStore(tmp_path / "bucket")
    assert len(remote_shards(first, root)) == 26
    assert first.ranges == 21 and first.downloads == 2  # .npy headers; the dataset.json files
    again = CountingStore(tmp_path / "bucket")
    assert [r.shard for r in remote_shards(again, root)] == [
        r.shard for r in remote_shards(first, root)]
    assert (again.ranges, again.downloads) == (0, 0)
    assert [r.name for r in remote_shards(inner, root, max_files=3)] == [
        "part0/s000.npy", "part0/s003.npy", "part0/s006.npy"]  # sorted as find_shards does
    (tmp_path / "bucket" / "z.npz").write_bytes(b"PK")
    with pytest.raises(DataError) as err:
        remote_shards(inner, root)
    assert str(err.value) == (
        f"streaming reads .npy and .bin shards; {inner.url}/z.npz is .npz: convert it or use "
        "--sync-data")


def test_only_the_metadata_is_fetched_besides_shards(tmp_path: Path, dataset: Path) -> None:
    """dataset.json files and the tokenizer folder the top one names come down; a 20 MB
    archive next to the shards stays in the bucket (it would sit outside --cache-limit-gb);
    metadata past the bound is one line naming the largest file."""
    bucket = tmp_path / "bucket"
    shutil.copytree(dataset, bucket)
    (bucket / "dataset.json").write_text(json.dumps({"vocab_size": 100_000, "tokenizer": "tok"}))
    (bucket / "tok").mkdir()
    (bucket / "tok" / "tokenizer.json").write_text('{"model": {}}')
    (bucket / "tok" / "tokenizer_config.json").write_text("{}")
    with open(bucket / "archive.tar", "wb") as f:
        f.truncate(20 * 10**6)  # sparse: 20 MB listed, nothing on this disk
    root = tmp_path / "cache"
    store = CountingStore(bucket)
    assert len(remote_shards(store, root)) == 26
    assert store.downloads == 4  # two dataset.json, the tokenizer's two files
    assert (root / "tok" / "tokenizer.json").read_text() == '{"model": {}}'
    assert not (root / "archive.tar").exists()

    with open(bucket / "tok" / "tokenizer.json", "wb") as f:
        f.truncate(METADATA_LIMIT_BYTES + 1)
    with pytest.raises(DataError) as err:
        remote_shards(open_store(str(bucket)), tmp_path / "fresh")
    assert str(err.value) == (
        f"{bucket}: the dataset.json files and the tokenizer folder tok/ take 64.0 MiB "
        f"(largest tok/tokenizer.json, 64.0 MiB), more than the 64 MiB streaming fetches "
        f"besides shards; keep only dataset.json and the tokenizer files there, or use "
        f"--sync-data")


# ---------------------------------------------------------------- the cache


def test_stream_an_epoch_under_a_limit_a_quarter_of_the_data(
    store: Store, reference: TokenWindows, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    shards = remote_shards(store, root)
    limit = _limit_for(shards, pinned=(7,))
    total = sum(r.size for r in shards)
    assert total >= 4 * limit
    largest = max(r.size for r in shards)
    with DiskMeter(root) as meter:
        stream = Stream(store, root, limit=limit, pinned=(7,))
        try:
            stream.consume(0, reference)
            stats = stream.cache.stats()
        finally:
            stream.close()
    assert meter.peak <= limit + largest, (meter.peak, limit, largest)
    assert 0 < stats["peak_local_bytes"] <= limit
    assert stats["bytes_downloaded"] >= total - shards[7].size
    assert stats["evictions"] > 0 and stats["refetches"] == 0
    assert (root / ".ready" / shards[7].name).exists()  # pinned: never evicted
    # a reader closes its maps of evicted files (which keep their disk space while mapped)
    # at its next shard switch, instead of keeping one map per shard it ever read
    assert len(stream.windows._arrays) <= 2 * BLOCK + PREFETCH + 1


def test_a_fresh_machine_fetches_from_the_resumed_position_in_need_order(
    tmp_path: Path, dataset: Path
) -> None:
    store = open_store(str(dataset))
    root = tmp_path / "cache"
    shards = remote_shards(store, root)
    mid = 2000
    stream = Stream(store, root, limit=2 * _limit_for(shards), shards=shards, offset=mid)
    try:
        pending = [(k, first) for k, first, last in stream.schedule(0) if last >= mid - BATCH]
        now = sum(first <= mid + 2 * BATCH for _, first in pending)
        want = {k for k, _ in pending[:now + PREFETCH]}
        deadline = time.monotonic() + 10
        while stream.cache.stats()["shards_fetched"] < len(want) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # nothing more arrives: the rest waits for the position to move
        ready = {k for k, r in enumerate(shards) if (root / ".ready" / r.name).exists()}
    finally:
        stream.close()
    assert ready == want and stream.cache.stats()["shards_fetched"] == len(want)


def test_dataloader_workers_wait_for_shards(
    tmp_path: Path, dataset: Path, reference: TokenWindows
) -> None:
    torch = pytest.importorskip("torch")
    store = open_store(str(dataset))
    root = tmp_path / "cache"
    stream = Stream(store, root, limit=_limit_for(remote_shards(store, root)),
                    read_ahead=5 * BATCH)
    order = stream.order(0)
    batches = [order[i:i + BATCH].tolist() for i in range(0, 60 * BATCH, BATCH)]
    loader = torch.utils.data.DataLoader(stream.windows, batch_sampler=batches, num_workers=2,
                                         prefetch_factor=2, collate_fn=np.stack)
    try:
        for step, got in enumerate(loader):
            np.testing.assert_array_equal(got, np.stack([reference[i] for i in batches[step]]))
            stream.cache.set_position(0, (step + 1) * BATCH)
        assert stream.cache.stats()["evictions"] > 0
    finally:
        stream.close()


def test_a_stop_request_ends_a_dataloader_workers_wait_for_a_shard(
    tmp_path: Path, dataset: Path
) -> None:
    """The bucket never delivers (no cache runs): the worker process waits for its shard
    until the loop's stop flag turns true, then the loop gets WaitStopped naming the shard,
    at once; a new cache on the same folder clears the marker for the next run's readers."""
    torch = pytest.importorskip("torch")
    store = open_store(str(dataset))
    root = tmp_path / "cache"
    shards = remote_shards(store, root)
    windows = stream_windows(shards, SEQ, root)
    loader = torch.utils.data.DataLoader(windows, batch_sampler=[[0, 1]], num_workers=1,
                                         collate_fn=np.stack)
    flag, set_at = threading.Event(), []
    watch = StopWatch(flag.is_set, [root])
    threading.Timer(0.5, lambda: (set_at.append(time.monotonic()), flag.set())).start()
    try:
        with pytest.raises(WaitStopped, match=f"waiting for shard {shards[0].name}"):
            next(iter(loader))  # the SIGTERM comes while the worker waits
    finally:
        watch.close()
    assert time.monotonic() - set_at[0] < 2  # polls: the flag 0.05 s, the marker 0.03 s
    stream = Stream(store, root, limit=None, pinned=(0,))
    try:
        assert not (root / STOP_NAME).exists()
        np.testing.assert_array_equal(stream.windows[0], windows[0])  # waits, then reads
    finally:
        stream.close()


def test_unlimited_cache_keeps_everything_and_resumes_without_downloads(
    gcs_store: Store, reference: TokenWindows, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    stream = Stream(gcs_store, root, limit=None)
    try:
        stream.consume(0, reference)
    finally:
        stream.close()
    assert stream.cache.stats()["evictions"] == 0
    again = Stream(gcs_store, root, limit=None, epoch=1)  # a restart: verified, not fetched
    try:
        again.consume(1, reference)
        stats = again.cache.stats()
    finally:
        again.close()
    assert (stats["shards_fetched"], stats["refetches"]) == (0, 0)


def test_corrupted_local_copy_is_fetched_again(
    gcs_store: Store, reference: TokenWindows, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    shards = remote_shards(gcs_store, root)
    counts = stream_windows(shards, SEQ, root).shard_windows
    cum = np.concatenate([[0], np.cumsum(counts)])
    train, _ = train_eval_split(int(cum[-1]), 16, 0)
    first = shard_schedule(block_order(counts, train, 0, 0, BLOCK), cum)[0][0]
    bad = shards[first].shard.path  # a same-size copy from a "previous run", with its marker
    good = gcs_store.read_bytes(shards[first].name)
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(good[:-64] + bytes(64))
    marker = root / ".ready" / shards[first].name
    marker.parent.mkdir(parents=True)
    marker.touch()
    stale_part = bad.parent / f".{bad.name}.part-0123abcd"  # a download a kill cut short
    stale_part.write_bytes(b"half")
    logs: list[str] = []
    stream = Stream(gcs_store, root, limit=None, logs=logs)
    try:
        stream.consume(0, reference)
        stats = stream.cache.stats()
    finally:
        stream.close()
    assert stats["refetches"] == 1
    assert bad.read_bytes() == good and not stale_part.exists()
    assert any(f"local copy of {shards[first].name} does not match" in line for line in logs)


def test_shard_corrupted_in_the_bucket_stops_readers_naming_it(
    gcs_store: Store, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    shards = remote_shards(gcs_store, root)  # the listing; then the object changes under it
    k = 0
    name = shards[k].name
    data = bytearray(gcs_store.read_bytes(name))
    data[-1] ^= 0xFF
    (tmp_path / "changed").write_bytes(bytes(data))
    gcs_store.upload_file(tmp_path / "changed", name)
    logs: list[str] = []
    stream = Stream(gcs_store, root, limit=None, logs=logs, shards=shards, pinned=(k,))
    try:
        with pytest.raises(DataError) as err:
            stream.windows[int(stream.cum[k])]
    finally:
        stream.close()
    assert name in str(err.value) and "still bad after 4 downloads" in str(err.value)
    assert "\n" not in str(err.value)
    assert sum("fetching it again" in line for line in logs) == 3


def test_a_shard_with_ids_beyond_the_vocabulary_stops_readers_naming_it(
    dataset: Path, reference: TokenWindows, tmp_path: Path
) -> None:
    """What synced data is refused with at start, streamed data is refused with when the
    shard arrives: uint32 .bin shards hold ids up to 100,000, the .npy ones below 60,000."""
    (tmp_path / "bucket").mkdir()
    bucket = open_store(str(tmp_path / "bucket"))
    sync_up(dataset, bucket, progress=False)
    shards = remote_shards(bucket, tmp_path / "cache")
    good = next(k for k, r in enumerate(shards) if r.name.endswith(".npy"))
    bad = next(k for k, r in enumerate(shards) if r.name.endswith(".bin"))
    logs: list[str] = []
    stream = Stream(bucket, tmp_path / "cache", limit=None, logs=logs, shards=shards,
                    pinned=(good, bad), vocab_size=60_000)
    try:
        first = int(stream.cum[good])
        np.testing.assert_array_equal(stream.windows[first], reference[first])
        with pytest.raises(DataError) as err:
            stream.windows[int(stream.cum[bad])]
    finally:
        stream.close()
    message = str(err.value)
    assert shards[bad].name in message and ">= vocabulary size 60000" in message, message
    assert "\n" not in message and any(shards[bad].name in line for line in logs)


@pytest.fixture
def fs_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[GcsEmulator]:
    """A private emulator on the filesystem backend, so objects survive a kill."""
    emulator = GcsEmulator(tmp_path / "fs-emulator", backend="filesystem")
    emulator.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    yield emulator
    emulator.stop()


def test_bucket_outage_mid_stream_waits_then_continues(
    fs_emulator: GcsEmulator, dataset: Path, reference: TokenWindows, tmp_path: Path
) -> None:
    store = open_store(fs_emulator.create_bucket("outage"), retry_deadline_s=2)
    sync_up(dataset, store, progress=False)
    root = tmp_path / "cache"
    logs: list[str] = []
    stream = Stream(store, root, limit=_limit_for(remote_shards(store, root)), logs=logs)
    restarted = threading.Event()

    def outage(step: int) -> None:
        if step == 40:  # a few blocks in; later shards are not local yet (the limit)
            fs_emulator.kill()
            threading.Timer(2.5, lambda: (fs_emulator.start(), restarted.set())).start()

    try:
        start = time.monotonic()
        steps = stream.consume(0, reference, at_step=outage)
        stats = stream.cache.stats()
    finally:
        stream.close()
    assert restarted.wait(10) and steps == len(stream.order(0)) // BATCH
    assert time.monotonic() - start > 2.5 and stats["outage_s"] > 1.5  # training waited...
    assert stats["wait_s"] > 0
    assert any("cannot reach" in line and "training waits" in line for line in logs)
    assert any("answers again" in line for line in logs)  # ...then continued, data exact
    assert stats["refetches"] == 0


def test_too_small_limit_is_one_line(tmp_path: Path, dataset: Path) -> None:
    store = open_store(str(dataset))
    shards = remote_shards(store, tmp_path / "cache")
    need = _limit_for(shards)
    with pytest.raises(DataError) as err:
        ShardCache(store, tmp_path / "cache", shards, limit_bytes=need - 1, prefetch=PREFETCH,
                   block_shards=BLOCK, schedule=lambda e: [], margin_windows=BATCH)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"--cache-limit-gb {(need - 1) / 1e9:.3g} is too small: streaming "
                           f"needs ≥ {need / 1e9:.3g} GB (block of 2 shards + 2 prefetched")
    assert text.endswith("raise --cache-limit-gb or lower "
                         "--shuffle-block-shards/--prefetch-shards")
    assert not (tmp_path / "cache" / ".ready").exists()  # nothing started


def test_reader_waits_for_the_marker_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wait = ShardWait(tmp_path, ("a/x.npy",), warn_after_s=0.1)
    marker = tmp_path / ".ready" / "a" / "x.npy"
    marker.parent.mkdir(parents=True)
    threading.Timer(0.3, marker.touch).start()
    start = time.monotonic()
    wait(0)
    assert time.monotonic() - start >= 0.25
    assert capsys.readouterr().err == "waiting for shard a/x.npy from the bucket\n"
    assert pickle.loads(pickle.dumps(wait)) == wait

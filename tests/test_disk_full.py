"""A full disk is the disk-full line wherever it happens: the stream cache, sync_down, the log
mirror. Never advice about the data ("re-upload the shard") or a traceback. The disk is a
real small tmpfs (mounting needs root: skipped elsewhere); the data and stores are real."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import tmpfs
from test_streaming import SEQ, Stream, make_dataset

from utils.data import TokenWindows, find_shards
from utils.errors import DataError, StorageError
from utils.loop.log_mirror import LogMirror
from utils.storage import open_store, sync_down
from utils.streaming import remote_shards

# "(it needs about 0.0 MiB, 0.1 MiB are free)": the room needed and the room left
ROOM = r"\(it needs about [\d,.]+ MiB, [\d,.]+ MiB are free\)"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 160 KiB tmpfs: the dataset's metadata and a few of its ~14 KB shards, not all 26."""
    with tmpfs(tmp_path / "disk", "160k") as mount:
        yield mount


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("full") / "src")


def test_the_stream_cache_filling_the_disk_stops_readers_with_the_disk_full_line(
        small_disk: Path, dataset: Path) -> None:
    store = open_store(str(dataset))
    root = small_disk / "cache"
    shards = remote_shards(store, root)
    logs: list[str] = []
    stream = Stream(store, root, limit=None, logs=logs, shards=shards)  # no limit: all local
    reference = TokenWindows(find_shards(dataset), SEQ, root=dataset)
    try:
        with pytest.raises(DataError) as err:
            stream.consume(0, reference)
    finally:
        stream.close()
    message = str(err.value)
    assert re.fullmatch(rf"no space left on the device of {root} while writing {store.url}/"
                        rf"\S+ {ROOM}: free space, pass a --data-dir on a larger disk, or lower "
                        r"--cache-limit-gb", message), message
    assert message in logs and not any("re-upload" in line for line in logs)


def test_sync_down_filling_the_disk_is_one_line(small_disk: Path, dataset: Path) -> None:
    with pytest.raises(StorageError) as err:
        sync_down(open_store(str(dataset)), small_disk / "data", progress=False)
    assert re.fullmatch(rf"no space left on the device of {small_disk / 'data'} while writing "
                        rf"\S+ {ROOM}: free space or choose a folder on a larger disk, then sync "
                        r"again", str(err.value)), str(err.value)


def test_the_log_mirror_on_a_full_disk_says_so_and_claims_no_copy(small_disk: Path,
                                                                  tmp_path: Path) -> None:
    bucket = small_disk / "bucket"
    bucket.mkdir()
    with open(small_disk / "filler", "wb", buffering=0) as f:  # the bucket's disk is full
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "events.out.tfevents.1").write_bytes(b"e" * 50_000)
    lines: list[str] = []
    mirror = LogMirror(open_store(str(bucket)), logs, tmp_path / "metrics.jsonl", 0.0,
                       log=lines.append).start()
    assert not mirror.close(timeout=30)
    assert mirror.copied_to == ""
    [line] = lines
    assert re.fullmatch(rf"no space left on the device of {bucket} while writing "
                        rf"events.out.tfevents.1 {ROOM}: free space; copying the logs is "
                        r"retried every pass, training goes on", line), line

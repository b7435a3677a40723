"""Token shards -> windows -> per-rank batches: formats, errors, determinism, resume, loaders."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from utils.data import (
    DataPosition,
    TokenWindows,
    WindowBatchSampler,
    find_shards,
    position_after,
    read_dataset_meta,
    train_eval_split,
)
from utils.errors import DataError
from utils.torch_engine.loader import make_torch_loader


def tokens(n: int, start: int) -> np.ndarray:
    """Distinct, recognizable token values so a misread shows up as wrong numbers."""
    return np.arange(start, start + n, dtype=np.int64)


def windows_of(stream: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Reference windowing: stride seq_len, length seq_len + 1, inside one stream."""
    return [stream[j : j + seq_len + 1] for j in range(0, len(stream) - seq_len, seq_len)]


@pytest.fixture
def mixed_root(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """All shard formats in nested folders; returns the root and each shard's token stream."""
    root = tmp_path / "training"
    streams: list[np.ndarray] = []

    def put(rel: str, stream: np.ndarray) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        streams.append(stream)
        return path

    # sorted relative-path order: a/..., b/..., c/...
    s = tokens(50, 0)
    np.savez(put("a/00_stored.npz", s), input_ids=s.astype(np.uint16))  # uncompressed: mmapped
    s = tokens(48, 1000)
    np.savez_compressed(  # 2-D rows, compressed: loaded into RAM
        put("a/01_rows.npz", s), input_ids=s.reshape(6, 8).astype(np.uint32)
    )
    s = tokens(41, 2000)
    np.save(put("a/sub/02.npy", s), s.astype(np.uint16))
    s = tokens(33, 70000)  # needs uint32
    np.save(put("b/03.npy", s), s.astype(np.uint32))
    s = tokens(36, 3000)  # Fortran-ordered 2-D: still read row by row
    np.save(put("b/04_fortran.npy", s), np.asfortranarray(s.reshape(4, 9).astype(np.int32)))
    s = tokens(30, 80000)  # .bin whose dtype comes from an ancestor's dataset.json
    s.astype(np.uint32).tofile(put("c/deep/er/05.bin", s))
    (root / "c" / "dataset.json").write_text(json.dumps({"dtype": "uint32"}))
    s = tokens(25, 4000)  # .bin with no dataset.json on its path: uint16 by default
    s.astype(np.uint16).tofile(put("d/06.bin", s))
    return root, streams


def test_all_formats_read_the_right_tokens(mixed_root: tuple[Path, list[np.ndarray]]) -> None:
    root, streams = mixed_root
    seq_len = 7
    ds = TokenWindows(find_shards(root), seq_len, root=root)
    expected = [w for s in streams for w in windows_of(s, seq_len)]
    assert len(ds) == len(expected)
    assert ds.num_tokens == sum(len(s) for s in streams)
    for i, want in enumerate(expected):
        got = ds[i]
        assert got.dtype == np.int64 and got.shape == (seq_len + 1,)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_windows_never_cross_shards_and_short_shards_give_none(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", tokens(5, 0).astype(np.uint16))  # shorter than one window
    np.save(tmp_path / "b.npy", tokens(21, 100).astype(np.uint16))
    ds = TokenWindows(find_shards(tmp_path), 10)
    assert len(ds) == 2
    np.testing.assert_array_equal(ds[0], tokens(11, 100))
    np.testing.assert_array_equal(ds[1], tokens(11, 110))


def test_find_shards_nested_sorted_max_files(tmp_path: Path) -> None:
    for rel in ["b/x.npy", "a-b.npy", "a/z/y.bin", "a/c.npz", "a/.c.npy.tmp", ".hidden/q.npy",
                "a/notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    rels = [p.relative_to(tmp_path).as_posix() for p in find_shards(tmp_path)]
    assert rels == ["a/c.npz", "a/z/y.bin", "a-b.npy", "b/x.npy"]
    assert find_shards(tmp_path, max_files=2) == [tmp_path / "a/c.npz", tmp_path / "a/z/y.bin"]


def test_read_dataset_meta_nearest(tmp_path: Path) -> None:
    assert read_dataset_meta(tmp_path) is None
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "dataset.json").write_text('{"vocab_size": 3}')
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "dataset.json").write_text('{"vocab_size": 2}')
    assert read_dataset_meta(tmp_path) == {"vocab_size": 3}  # shallowest first
    (tmp_path / "dataset.json").write_text('{"vocab_size": 1}')
    assert read_dataset_meta(tmp_path) == {"vocab_size": 1}


def _truncated_npy(path: Path) -> None:
    np.save(path, tokens(1000, 0).astype(np.uint16))
    path.write_bytes(path.read_bytes()[:900])


def _bin_with_bad_meta(path: Path) -> None:
    tokens(10, 0).astype(np.uint16).tofile(path)
    (path.parent / "dataset.json").write_text('{"dtype": "float32"}')


BAD_SHARDS = {
    "empty.npy": (lambda p: p.write_bytes(b""), "empty"),
    "zero_tokens.npy": (lambda p: np.save(p, np.zeros(0, np.uint16)), "empty"),
    "truncated.npy": (_truncated_npy, "truncated"),
    "garbage.npz": (lambda p: p.write_bytes(b"this is not a zip file" * 10), "unreadable"),
    "no_ids.npz": (lambda p: np.savez(p, tokens=np.ones(9, np.uint16)), "input_ids"),
    "floats.npy": (lambda p: np.save(p, np.ones(9, np.float32)), "integers"),
    "odd.bin": (lambda p: p.write_bytes(b"\x01\x02\x03"), "multiple of 2"),
    "bad_meta.bin": (_bin_with_bad_meta, "dtype 'float32'"),
}


@pytest.mark.parametrize("name", sorted(BAD_SHARDS))
def test_bad_shard_raises_one_line_naming_the_file(tmp_path: Path, name: str) -> None:
    np.save(tmp_path / "good.npy", tokens(100, 0).astype(np.uint16))
    write, cause = BAD_SHARDS[name]
    write(tmp_path / name)
    with pytest.raises(DataError) as e:
        TokenWindows(find_shards(tmp_path), 8)
    msg = str(e.value)
    assert "\n" not in msg and cause in msg
    assert name in msg or "dataset.json" in msg


def test_missing_or_empty_data_dir_says_how_to_get_data(tmp_path: Path) -> None:
    for root in (tmp_path / "missing", tmp_path):
        with pytest.raises(DataError, match=r"python -m data\.prepare") as e:
            find_shards(root)
        assert str(root) in str(e.value) and "download_training_data.py" in str(e.value)


def test_too_little_data_for_one_window(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", tokens(8, 0).astype(np.uint16))
    with pytest.raises(DataError, match="lower seq_len"):
        TokenWindows(find_shards(tmp_path), 8)


def test_windows_pickle_without_token_data(tmp_path: Path) -> None:
    np.save(tmp_path / "big.npy", tokens(200_000, 0).astype(np.uint32))
    ds = TokenWindows(find_shards(tmp_path), 16)
    first = ds[3]  # opens the map
    blob = pickle.dumps(ds)
    assert len(blob) < 10_000  # 800 KB of tokens are not in it
    np.testing.assert_array_equal(pickle.loads(blob)[3], first)


def take(it, n: int) -> list[list[int]]:
    return [next(it) for _ in range(n)]


def sampler(n: int, b: int, rank: int = 0, world: int = 1, seed: int = 0,
            pos: DataPosition | None = None) -> WindowBatchSampler:
    return WindowBatchSampler(np.arange(n), b, rank, world, seed, pos or DataPosition())


def test_sampler_deterministic_for_seed_and_covers_each_epoch_once() -> None:
    a = take(iter(sampler(50, 8, seed=3)), 12)
    assert a == take(iter(sampler(50, 8, seed=3)), 12)
    assert a != take(iter(sampler(50, 8, seed=4)), 12)
    epoch0 = [i for batch in a[:6] for i in batch]  # 50 // 8 = 6 batches per epoch
    assert len(set(epoch0)) == 48  # no window twice in an epoch; 2 dropped
    assert sorted(a[6:12]) != sorted(a[:6])  # epoch 1 is reshuffled


def test_ranks_disjoint_and_union_equals_single_process() -> None:
    indices = np.arange(3, 103, 2)  # a train split: not 0..n-1
    one = iter(WindowBatchSampler(indices, 8, 0, 1, 7, DataPosition()))
    ranks = [iter(WindowBatchSampler(indices, 4, r, 2, 7, DataPosition())) for r in (0, 1)]
    for _ in range(20):  # 3+ epochs of 6 global batches
        full = next(one)
        r0, r1 = next(ranks[0]), next(ranks[1])
        assert not set(r0) & set(r1)
        assert r0 + r1 == full
        assert set(full) <= set(indices.tolist())


@pytest.mark.parametrize("stop", [2, 5, 6, 13])  # mid-epoch, last of epoch, boundary, later
def test_resume_continues_exactly_even_with_other_world(stop: int) -> None:
    n, seed = 53, 11  # 6 global batches of 8 per epoch
    reference = take(iter(sampler(n, 8, seed=seed)), stop + 10)
    first = sampler(n, 8, seed=seed)
    it = iter(first)
    assert take(it, stop) == reference[:stop]
    saved = json.loads(json.dumps(first.position.to_dict()))
    pos = DataPosition.from_dict(saved)
    ranks = [iter(sampler(n, 4, r, 2, seed, pos)) for r in (0, 1)]
    for k in range(stop, stop + 10):
        assert next(ranks[0]) + next(ranks[1]) == reference[k]
    # another global batch: the offset is in windows, so the epoch continues where it stopped
    order = np.random.default_rng([seed, pos.epoch]).permutation(n).tolist()
    rest = order[pos.offset : pos.offset + 4 * ((n - pos.offset) // 4)]
    nxt = iter(sampler(n, 4, seed=seed, pos=pos))
    assert [i for _ in range(len(rest) // 4) for i in next(nxt)] == rest


def test_length_grouping_cuts_padding_and_stays_exact_on_resume() -> None:
    """Grouped batches: a permutation per epoch, far less padding, the same after a resume."""
    n, b, seed = 1000, 4, 5
    lengths = np.random.default_rng(0).integers(10, 200, n)
    per_epoch = n // b
    grouped = take(iter(WindowBatchSampler(np.arange(n), b, 0, 1, seed, DataPosition(),
                                           lengths)), 2 * per_epoch)
    plain = take(iter(sampler(n, b, seed=seed)), per_epoch)
    assert sorted(i for batch in grouped[:per_epoch] for i in batch) == list(range(n))

    def padded(batches) -> int:
        return sum(len(batch) * max(lengths[batch]) for batch in batches)

    real = int(lengths.sum())
    assert padded(plain) > 1.3 * real  # random batches: about 1.5x the real tokens
    assert padded(grouped[:per_epoch]) < 1.1 * real
    assert grouped[per_epoch:2 * per_epoch] != grouped[:per_epoch]  # not one fixed order

    stop = 37  # resumed mid-epoch on two ranks with the same global batch: exactly the same
    first = WindowBatchSampler(np.arange(n), b, 0, 1, seed, DataPosition(), lengths)
    take(iter(first), stop)
    ranks = [iter(WindowBatchSampler(np.arange(n), b // 2, r, 2, seed, first.position,
                                     lengths)) for r in (0, 1)]
    for k in range(stop, stop + 300):  # into the next epoch
        assert next(ranks[0]) + next(ranks[1]) == grouped[k]


def test_position_after_matches_iteration() -> None:
    n, g = 29, 4  # 7 batches per epoch, 1 window dropped
    for start in [DataPosition(0, 0), DataPosition(2, 5), DataPosition(1, 25), DataPosition(0, 29)]:
        s = WindowBatchSampler(np.arange(n), g, 0, 1, 0, start)
        it = iter(s)
        for k in range(1, 20):
            next(it)
            assert s.position == position_after(start, k, g, n)
    assert position_after(DataPosition(0, 0), 7, g, n) == DataPosition(1, 0)
    with pytest.raises(DataError, match="does not fit"):
        position_after(DataPosition(), 1, 30, n)


def test_sampler_rejects_stale_position_and_bad_dicts() -> None:
    with pytest.raises(DataError, match="changed since the checkpoint"):
        sampler(10, 2, pos=DataPosition(0, 11))
    for bad in [None, {"epoch": 1}, {"epoch": -1, "offset": 0}, {"epoch": "1", "offset": 0}]:
        with pytest.raises(DataError, match="bad data position"):
            DataPosition.from_dict(bad)


def test_train_eval_split() -> None:
    train, held = train_eval_split(1000, 50, seed=5)
    assert len(held) == 50 and len(train) == 950
    assert not set(train.tolist()) & set(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(1000))
    assert held.max() - held.min() > 500  # scattered, not a tail
    again = train_eval_split(1000, 50, seed=5)
    np.testing.assert_array_equal(again[1], held)
    assert not np.array_equal(train_eval_split(1000, 50, seed=6)[1], held)
    with pytest.raises(DataError, match="eval_windows"):
        train_eval_split(10, 10, seed=0)


def test_torch_loader_workers_match_and_position_counts_consumed(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    np.save(tmp_path / "a.npy", tokens(3000, 0).astype(np.uint16))
    np.savez_compressed(tmp_path / "b.npz", input_ids=tokens(2000, 5000).astype(np.uint16))
    ds = TokenWindows(find_shards(tmp_path), 32)
    start = DataPosition(0, 16)
    results = {}
    for workers in (0, 2):
        s = WindowBatchSampler(np.arange(len(ds)), 4, 1, 2, 9, start)
        loader = make_torch_loader(
            ds, s, lambda rows: {"input_ids": np.stack(rows)}, num_workers=workers,
            prefetch_factor=4 if workers else None,
        )
        it = iter(loader)
        batches = [next(it)["input_ids"] for _ in range(5)]
        # workers have prefetched far ahead; the position counts only the 5 consumed batches
        assert s.position == position_after(start, 5, 8, len(ds))
        batches += [next(iter(loader))["input_ids"] for _ in range(2)]  # a fresh one resumes
        results[workers] = batches
    ref = iter(WindowBatchSampler(np.arange(len(ds)), 4, 1, 2, 9, start))
    for a, b in zip(results[0], results[2], strict=True):
        assert a.dtype == torch.int64 and a.shape == (4, 33)
        assert torch.equal(a, b)
        want = np.stack([ds[i] for i in next(ref)])
        np.testing.assert_array_equal(a.numpy(), want)

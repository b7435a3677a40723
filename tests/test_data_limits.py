"""Data at the limits: many shards under ``ulimit -n``, and token ids beyond the vocabulary.

The descriptor tests run real child processes with a lowered RLIMIT_NOFILE, the way a user's
shell would start training; the vocabulary tests use real shard files and the real cache.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from utils.data import DataError, TokenWindows, find_shards

REPO = Path(__file__).resolve().parent.parent
STATS_NAME = ".shard-stats.json"  # hidden in the data root: find_shards and the sync skip it
resource = pytest.importorskip("resource")  # Unix: setrlimit


def _limited(n: int) -> Callable[[], None]:
    """preexec_fn for a child that starts under ``ulimit -n n``."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


def _run_child(code: str, *args: str, nofile: int, timeout: float = 300) -> dict:
    """Run ``code`` in a fresh interpreter under the open-file limit; its last stdout line is
    JSON."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, preexec_fn=_limited(nofile),
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_many_npy(root: Path, count: int, length: int) -> None:
    """``count`` uint32 .npy shards of ``length`` tokens, shard k holding k*length + 0..length-1.

    One header is built once and written in front of each shard's bytes: 10,000 np.save calls
    would cost more than the test itself.
    """
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<u4", "fortran_order": False, "shape": (length,)}
    )
    header = buf.getvalue()
    ids = np.arange(count * length, dtype="<u4").reshape(count, length)
    for k in range(count):
        folder = root / f"d{k // 100:03d}"
        if k % 100 == 0:
            folder.mkdir(parents=True)
        (folder / f"s{k % 100:02d}.npy").write_bytes(header + ids[k].tobytes())


READ_ALL = r"""
import json, os, resource, sys
from pathlib import Path
import numpy as np
from utils.data import TokenWindows, find_shards

root, length, seq_len = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ds = TokenWindows(find_shards(root), seq_len)
per_shard = (length - 1) // seq_len
most_fds = 0
for n, i in enumerate(np.random.default_rng(0).permutation(len(ds))):
    k, j = divmod(int(i), per_shard)
    want = np.arange(k * length + j * seq_len, k * length + j * seq_len + seq_len + 1)
    if not np.array_equal(ds[int(i)], want):
        sys.exit(f"window {i} read wrong tokens")
    if n % 997 == 0 and os.path.isdir("/dev/fd"):
        most_fds = max(most_fds, len(os.listdir("/dev/fd")))
limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
print(json.dumps({"windows": len(ds), "most_fds": most_fds, "limit": limit}))
"""


def test_ten_thousand_shards_read_shuffled_under_ulimit_1024(tmp_path: Path) -> None:
    """Every window of 10,000 shards, shuffled, in a process limited to 1024 open files."""
    count, length, seq_len = 10_000, 100, 16
    _write_many_npy(tmp_path / "data", count, length)
    out = _run_child(READ_ALL, str(tmp_path / "data"), str(length), str(seq_len), nofile=1024)
    assert out["limit"] == 1024 and out["windows"] == count * ((length - 1) // seq_len)
    assert out["most_fds"] < 128 + 64  # the open maps stay bounded, far below the limit


OUT_OF_FDS = r"""
import json, mmap, os, sys  # mmap: as in any process that has read a shard before
from pathlib import Path
from utils.data import DataError, TokenWindows, find_shards

ds = TokenWindows(find_shards(Path(sys.argv[1])), 8)  # 3 shards of 2 windows each

def exhaust():
    fds = []
    while True:
        try:
            fds.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return fds

def release(fds):
    for fd in fds:
        os.close(fd)

fillers = exhaust()
try:
    ds[0]
    error = None
except DataError as e:
    error = str(e)
release(fillers)
ds[0], ds[2]  # two maps open, then the table fills up again
fillers = exhaust()
try:
    third = int(ds[4][0])  # our two maps are closed to make room
except DataError as e:
    third = str(e)
release(fillers)
print(json.dumps({"error": error, "third": third}))
"""


def test_out_of_descriptors_names_the_limit_not_the_shard(tmp_path: Path) -> None:
    """EMFILE is the limit's fault, not the shard's: say `ulimit -n`, never "re-create it";
    and when our own maps fill the table they are closed to make room."""
    for k in range(3):
        np.save(tmp_path / f"s{k}.npy", np.arange(100 * k, 100 * k + 17, dtype=np.uint16))
    out = _run_child(OUT_OF_FDS, str(tmp_path), nofile=64)
    error = out["error"]
    assert error is not None, "reading with no descriptor left should fail"
    assert "\n" not in error and str(tmp_path / "s0.npy") in error
    assert "too many open files" in error and "ulimit -n" in error and "now 64" in error
    assert "shard is fine" in error and "re-create" not in error
    assert out["third"] == 200


def test_few_shards_stay_open_and_many_are_bounded(tmp_path: Path) -> None:
    """max_open maps at most: every window still reads the right tokens in any order."""
    for k in range(6):
        np.save(tmp_path / f"s{k}.npy", np.arange(1000 * k, 1000 * k + 33, dtype=np.uint32))
    ds = TokenWindows(find_shards(tmp_path), 8, max_open=2)
    fds_before = len(os.listdir("/dev/fd")) if os.path.isdir("/dev/fd") else 0
    for i in np.random.default_rng(1).permutation(len(ds)):
        k, j = divmod(int(i), 4)
        np.testing.assert_array_equal(ds[int(i)], np.arange(1000 * k + 8 * j, 1000 * k + 8 * j + 9))
        if fds_before:
            assert len(os.listdir("/dev/fd")) <= fds_before + 2
    with pytest.raises(DataError, match="max_open=0"):
        TokenWindows(find_shards(tmp_path), 8, max_open=0)


def _stats(root: Path) -> dict:
    return json.loads((root / STATS_NAME).read_text())["shards"]


def _one_line(err: pytest.ExceptionInfo[DataError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


BIG = 3_000_000  # 6 MB of uint16: more than one chunk of the streaming maximum

WRITERS: dict[str, Callable[[Path, np.ndarray], None]] = {
    "big.npy": lambda p, a: np.save(p, a.astype(np.uint16)),
    "stored.npz": lambda p, a: np.savez(p, input_ids=a.astype(np.uint32)),
    "rows.npz": lambda p, a: np.savez_compressed(p, input_ids=a.reshape(-1, 10).astype(np.int32)),
    "fortran.npy": lambda p, a: np.save(p, np.asfortranarray(a.reshape(10, -1).astype(np.int64))),
    "raw.bin": lambda p, a: a.astype(np.uint16).tofile(p),
}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_check_vocab_names_the_shard_and_the_id(tmp_path: Path, name: str) -> None:
    """One line with the file, its largest id and the vocabulary size; good data passes."""
    np.save(tmp_path / "a_good.npy", np.arange(0, 500, dtype=np.uint16))
    ids = np.arange(BIG if name == "big.npy" else 1000) % 700
    ids[-1] = 4321  # at the very end: the last chunk must be read too
    WRITERS[name](tmp_path / name, ids)
    ds = TokenWindows(find_shards(tmp_path), 8)
    ds.check_vocab(4322)
    with pytest.raises(DataError) as e:
        ds.check_vocab(4321)
    msg = _one_line(e)
    assert msg.startswith(f"{tmp_path / name}: ") and "token id 4321" in msg
    assert "vocabulary size 4321" in msg and "another tokenizer" in msg
    assert ("dataset.json" in msg) == name.endswith(".bin")
    TokenWindows(find_shards(tmp_path), 8, max_open=1).check_vocab(50_000)


def test_check_vocab_negative_ids_and_bad_size(tmp_path: Path) -> None:
    np.save(tmp_path / "neg.npy", np.array([5, 6, -1, 7] * 5, dtype=np.int32))
    ds = TokenWindows(find_shards(tmp_path), 4)
    with pytest.raises(DataError) as e:
        ds.check_vocab(100)
    assert "neg.npy" in _one_line(e) and "token id -1, below 0" in str(e.value)
    with pytest.raises(DataError, match="vocab_size=0"):
        ds.check_vocab(0)


def test_bin_dtype_mismatch_is_named_and_the_cache_follows_the_dtype(tmp_path: Path) -> None:
    """uint16 tokens read as uint32 pair up into huge ids; fixing dataset.json fixes them."""
    data = tmp_path / "data"
    (data / "part").mkdir(parents=True)
    np.arange(1, 101, dtype=np.uint16).tofile(data / "part" / "00.bin")
    meta = data / "dataset.json"
    meta.write_text('{"dtype": "uint32"}')
    with pytest.raises(DataError) as e:
        TokenWindows(find_shards(data), 8, root=data).check_vocab(50_304)
    msg = _one_line(e)
    assert "part/00.bin" in msg and f"token id {99 + 100 * 65536}" in msg  # pairs (99, 100)
    assert "read as uint32" in msg and 'set "dtype" in dataset.json' in msg
    meta.write_text('{"dtype": "uint16"}')
    TokenWindows(find_shards(data), 8, root=data).check_vocab(101)
    assert _stats(data)["part/00.bin"][2:] == ["<u2", 1, 100]


def test_ids_are_cached_and_a_changed_shard_is_recounted(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(0, 300, dtype=np.uint16))
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / "b.npy", np.arange(0, 200, dtype=np.uint16))
    TokenWindows(find_shards(tmp_path), 8).check_vocab(300)
    stats = _stats(tmp_path)
    st = (tmp_path / "a.npy").stat()
    assert stats["a.npy"] == [st.st_size, st.st_mtime_ns, "<u2", 0, 299]
    assert stats["sub/b.npy"][3:] == [0, 199]
    assert find_shards(tmp_path) == [tmp_path / "a.npy", tmp_path / "sub" / "b.npy"]

    # the second call reads the cache, not the shard: a planted maximum is believed
    stats["sub/b.npy"][4] = 7777
    (tmp_path / STATS_NAME).write_text(json.dumps({"version": 1, "shards": stats}))
    with pytest.raises(DataError, match="token id 7777"):
        TokenWindows(find_shards(tmp_path), 8).check_vocab(300)

    # rewriting the shard (new mtime) makes it counted again
    np.save(tmp_path / "sub" / "b.npy", np.arange(100, 300, dtype=np.uint16))
    os.utime(tmp_path / "sub" / "b.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    TokenWindows(find_shards(tmp_path), 8).check_vocab(300)
    assert _stats(tmp_path)["sub/b.npy"][3:] == [100, 299]


def test_unwritable_data_folder_still_checks_without_a_cache(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(0, 300, dtype=np.uint16))
    (tmp_path / STATS_NAME).write_text("{not json")  # a corrupt cache only costs a recount
    if os.geteuid() == 0:  # root writes anywhere: a folder in its place cannot be replaced
        (tmp_path / STATS_NAME).unlink()
        (tmp_path / STATS_NAME).mkdir()
    else:
        tmp_path.chmod(0o555)
    try:
        ds = TokenWindows(find_shards(tmp_path), 8)
        ds.check_vocab(300)
        with pytest.raises(DataError, match="token id 299"):
            ds.check_vocab(299)
        assert sorted(p.name for p in tmp_path.iterdir()) == [STATS_NAME, "a.npy"]  # no temp
    finally:
        tmp_path.chmod(0o755)

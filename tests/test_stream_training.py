"""``train.py --stream`` end to end, as real processes against the real GCS emulator.

A kill -9 resumes with identical losses (mixture and streaming together, on a "new machine"
whose cache starts empty); the local data stay under the cache limit plus one shard while
a dataset 4x the limit streams through; a corrupted local shard is fetched again; a bucket
that goes away mid-stream only makes training wait.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gcs_emulator import GcsEmulator
from helpers import Run, assert_same_records, kill_and_resume, last_step, metrics, train

from utils.storage import open_store, sync_up

SHARD_TOKENS = 2_500  # 5 kB shards of 39 windows of 64 tokens
SHARD_BYTES = 128 + 2 * SHARD_TOKENS  # .npy header + uint16 tokens
STREAM = ["--stream", "--per-device-train-batch-size", "16", "--shuffle-block-shards", "2",
          "--prefetch-shards", "1", "--save-steps", "1000"]

pytestmark = pytest.mark.slow


def _write_shards(sample_data: Path, root: Path, counts: dict[str, int]) -> None:
    """Small shards cut from the sample corpus, under root/<source>/ ('' = root itself)."""
    tokens = np.load(sample_data / "shard_00000.npy")
    meta = json.loads((sample_data / "dataset.json").read_text())
    meta["tokenizer"] = str((sample_data.parent / "tokenizer").resolve())
    start = 0
    for source, n in counts.items():
        (root / source).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            piece = tokens[start % (len(tokens) - SHARD_TOKENS):][:SHARD_TOKENS]
            np.save(root / source / f"shard_{i:05d}.npy", piece)
            start += SHARD_TOKENS
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.fixture
def streamed_bucket(sample_data, gcs_bucket, tmp_path) -> str:
    _write_shards(sample_data, tmp_path / "src", {"web": 24, "code": 8})
    sync_up(tmp_path / "src", open_store(gcs_bucket).child("training"), progress=False)
    return gcs_bucket


def _args(data: Path, out: Path, bucket: str, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), "--bucket", bucket,
            "--run-name", "stream", *STREAM, *extra]


def _summary_row(run: Run, name: str) -> str:
    match = re.search(rf"^{name}\s+\| (.*)$", run.stdout, re.MULTILINE)
    assert match, run.stdout[-2000:]
    return match.group(1)


def test_a_killed_streaming_mixture_resumes_with_identical_losses_on_a_new_machine(
        streamed_bucket, tmp_path):
    mix = ["--data-mix", "web=0.75,code=0.25", "--max-steps", "24", "--save-steps", "8",
           "--cache-limit-gb", "0.0001"]
    whole = train(tmp_path, "whole", _args(tmp_path / "d0", tmp_path / "whole",
                                           streamed_bucket, *mix))
    assert whole.proc.returncode == 0, whole.stderr[-3000:]
    assert "shards" in _summary_row(whole, "streamed")
    assert "vocab 2048" in whole.stdout  # the prefix's dataset.json was fetched, not a default

    out = tmp_path / "cut"
    second = kill_and_resume(tmp_path, out, _args(tmp_path / "d1", out, streamed_bucket, *mix),
                             kill_at=12, new_machine=lambda: shutil.rmtree(tmp_path / "d1"))
    assert re.search(r"resumed from \S+-step(8|16)-", second.stdout), second.stdout[-2000:]
    assert_same_records(out, tmp_path / "whole", ("loss", "tokens_by_source", "grad_norm"), 24)


def _folder_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".npy") or ".part-" in name:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    pass
    return total


def test_local_shards_stay_under_the_limit_and_a_corrupted_one_is_fetched_again(
        sample_data, gcs_bucket, tmp_path):
    _write_shards(sample_data, tmp_path / "src", {"": 32})
    sync_up(tmp_path / "src", open_store(gcs_bucket).child("training"), progress=False)
    limit = 8 * SHARD_BYTES  # a quarter of the 32 shards
    data, out = tmp_path / "data", tmp_path / "out"
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _folder_bytes(data))
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    steps = ["--max-steps", "80", "--cache-limit-gb", f"{limit / 1e9}"]  # ~1 epoch
    try:
        run = train(tmp_path, "run", _args(data, out, gcs_bucket, *steps))
    finally:
        done.set()
        watcher.join()
    assert run.proc.returncode == 0, run.stderr[-3000:]
    streamed = _summary_row(run, "streamed")
    fetched = int(re.match(r"(\d+) shards", streamed).group(1))
    assert fetched >= 32 and int(re.search(r"(\d+) evicted", streamed).group(1)) > 0
    assert 0 < peak[0] <= limit + SHARD_BYTES, (peak[0], limit)

    # The held-out shard stays local for the whole run: corrupt it (same size) and go on.
    shard = data / "shard_00000.npy"
    good = shard.read_bytes()
    shard.write_bytes(good[:-100] + bytes(100))
    more = train(tmp_path, "more", _args(data, out, gcs_bucket, "--cache-limit-gb",
                                         f"{limit / 1e9}", "--max-steps", "90",
                                         "--resume", "latest"))
    assert more.proc.returncode == 0, more.stderr[-3000:]
    assert shard.read_bytes() == good
    assert [r["step"] for r in metrics(out)][-1] == 90


def test_a_bucket_that_goes_away_mid_stream_only_makes_training_wait(sample_data, tmp_path,
                                                                     monkeypatch):
    emulator = GcsEmulator(tmp_path / "gcs", backend="filesystem")
    emulator.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    try:
        bucket = emulator.create_bucket("streamed")
        _write_shards(sample_data, tmp_path / "src", {"": 24})
        sync_up(tmp_path / "src", open_store(bucket).child("training"), progress=False)
        steps = ["--max-steps", "40", "--cache-limit-gb", f"{6 * SHARD_BYTES / 1e9}"]
        calm = train(tmp_path, "calm", _args(tmp_path / "d0", tmp_path / "calm", bucket,
                                             *steps))
        assert calm.proc.returncode == 0, calm.stderr[-3000:]

        out = tmp_path / "out"
        run = Run(tmp_path, "run", _args(tmp_path / "d1", out, bucket, *steps))
        run.wait_for(lambda: last_step(out) >= 5, "step 5")
        emulator.kill()
        down_at = last_step(out)
        time.sleep(6)
        emulator.start()
        assert run.wait() == 0, run.stderr[-3000:]
    finally:
        emulator.stop()
    assert down_at < 40
    waited = float(re.search(r"training waited ([\d.]+) s", _summary_row(run, "streamed"))[1])
    assert waited > 0.5, run.stdout[-2000:]
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(tmp_path / "calm")]


def test_validate_lists_every_streamed_source_and_reads_a_shard_of_each(streamed_bucket,
                                                                         tmp_path):
    from conftest import run_train

    common = ["--config", "production", "--model", "tiny", "--seq-len", "64", "--stream",
              "--bucket", streamed_bucket, "--data-dir", str(tmp_path / "d"), "--output-dir",
              str(tmp_path / "out"), "--mixed-precision", "no", "--no-compile", "--validate"]
    good = run_train(*common, "--data-mix", "web=3,code=1", tmp_path=tmp_path)
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-2000:]
    assert re.search(r"\[PASS\] data present.*32 shards listed in 2 source\(s\).*first shard of "
                     r"each downloaded", good.stdout), good.stdout
    assert len(list((tmp_path / "d" / "code").glob("*.npy"))) >= 1
    bad = run_train(*common, "--data-mix", "web=3,math=1", tmp_path=tmp_path)
    assert bad.returncode == 1
    assert re.search(r"\[FAIL\] data present.*math", bad.stdout), bad.stdout


def test_the_mlx_backend_streams_a_mixture_too(sample_data, tmp_path):
    """Same flags, same shards, a local-directory bucket: the MLX loop reads streamed windows."""
    _write_shards(sample_data, tmp_path / "bucket" / "training", {"web": 6, "code": 3})
    out = tmp_path / "out"
    run = train(tmp_path, "mlx", _args(tmp_path / "d", out, str(tmp_path / "bucket"),
                                       "--backend", "mlx", "--data-mix", "web=2,code=1",
                                       "--max-steps", "6", "--cache-limit-gb", "0.0001"))
    assert run.proc.returncode == 0, run.stderr[-3000:]
    assert "mlx on" in run.stdout and "vocab 2048" in run.stdout
    assert re.match(r"\d+ shards", _summary_row(run, "streamed"))
    last = metrics(out)[-1]
    assert last["step"] == 6 and last["tokens_by_source"] == {"web": 6 * 16 * 64 * 2 // 3,
                                                              "code": 6 * 16 * 64 // 3}

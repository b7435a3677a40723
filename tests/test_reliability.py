"""A user's bad days (issue 12): a refusing bucket, a corrupted checkpoint, a second run of the
same name, a full disk, a changed seed, an unusable --output-dir, another tokenizer's shards.
Each runs the real train.py; faults are injected at the boundary (an HTTP proxy in front of
the GCS emulator, a small tmpfs, files on disk)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from gcs_emulator import FaultProxy
from helpers import Run, remote_problems, tmpfs, train

from utils import checkpoint
from utils.storage import open_store

RUN = "rel"
PREFIX = f"checkpoints/{RUN}"


def _args(data: Path, out: Path, bucket: str, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), "--bucket", bucket,
            "--run-name", RUN, *extra]


def _error(run: Run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("error:")]


def _names(out: Path) -> list[str]:
    return [p.name for p in checkpoint.find_complete(out / "checkpoints")]


@pytest.mark.slow
def test_a_refusing_bucket_never_stops_training_and_uploads_catch_up(sample_data,
                                                                     gcs_emulator, gcs_bucket,
                                                                     tmp_path):
    """The bucket refuses every write for a while: each checkpoint counts locally at once,
    training goes on, and every checkpoint uploads once the bucket is back."""
    proxy = FaultProxy(gcs_emulator.url, [], match="uploadType=")
    proxy.start()
    try:
        out = tmp_path / "out"
        run = Run(tmp_path, "refused", _args(sample_data, out, gcs_bucket, "--max-steps", "40",
                                             "--save-steps", "20"),
                  env={"STORAGE_EMULATOR_HOST": proxy.url})
        run.wait_for(lambda: "model tiny:" in run.stdout, "the start (bucket access checked)")
        proxy.faults = ["403"] * 3  # from now on the bucket refuses the next three writes
        first = out / "checkpoints" / "checkpoint-epoch0-step20-files1"
        run.wait_for(lambda: checkpoint.verify(first) is None, "the first checkpoint counts")
        assert proxy.faults, "the bucket had stopped refusing before the checkpoint counted"
        assert run.wait() == 0, run.stderr[-3000:]
    finally:
        proxy.stop()
    assert "upload of checkpoint-epoch0-step20-files1 failed" in run.stdout
    assert _names(out) == ["checkpoint-epoch0-step20-files1", "checkpoint-epoch0-step40-files1"]
    store = open_store(gcs_bucket)
    assert remote_problems(store, PREFIX) == dict.fromkeys(_names(out), "")
    assert "not uploaded" not in run.stdout


@pytest.mark.slow
def test_a_damaged_checkpoint_is_reported_once_and_never_uploaded(sample_data, gcs_bucket,
                                                                  tmp_path):
    """The newest local checkpoint is damaged and the bucket lacks it: resume says so once and
    falls back, which makes the older checkpoint the run's head (the damaged one is off the
    line): the catch-up uploads that one, never the damaged copy, and the run finishes."""
    out = tmp_path / "out"
    steps = ["--max-steps", "4", "--save-steps", "2", "--save-total-limit", "0"]
    first = train(tmp_path, "first", _args(sample_data, out, "", *steps))
    assert first.proc.returncode == 0, first.stderr[-2000:]
    newest = out / "checkpoints" / "checkpoint-epoch0-step4-files1"
    with (newest / "optimizer.pt").open("r+b") as f:  # same size, other bytes
        f.seek(100)
        f.write(b"\x00" * 64)
    # Saves at steps 3 and 6 now: the damaged step-4 folder is never written again.
    again = train(tmp_path, "again", _args(sample_data, out, gcs_bucket, "--max-steps", "6",
                                           "--save-steps", "3", "--save-total-limit", "0",
                                           "--resume", "latest"))
    assert again.proc.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stdout and "at step 2" in again.stdout
    line = (f"skipping checkpoint {newest.name}: local copy: optimizer.pt fails its crc32c "
            f"checksum (corrupted)")
    assert again.stdout.count(line) == 1, again.stdout[-3000:]
    assert "attempt 2 of" not in again.stdout and "not uploaded" not in again.stdout
    store = open_store(gcs_bucket)
    assert set(checkpoint.remote_complete(store, PREFIX)) == {
        "checkpoint-epoch0-step2-files1", "checkpoint-epoch0-step3-files1",
        "checkpoint-epoch0-step6-files1"}
    assert not [o for o in store.child(PREFIX).list() if o.name.startswith(newest.name)]


@pytest.mark.slow
def test_a_second_run_of_the_same_name_is_refused_or_overwritten(sample_data, gcs_bucket,
                                                                 tmp_path):
    out = tmp_path / "out"
    steps = ["--max-steps", "2", "--save-steps", "2", "--no-overwrite"]
    first = train(tmp_path, "first", _args(sample_data, out, gcs_bucket, *steps))
    assert first.proc.returncode == 0, first.stderr[-2000:]
    manifest = (out / "checkpoints" / _names(out)[0] / checkpoint.MARKER).read_bytes()

    second = train(tmp_path, "second", _args(sample_data, out, gcs_bucket, *steps, "--seed", "7"))
    assert second.proc.returncode == 1
    assert _error(second) == [
        f"error: run {RUN!r} already has checkpoints (1 in {out / 'checkpoints'}, 1 in "
        f"{gcs_bucket}/{PREFIX}): pass --resume latest to continue it, a new --run-name to "
        f"start another run, or --overwrite to delete them and start over"]
    assert (out / "checkpoints" / _names(out)[0] / checkpoint.MARKER).read_bytes() == manifest
    remote = open_store(gcs_bucket).child(PREFIX)
    assert remote.read_bytes(f"{_names(out)[0]}/{checkpoint.MARKER}") == manifest

    third = train(tmp_path, "third", _args(sample_data, out, gcs_bucket, *steps[:-1],
                                           "--seed", "7", "--overwrite"))
    assert third.proc.returncode == 0, third.stderr[-2000:]
    assert (f"--overwrite: starting run {RUN!r} over; deleting its checkpoint folders (1 in "
            f"{out / 'checkpoints'}, 1 in {gcs_bucket}/{PREFIX})") in third.stdout
    replaced = (out / "checkpoints" / _names(out)[0] / checkpoint.MARKER).read_bytes()
    assert replaced != manifest
    assert remote.read_bytes(f"{_names(out)[0]}/{checkpoint.MARKER}") == replaced


@pytest.mark.slow
def test_the_smoke_quick_start_twice_in_a_row_starts_over_and_says_so(sample_data, tmp_path):
    out = tmp_path / "out"
    args = ["--data-dir", str(sample_data), "--output-dir", str(out), "--bucket",
            str(tmp_path / "bucket"), "--max-steps", "2", "--save-steps", "2"]
    for name in ("once", "twice"):
        run = train(tmp_path, name, args)
        assert run.proc.returncode == 0, run.stderr[-2000:]
    assert "--overwrite: starting run 'smoke' over" in run.stdout
    assert _names(out) == ["checkpoint-epoch0-step2-files1"]


@pytest.mark.slow
def test_resume_with_another_seed_is_refused_unless_allowed(sample_data, tmp_path):
    out = tmp_path / "out"
    first = train(tmp_path, "first", _args(sample_data, out, "", "--max-steps", "2",
                                           "--save-steps", "2"))
    assert first.proc.returncode == 0, first.stderr[-2000:]
    resume = ["--max-steps", "3", "--resume", "latest", "--seed", "7"]
    refused = train(tmp_path, "refused", _args(sample_data, out, "", *resume))
    assert refused.proc.returncode == 1
    assert _error(refused) == [
        "error: checkpoint-epoch0-step2-files1 was trained with --seed 42, this run has --seed "
        "7: the window order and the held-out split derive from the seed, so part of the epoch "
        "would be trained twice and evaluation would use trained windows; resume with --seed "
        "42, or pass --allow-seed-change"]
    allowed = train(tmp_path, "allowed", _args(sample_data, out, "", *resume,
                                               "--allow-seed-change"))
    assert allowed.proc.returncode == 0, allowed.stderr[-2000:]
    assert "note: --seed changed (42 -> 7)" in allowed.stdout


def test_an_output_dir_that_cannot_be_created_is_one_line(sample_data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = train(tmp_path, "blocked", _args(sample_data, blocker / "out", "", "--max-steps", "1"))
    assert run.proc.returncode == 1
    assert _error(run) == [f"error: --output-dir {blocker / 'out'} cannot be created or written "
                           f"(Not a directory); pass a writable folder with --output-dir"]
    assert "Traceback" not in run.stderr


def test_token_ids_beyond_the_vocabulary_name_the_shard(sample_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    meta = json.loads((data / "dataset.json").read_text())
    bad = data / "zz-other-tokenizer.npy"
    np.save(bad, np.full(4096, meta["vocab_size"] + 5, dtype=np.uint16))
    run = train(tmp_path, "bad", _args(data, tmp_path / "out", "", "--max-steps", "1"))
    assert run.proc.returncode == 1
    [line] = _error(run)
    assert line.startswith(f"error: {bad}: shard has token id {meta['vocab_size'] + 5} >= "
                           f"vocabulary size {meta['vocab_size']}")
    assert "Traceback" not in run.stderr


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 72 MiB tmpfs: room for one checkpoint of the tiny model (~51 MB), not two."""
    with tmpfs(tmp_path / "disk", "72m") as mount:
        yield mount


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_loses_nothing(sample_data, small_disk,
                                                               tmp_path):
    out = small_disk / "out"
    steps = ["--max-steps", "4", "--save-steps", "2", "--save-total-limit", "0"]
    full = train(tmp_path, "full", _args(sample_data, out, "", *steps))
    assert full.proc.returncode == 1, full.stdout[-2000:]
    [line] = _error(full)
    assert re.fullmatch(
        rf"error: no space left on the device of {out / 'checkpoints'} while writing "
        r"checkpoint-epoch0-step4-files1 \(a checkpoint takes about [\d,]+ MiB, [\d,]+ MiB are "
        r"free\): free space or pass another --output-dir, then --resume latest; the partial "
        r"folder was removed and the earlier checkpoints are untouched", line), line
    assert "Traceback" not in full.stderr
    assert _names(out) == ["checkpoint-epoch0-step2-files1"]
    assert checkpoint.verify(out / "checkpoints" / _names(out)[0], hashes=True) is None
    assert not list((out / "checkpoints").glob(".tmp-*"))

    # Room again (the user freed space): the next start resumes from the earlier checkpoint.
    (tmp_path / "moved").mkdir()
    shutil.move(str(out / "checkpoints" / _names(out)[0]), tmp_path / "moved")
    (out / "checkpoints" / ".tmp-checkpoint-epoch0-step9-files1").mkdir()  # a crash's leftover
    resumed = train(tmp_path, "resumed", _args(sample_data, out, "", *steps, "--resume",
                                               "latest", "--save-steps", "4"))
    assert resumed.proc.returncode == 0, resumed.stderr[-2000:]
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_a_sigterm_during_the_final_upload_wait_is_honoured(sample_data, gcs_emulator,
                                                           gcs_bucket, tmp_path):
    """The run has ended and waits (up to an hour) for a hanging bucket: a SIGTERM cuts that
    wait to --upload-timeout-s, and the run exits 0 with the checkpoint complete locally."""
    proxy = FaultProxy(gcs_emulator.url, [])
    proxy.start()
    try:
        out = tmp_path / "out"
        run = Run(tmp_path, "hang", _args(sample_data, out, gcs_bucket, "--max-steps", "4",
                                          "--save-steps", "4", "--upload-timeout-s", "2"),
                  env={"STORAGE_EMULATOR_HOST": proxy.url})
        run.wait_for(lambda: "model tiny:" in run.stdout, "the start (bucket access checked)")
        proxy.delay_s = 60.0  # the bucket stops answering
        run.wait_for(lambda: "uploading checkpoints" in run.stderr, "the final upload wait")
        sent = time.monotonic()
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr[-2000:]
        assert time.monotonic() - sent < 10
    finally:
        proxy.stop()
    assert "signal received: waiting at most 2 s more for checkpoint uploads" in run.stdout
    assert "gave up waiting for uploads after" in run.stdout
    assert checkpoint.verify(out / "checkpoints" / "checkpoint-epoch0-step4-files1",
                             hashes=True) is None

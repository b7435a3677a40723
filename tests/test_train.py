"""The torch loop end to end, as real subprocesses of train.py on a tiny model."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from conftest import run_train
from helpers import metrics

from utils.checkpoint import find_complete, verify

TINY = ["--config", "smoke", "--seq-len", "64", "--per-device-train-batch-size", "4",
        "--eval-steps", "1000", "--eval-windows", "8"]


def _error_line(stderr: str) -> str:
    return next(line for line in stderr.replace("\r", "\n").splitlines()
                if line.startswith("error:"))


@pytest.mark.slow
def test_short_run_learns_logs_and_checkpoints(sample_data, tmp_path):
    out, bucket = tmp_path / "out", tmp_path / "bucket"
    result = run_train(*TINY, "--data-dir", str(sample_data), "--output-dir", str(out),
                       "--bucket", str(bucket), "--max-steps", "40", "--logging-steps", "5",
                       "--save-steps", "20", "--eval-steps", "20", "--learning-rate", "3e-3",
                       tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = metrics(out)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30, 35, 40]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "memory_gib", "eta_s"):
        assert all(key in r for r in records), key
    assert records[-1]["loss"] < records[0]["loss"] - 1.0  # it learns
    assert "eval_loss" in records[3] and "eval_loss" in records[-1]
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard events"
    local = [p.name for p in find_complete(out / "checkpoints")]
    assert local == ["checkpoint-epoch0-step20-files1", "checkpoint-epoch0-step40-files1"]
    remote = bucket / "checkpoints" / "smoke"
    for name in local:
        assert verify(remote / name, hashes=True) is None
    assert "4,208,128 parameters" in result.stdout and "final loss" in result.stdout


def test_non_finite_steps_stop_with_one_line_and_no_complete_checkpoint(sample_data, tmp_path):
    out = tmp_path / "out"
    result = run_train(*TINY, "--data-dir", str(sample_data), "--output-dir", str(out),
                       "--bucket", "", "--max-steps", "20", "--logging-steps", "2",
                       "--save-steps", "4", "--learning-rate", "1e30", "--warmup-steps", "0",
                       "--max-skipped-steps", "0", "--max-rollbacks", "0", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "had a non-finite loss or gradient norm and were skipped" in _error_line(
        result.stderr)
    assert find_complete(out / "checkpoints") == []


def test_missing_data_directory_is_a_clear_error(tmp_path):
    result = run_train(*TINY, "--data-dir", str(tmp_path / "nowhere"), "--bucket", "",
                       "--output-dir", str(tmp_path / "out"), tmp_path=tmp_path)
    assert result.returncode == 1
    line = _error_line(result.stderr)
    assert str(tmp_path / "nowhere") in line and "data.prepare" in line


def test_corrupt_shard_is_named(sample_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_data, data)
    shard = sorted(data.glob("*.npy"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    result = run_train(*TINY, "--data-dir", str(data), "--bucket", "",
                       "--output-dir", str(tmp_path / "out"), tmp_path=tmp_path)
    assert result.returncode == 1
    assert shard.name in _error_line(result.stderr)


def test_unknown_flag_via_cli_exits_2_with_one_line(tmp_path):
    result = run_train("--config", "smoke", "--no-such-flag", tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--no-such-flag" in result.stderr


@pytest.mark.slow
def test_validate_passes_on_smoke_and_fails_without_data(sample_data, tmp_path):
    ok = run_train(*TINY, "--validate", "--data-dir", str(sample_data), "--bucket",
                   str(tmp_path / "bucket"), "--output-dir", str(tmp_path / "out"),
                   tmp_path=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("[PASS]") == 9
    budget = next(line for line in ok.stdout.splitlines() if "preemption budget" in line)
    # The bucket was timed at --upload-streams and at one stream, side by side.
    assert re.search(r"tiny checkpoint [\d.]+ GB: save [\d.]+ s \+ upload [\d.]+ s at 16 "
                     r"stream\(s\) \([\d.]+ GB/s measured\); 1 stream [\d.]+ s .* fits the 25 s "
                     r"budget", budget), budget
    assert not any((tmp_path / "bucket" / "preflight").rglob("*.safetensors"))  # cleaned up
    bad = run_train(*TINY, "--validate", "--data-dir", str(tmp_path / "none"), "--bucket", "",
                    "--output-dir", str(tmp_path / "out"), tmp_path=tmp_path)
    assert bad.returncode == 1 and "[FAIL] data present and readable" in bad.stdout


def test_bf16_autocast_path_runs(sample_data, tmp_path):
    out = tmp_path / "out"
    result = run_train(*TINY, "--data-dir", str(sample_data), "--output-dir", str(out),
                       "--bucket", "", "--max-steps", "4", "--logging-steps", "2",
                       "--save-steps", "4", "--mixed-precision", "bf16", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(np.isfinite(r["loss"]) for r in metrics(out))


@pytest.mark.slow
def test_compile_path_runs_on_cpu(sample_data, tmp_path):
    out = tmp_path / "out"
    result = run_train(*TINY, "--data-dir", str(sample_data), "--output-dir", str(out),
                       "--bucket", "", "--max-steps", "3", "--logging-steps", "1",
                       "--save-steps", "3", "--compile", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running eager" not in result.stdout
    # The compile time reported is the first step's own (printed once), not the set-up's.
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("torch.compile: the first")]
    assert line.endswith("(compiling included)")
    assert len(metrics(out)) == 3 and find_complete(out / "checkpoints")


@pytest.mark.slow
def test_train_syncs_data_from_gcs_and_uploads_checkpoints(gcs_bucket, sample_data, tmp_path):
    from utils.storage import open_store, sync_up

    store = open_store(gcs_bucket)
    sync_up(sample_data, store, "training/nested", progress=False)
    data, out = tmp_path / "data", tmp_path / "out"
    result = run_train(*TINY, "--sync-data", "--bucket", gcs_bucket, "--data-dir", str(data),
                       "--output-dir", str(out), "--max-steps", "4", "--logging-steps", "2",
                       "--save-steps", "4", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (data / "nested").glob("*.npy")) == sorted(
        p.name for p in sample_data.glob("*.npy"))
    files = [p for p in sample_data.iterdir() if not p.name.startswith(".")]
    assert f"downloaded {len(files)} " in result.stdout  # shards + dataset.json
    remote = {o.name for o in store.child("checkpoints/smoke").list()}
    name = find_complete(out / "checkpoints")[-1].name
    assert f"{name}/COMPLETE.json" in remote and f"{name}/model.safetensors" in remote
    again = run_train(*TINY, "--sync-data", "--bucket", gcs_bucket, "--data-dir", str(data),
                      "--output-dir", str(tmp_path / "out2"), "--max-steps", "1",
                      tmp_path=tmp_path)
    assert again.returncode == 0 and f"downloaded 0 (0.0 MB), skipped {len(files)}" in again.stdout

"""Saves that fit a spot VM: the snapshot is the only blocking part and is isolated from the
training that follows; timed saves; permanent checkpoints in the bucket; one record per save."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from helpers import metrics, remote_problems, train
from test_checkpoint import _setup, _state, _step

from utils.checkpoint import step_of
from utils.storage import open_store
from utils.torch_engine.checkpoint_io import HostStaging, save_checkpoint, take_snapshot

RUN = "spot"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_snapshot_written_after_more_training_is_the_synchronous_save(tmp_path):
    """The background write sees the state of the snapshot, not the weights trained since."""
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = _setup(accelerator, seed=0)
    batch = torch.randint(0, 256, (2, 17))
    _step(accelerator, model, optimizer, scheduler, batch)
    sync = save_checkpoint(accelerator, model, optimizer, scheduler, _state(1), {"a": 1},
                           tmp_path / "sync")
    staging = HostStaging()
    snapshot = take_snapshot(accelerator, model, optimizer, scheduler, _state(1), {"a": 1},
                             tmp_path / "async", staging)
    for _ in range(2):  # training goes on (in place) before the write happens
        _step(accelerator, model, optimizer, scheduler, batch)
    path = snapshot.write()
    assert _files(path) == _files(sync)
    assert snapshot.nbytes > 3 * sum(p.numel() * 4 for p in model.parameters())  # w + 2 moments
    # The next snapshot reuses the host buffers (one copy of the state, however many saves).
    buffers = {k: v.data_ptr() for k, v in staging.buffers.items()}
    take_snapshot(accelerator, model, optimizer, scheduler, _state(3), {}, tmp_path / "b",
                  staging)
    assert {k: v.data_ptr() for k, v in staging.buffers.items()} == buffers


@pytest.mark.slow
def test_time_based_saves_and_one_record_per_checkpoint(sample_data, tmp_path):
    out = tmp_path / "out"
    run = train(tmp_path, "timed", ["--data-dir", str(sample_data), "--output-dir", str(out),
                                    "--bucket", str(tmp_path / "bucket"), "--run-name", RUN,
                                    "--max-steps", "24", "--save-steps", "1000",
                                    "--save-interval-minutes", "0.01"])
    assert run.proc.returncode == 0, run.stderr[-2000:]
    records = metrics(out, "checkpoint")
    steps = [r["step"] for r in records]
    # Every 0.6 s (a few steps here) besides the last step, each saved once.
    assert len(steps) >= 3 and steps[-1] == 24 and len(set(steps)) == len(steps), steps
    for r in records:
        assert r["name"] == f"checkpoint-epoch0-step{r['step']}-files1"
        assert r["bytes"] > 1e6 and 0 <= r["blocking_s"] < r["blocking_s"] + r["write_s"]
        # Uploaded to the (local-directory) bucket, or skipped because uploads fell behind.
        assert (r["upload_s"] or 0) > 0 or f"checkpoint {r['name']} not uploaded" in run.stdout
    assert records[-1]["upload_s"] > 0
    assert "training blocked" in run.stdout.split("saving", 1)[1]  # the summary's totals


@pytest.mark.slow
def test_keep_every_steps_keeps_permanent_checkpoints_in_the_bucket(sample_data, gcs_bucket,
                                                                    gcs_emulator, tmp_path):
    out = tmp_path / "out"
    run = train(tmp_path, "tiers", ["--data-dir", str(sample_data), "--output-dir", str(out),
                                    "--bucket", gcs_bucket, "--run-name", RUN, "--max-steps",
                                    "20", "--save-steps", "4", "--remote-keep", "1",
                                    "--keep-every-steps", "8"],
                env={"STORAGE_EMULATOR_HOST": gcs_emulator.url})
    assert run.proc.returncode == 0, run.stderr[-2000:]
    remote = remote_problems(open_store(gcs_bucket), f"checkpoints/{RUN}")
    assert sorted(step_of(name) for name in remote) == [8, 16, 20], remote
    assert not any(remote.values())
    records = {r["step"]: r for r in metrics(out, "checkpoint")}
    assert sorted(records) == [4, 8, 12, 16, 20]
    assert json.dumps(records[8])  # serialisable, written once per checkpoint

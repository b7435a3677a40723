"""Resume and preemption with train.py as real processes against a real GCS emulator.

Interrupted runs resume bit for bit; SIGTERM/SIGINT save, upload and exit 0 (a second one
exits at once); kill -9 at any moment never leaves a complete-looking checkpoint that fails
to load; a bucket that dies mid-upload does not stop training; a corrupted checkpoint is
skipped.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from gcs_emulator import FaultProxy, GcsEmulator
from helpers import Run, last_step, metrics, remote_problems, train

from configs.training_config import TrainingConfig
from utils import checkpoint
from utils.data import read_dataset_meta
from utils.loop.schedule import lr_factor
from utils.loop.signals import REPEAT_S
from utils.storage import open_store
from utils.torch_engine import checkpoint_io
from utils.torch_engine.model import build_model
from utils.torch_engine.optim import build_adamw

RUN = "run"
PREFIX = f"checkpoints/{RUN}"


def _args(data: Path, out: Path, bucket: str, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), "--bucket", bucket,
            "--run-name", RUN, *extra]


def _resumed_from(run: Run) -> str | None:
    match = re.search(r"resumed from \S+/(checkpoint-\S+) at step", run.stdout)
    return match.group(1) if match else None


@pytest.mark.slow
def test_interrupted_run_resumes_bit_for_bit_from_the_bucket(sample_data, gcs_bucket,
                                                              tmp_path):
    """SIGTERM -> save + upload + exit 0; local copy lost; --resume latest downloads it."""
    steps = ["--max-steps", "8", "--save-steps", "4"]
    whole = train(tmp_path, "whole", _args(sample_data, tmp_path / "whole", "", *steps))
    assert whole.proc.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "cut"
    first = Run(tmp_path, "first", _args(sample_data, out, gcs_bucket, *steps))
    first.wait_for(lambda: last_step(out) >= 2, "step 2")
    first.signal(signal.SIGTERM)
    assert first.wait() == 0, first.stderr[-2000:]
    stopped = int(re.search(r"stopping at step (\d+) on request", first.stdout).group(1))
    assert 2 <= stopped < 8
    name = f"checkpoint-epoch0-step{stopped}-files1"
    assert "SIGTERM received" in first.stderr
    store = open_store(gcs_bucket)
    assert remote_problems(store, PREFIX)[name] == ""  # uploaded, marker last, before exit

    shutil.rmtree(out / "checkpoints")  # the machine is gone; the bucket has the run
    second = train(tmp_path, "second", _args(sample_data, out, gcs_bucket, *steps,
                                             "--resume", "latest"))
    assert second.proc.returncode == 0, second.stderr[-2000:]
    assert _resumed_from(second) == name
    assert checkpoint.verify(out / "checkpoints" / name, hashes=True) is None  # downloaded
    expected, got = metrics(tmp_path / "whole"), metrics(out)
    assert [r["step"] for r in got] == list(range(1, 9))
    for key in ("loss", "grad_norm", "lr", "tokens_seen"):
        assert [r[key] for r in got] == [r[key] for r in expected], key  # bit for bit


def test_a_second_signal_exits_at_once(sample_data, gcs_emulator, gcs_bucket, tmp_path):
    proxy = FaultProxy(gcs_emulator.url, [])
    proxy.start()
    try:
        out = tmp_path / "out"
        run = Run(tmp_path, "run", _args(sample_data, out, gcs_bucket, "--max-steps", "50",
                                         "--save-steps", "50"),
                  env={"STORAGE_EMULATOR_HOST": proxy.url})
        run.wait_for(lambda: last_step(out) >= 2, "step 2")
        proxy.delay_s = 5.0  # the bucket turns slow: the upload wait will take a while
        run.signal(signal.SIGINT)
        first = time.monotonic()
        run.signal(signal.SIGINT)  # the same stop delivered twice at once counts once
        run.wait_for(lambda: "stopping at step" in run.stdout, "the stop checkpoint")
        time.sleep(max(0.5, REPEAT_S + 0.2 - (time.monotonic() - first)))
        sent = time.monotonic()
        run.signal(signal.SIGINT)
        code = run.wait()
        took = time.monotonic() - sent
    finally:
        proxy.stop()
    assert code == 128 + signal.SIGINT and took < 5
    assert "SIGINT received" in run.stderr and "second SIGINT: exiting now" in run.stderr
    # The checkpoint itself was complete locally before the wait for the upload began.
    name = re.search(r"checkpoint (checkpoint-\S+)", run.stdout).group(1)
    assert checkpoint.verify(out / "checkpoints" / name, hashes=True) is None


@pytest.mark.slow
def test_preemption_fits_the_budget_and_the_next_run_uploads_the_rest(
        sample_data, gcs_emulator, gcs_bucket, tmp_path):
    """SIGTERM while the bucket hangs: exit 0 within --preemption-budget-s (+2 s) with the
    checkpoint complete locally and a line saying what happened; the rerun uploads it."""
    proxy = FaultProxy(gcs_emulator.url, [])
    proxy.start()
    try:
        out = tmp_path / "out"
        env = {"STORAGE_EMULATOR_HOST": proxy.url}
        run = Run(tmp_path, "cut", _args(sample_data, out, gcs_bucket, "--max-steps", "50",
                                         "--save-steps", "50", "--preemption-budget-s", "5"),
                  env=env)
        run.wait_for(lambda: last_step(out) >= 2, "step 2")
        proxy.delay_s = 60.0  # the bucket stops answering
        sent = time.monotonic()
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr[-2000:]
        assert time.monotonic() - sent < 5 + 2
        stopped = int(re.search(r"stopping at step (\d+) on request", run.stdout).group(1))
        report = re.search(rf"preempted at step {stopped}: checkpoint written locally in "
                           rf"[0-9.]+ s; upload \d+% done at the 5 s budget; the bucket's "
                           rf"newest complete checkpoint from this run is none; the rest "
                           rf"uploads at the next start", run.stdout)
        assert report, run.stdout[-2000:]
        name = f"checkpoint-epoch0-step{stopped}-files1"
        assert checkpoint.verify(out / "checkpoints" / name, hashes=True) is None
        store = open_store(gcs_bucket)  # straight to the emulator
        assert remote_problems(store, PREFIX) == {}

        proxy.delay_s = 0.0
        rerun = train(tmp_path, "rerun", _args(sample_data, out, gcs_bucket, "--max-steps",
                                               str(stopped + 1), "--save-steps", "50",
                                               "--resume", "latest"), env=env)
        assert rerun.proc.returncode == 0, rerun.stderr[-2000:]
        assert f"{name} is complete locally but not in the bucket: uploading it" in rerun.stdout
        after = f"checkpoint-epoch0-step{stopped + 1}-files1"
        assert remote_problems(store, PREFIX) == {name: "", after: ""}
    finally:
        proxy.stop()


def _check_after_kill(out: Path, store, loaded: set[tuple[str, str]],
                      accelerator: Accelerator, data: Path) -> str | None:
    """Every checkpoint marked complete (locally or remotely) is whole and loads.

    Returns the newest complete one: the one the next --resume latest must take.
    """
    root = out / "checkpoints"
    complete = {}
    for path in root.iterdir() if root.exists() else []:
        if checkpoint.step_of(path.name) is None or not (path / checkpoint.MARKER).exists():
            continue
        assert checkpoint.verify(path, hashes=True) is None, path.name
        key = (path.name, (path / checkpoint.MARKER).read_text())
        if key not in loaded:  # load each distinct checkpoint once
            config = TrainingConfig(model="tiny")
            model = build_model(config, read_dataset_meta(data))
            optimizer = build_adamw(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: lr_factor(s, warmup_steps=1, max_steps=10, min_ratio=0.1))
            state = checkpoint_io.load_checkpoint(accelerator, model, optimizer, scheduler, path)
            assert state.step == checkpoint.step_of(path.name)
            loaded.add(key)
        complete[path.name] = path
    remote = remote_problems(store, PREFIX)
    assert not any(remote.values()), remote
    names = set(complete) | set(remote)
    return max(names, key=checkpoint.step_of) if names else None


def _kill_during(run: Run, happening, what: str) -> None:
    """SIGKILL while happening() holds: freeze the process first, so the kill cannot miss."""
    for _ in range(10):
        run.wait_for(happening, what, poll_s=0.002)
        run.signal(signal.SIGSTOP)
        if happening():
            run.signal(signal.SIGKILL)
            return
        run.signal(signal.SIGCONT)  # it finished between the look and the stop: next one
    raise AssertionError(f"never caught train.py {what}")


@pytest.mark.slow
def test_kill_9_at_any_moment_never_leaves_a_bad_complete_checkpoint(sample_data, gcs_bucket,
                                                                      tmp_path):
    """A chain of runs, each killed with SIGKILL, each resuming from what the last one left."""
    out = tmp_path / "out"
    root = out / "checkpoints"
    store = open_store(gcs_bucket)
    accelerator = Accelerator(cpu=True)
    loaded: set[tuple[str, str]] = set()
    rng = random.Random(1234)

    def writing() -> bool:  # a checkpoint is being written locally right now
        return root.exists() and any(p.name.startswith(".tmp-checkpoint") for p in root.iterdir())

    def uploading() -> bool:  # files of a checkpoint are in the bucket, its marker is not
        listed = [o.name for o in store.child(PREFIX).list()]
        done = {n.split("/")[0] for n in listed if n.endswith(checkpoint.MARKER)}
        return any(n.split("/")[0] not in done for n in listed)

    moments = ["writing", "uploading"] + [f"random {rng.uniform(0.0, 2.5):.2f}" for _ in range(3)]
    expected = None
    for i, moment in enumerate([*moments, "last"]):
        run = Run(tmp_path, f"run{i}", _args(sample_data, out, gcs_bucket, "--max-steps", "5000",
                                             "--save-steps", "3", "--resume", "latest"))
        run.wait_for(lambda r=run: "model tiny:" in r.stdout, "the start", poll_s=0.05)
        assert _resumed_from(run) == expected, (moment, run.stdout[-2000:])
        if expected is None:
            assert "starting from scratch" in run.stdout
        if moment == "last":
            run.signal()
            run.wait()
            break
        start = last_step(out)
        run.wait_for(lambda s=start: last_step(out) > s, "a first step", poll_s=0.02)
        if moment in ("writing", "uploading"):
            _kill_during(run, writing if moment == "writing" else uploading, moment)
        else:  # past a new complete checkpoint first: a loaded machine still makes progress
            before = [c.name for c in checkpoint.find_complete(root)]
            run.wait_for(lambda b=before: [c.name for c in checkpoint.find_complete(root)] != b,
                         "a new complete checkpoint", poll_s=0.02)
            time.sleep(float(moment.split()[1]))
            run.signal(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
        expected = _check_after_kill(out, store, loaded, accelerator, sample_data)
        if i == 2:  # what a kill inside a metrics write leaves: the next run must not mind
            with (out / "metrics.jsonl").open("a") as f:
                f.write('{"step": 99999, "lo')
    assert expected is not None and len(loaded) >= 2


@pytest.mark.slow
def test_bucket_dying_mid_upload_does_not_stop_training(sample_data, tmp_path, monkeypatch):
    """The emulator is killed during a checkpoint upload and comes back once training has
    gone on by two steps."""
    steps = 30
    emulator = GcsEmulator(tmp_path / "gcs", backend="filesystem")
    emulator.start()
    bucket = emulator.create_bucket("persistent")
    out = tmp_path / "out"
    seen: dict[str, int] = {}

    def outage() -> None:
        emulator.kill()
        seen["down"] = last_step(out)

        def back() -> None:  # once training has gone on (not after a fixed clock)
            while last_step(out) < min(seen["down"] + 2, steps):
                time.sleep(0.05)
            seen["up"] = last_step(out)
            emulator.start()

        threading.Thread(target=back, daemon=True).start()

    # upload_id=: the data request of a resumable upload (model/optimizer files > 8 MiB).
    proxy = FaultProxy(emulator.url, [outage], match="upload_id=")
    proxy.start()
    try:
        run = train(tmp_path, "run", _args(sample_data, out, bucket, "--max-steps", str(steps),
                                           "--save-steps", "10"),
                    env={"STORAGE_EMULATOR_HOST": proxy.url})
        assert run.proc.returncode == 0, run.stderr[-3000:]
        assert proxy.served == [outage]
        assert seen["up"] > seen["down"]  # steps went on while the bucket was down
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
        remote = remote_problems(open_store(bucket), PREFIX)
        assert remote == {f"checkpoint-epoch0-step{s}-files1": "" for s in (10, 20, 30)}
    finally:
        proxy.stop()
        emulator.stop()


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_skipped(sample_data, tmp_path):
    out = tmp_path / "out"
    steps = ["--max-steps", "6", "--save-steps", "3"]
    first = train(tmp_path, "first", _args(sample_data, out, "", *steps))
    assert first.proc.returncode == 0, first.stderr[-2000:]
    newest = out / "checkpoints" / "checkpoint-epoch0-step6-files1"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    weights.write_bytes(bytes(data))

    named = train(tmp_path, "named", _args(sample_data, out, "", *steps,
                                           "--resume", newest.name))
    assert named.proc.returncode == 1
    error = [line for line in named.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "model.safetensors fails its crc32c" in error[0]
    assert "--resume latest" in error[0]

    latest = train(tmp_path, "latest", _args(sample_data, out, "", "--max-steps", "7",
                                             "--save-steps", "3", "--resume", "latest"))
    assert latest.proc.returncode == 0, latest.stderr[-2000:]
    assert f"skipping checkpoint {newest.name}" in latest.stdout
    assert _resumed_from(latest) == "checkpoint-epoch0-step3-files1"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6, 7]

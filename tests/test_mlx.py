"""The MLX pretraining loop as real processes on the CPU, against torch and a real GCS emulator.

It learns and logs like the torch loop; its checkpoints have the shared layout and marker,
upload to the bucket and load in transformers with the same logits; torch checkpoints load
(and resume) in MLX; SIGTERM saves and exits 0, and the resumed run repeats the uninterrupted
run's losses bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from gcs_emulator import GcsEmulator
from helpers import REPO, TINY, Run, finish, last_step, metrics, remote_problems, ring_ports, train
from mlx.utils import tree_flatten, tree_unflatten
from transformers import GPTNeoXForCausalLM

from configs.model_config import MODEL_SIZES, to_hf_config
from utils import checkpoint
from utils.checkpoint import CheckpointError
from utils.loop.schedule import lr_factor
from utils.mlx_engine.blas import openblas_preload
from utils.mlx_engine.checkpoint_io import load_checkpoint
from utils.mlx_engine.model import build_model, build_optimizer, load_pretrained, model_args
from utils.storage import open_store

MLX = ["--backend", "mlx"]
ENV = openblas_preload()  # MLX processes only; {} where Debian's OpenBLAS is not installed
RUN = "mlx"


def _args(data: Path, out: Path, *extra: str, bucket: str = "") -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), "--bucket", bucket,
            "--run-name", RUN, *extra]


def _checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"checkpoint-epoch0-step{step}-files1"


def _logits(ckpt: Path) -> tuple[np.ndarray, np.ndarray]:
    """fp32 logits of the same tokens from transformers and from MLX, both loading ``ckpt``."""
    ids = np.random.default_rng(0).integers(0, 2048, (2, 48))
    torch_model = GPTNeoXForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(ids)).logits.numpy()
    mlx_model, _ = load_pretrained(ckpt)
    return expected, np.array(mlx_model(mx.array(ids.astype(np.int32))))


@pytest.fixture(scope="module")
def torch_out(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch trains 12 steps (checkpoints at 10 and 12): the reference for cross-backend checks."""
    tmp = tmp_path_factory.mktemp("torch")
    run = train(tmp, "torch", _args(sample_data, tmp / "out", "--max-steps", "12",
                                    "--save-steps", "10"))
    assert run.proc.returncode == 0, run.stderr[-2000:]
    return tmp / "out"


@pytest.fixture(scope="module")
def mlx_out(sample_data: Path, gcs_emulator: GcsEmulator,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`train.py --backend mlx`: 40 steps, checkpoints at 20 and 40 uploaded to the emulator."""
    tmp = tmp_path_factory.mktemp("mlx")
    bucket = gcs_emulator.create_bucket(f"mlx-pretrain-{tmp.name}")
    run = train(tmp, "mlx", [*MLX, *_args(sample_data, tmp / "out", "--max-steps", "40",
                                          "--save-steps", "20", "--eval-steps", "20",
                                          bucket=bucket)],
                env={**ENV, "STORAGE_EMULATOR_HOST": gcs_emulator.url})
    assert run.proc.returncode == 0, run.stderr[-2000:]
    assert "mlx on Device(cpu" in run.stdout
    return tmp / "out", bucket


@pytest.mark.slow
def test_mlx_pretraining_learns_and_logs_like_torch(mlx_out):
    out, _ = mlx_out
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 41))
    for r in records:
        assert r["lr"] == 2e-3 * lr_factor(r["step"], 15, 40, 0.1)  # smoke: 2e-3, warmup 15
        assert r["tokens_seen"] == r["step"] * 4 * 64
        assert r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    first, last = (np.mean([r["loss"] for r in records[s]]) for s in (slice(0, 5), slice(-5, None)))
    assert first - last > 1.0, (first, last)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert list((out / "logs" / RUN).glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_mlx_checkpoints_are_complete_uploaded_and_counted_only_with_a_marker(
        mlx_out, gcs_emulator, monkeypatch, tmp_path):
    out, bucket = mlx_out
    for step in (20, 40):
        ckpt = _checkpoint(out, step)
        assert checkpoint.verify(ckpt, hashes=True) is None
        assert {"config.json", "model.safetensors", "optimizer.safetensors",
                "trainer_state.json", "tokenizer.json"} <= {p.name for p in ckpt.iterdir()}
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        assert saved["backend"] == "mlx" and saved["state"]["step"] == step
        moments = mx.load(str(ckpt / "optimizer.safetensors"))
        assert moments["step"].item() == step
        assert {v.dtype for v in mx.load(str(ckpt / "model.safetensors")).values()} == {mx.float32}
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    uploaded = remote_problems(open_store(bucket), f"checkpoints/{RUN}")
    assert uploaded == {_checkpoint(out, 20).name: "", _checkpoint(out, 40).name: ""}

    copy = tmp_path / "checkpoints"
    shutil.copytree(out / "checkpoints", copy)
    (copy / _checkpoint(out, 40).name / checkpoint.MARKER).unlink()
    assert [p.name for p in checkpoint.find_complete(copy)] == [_checkpoint(out, 20).name]


@pytest.mark.slow
def test_mlx_checkpoint_loads_in_transformers_and_mlx_lm_with_the_same_logits(mlx_out):
    from mlx_lm.utils import load_model

    ckpt = _checkpoint(mlx_out[0], 40)
    expected, got = _logits(ckpt)
    assert np.abs(expected - got).max() < 1e-4
    assert np.abs(expected).max() > 1.0  # trained, not all zeros
    model, _ = load_model(ckpt)  # mlx-lm's own loader reads the same folder
    ids = mx.array(np.arange(32, dtype=np.int32)[None])
    assert np.array_equal(np.array(model(ids)), np.array(load_pretrained(ckpt)[0](ids)))


@pytest.mark.slow
def test_torch_checkpoint_loads_in_mlx_with_the_same_logits(torch_out):
    expected, got = _logits(_checkpoint(torch_out, 10))
    assert np.abs(expected - got).max() < 1e-4


@pytest.mark.slow
def test_torch_checkpoint_resumes_in_mlx(sample_data, torch_out, tmp_path):
    """Same weights, Adam moments, step and data position: MLX continues torch's run."""
    out = tmp_path / "out"
    name = _checkpoint(torch_out, 10).name
    shutil.copytree(_checkpoint(torch_out, 10), out / "checkpoints" / name)
    run = train(tmp_path, "resume", [*MLX, *_args(sample_data, out, "--max-steps", "12",
                                                  "--save-steps", "10", "--resume", name)],
                env=ENV)
    assert run.proc.returncode == 0, run.stderr[-2000:]
    assert f"resumed from {out / 'checkpoints' / name} at step 10" in run.stdout
    torch_losses = {r["step"]: r["loss"] for r in metrics(torch_out)}
    mlx_losses = {r["step"]: r["loss"] for r in metrics(out)}
    assert sorted(mlx_losses) == [11, 12]
    for step in (11, 12):
        assert abs(mlx_losses[step] - torch_losses[step]) < 1e-4, (step, mlx_losses, torch_losses)


@pytest.mark.slow
def test_sigterm_saves_and_the_resumed_run_is_bit_for_bit_the_uninterrupted_one(
        sample_data, tmp_path):
    """Each process gets its own PYTHONHASHSEED: parameter order must not depend on it."""
    steps = ["--max-steps", "16", "--save-steps", "4", "--gradient-accumulation-steps", "2"]
    whole = train(tmp_path, "whole", [*MLX, *_args(sample_data, tmp_path / "whole", *steps)],
                  env={**ENV, "PYTHONHASHSEED": "1"})
    assert whole.proc.returncode == 0, whole.stderr[-2000:]

    out = tmp_path / "cut"
    first = Run(tmp_path, "first", [*MLX, *_args(sample_data, out, *steps)],
                env={**ENV, "PYTHONHASHSEED": "2"})
    first.wait_for(lambda: last_step(out) >= 5, "step 5")
    first.signal(signal.SIGTERM)
    assert first.wait() == 0, first.stderr[-2000:]
    assert "SIGTERM received" in first.stderr
    stopped = int(re.search(r"stopping at step (\d+) on request", first.stdout).group(1))
    assert 5 <= stopped < 16
    newest = _checkpoint(out, stopped)
    assert checkpoint.verify(newest, hashes=True) is None
    (newest / checkpoint.MARKER).unlink()  # as if killed before the marker: must not count
    older = checkpoint.find_complete(out / "checkpoints")[-1]
    assert checkpoint.step_of(older.name) < stopped

    second = train(tmp_path, "second", [*MLX, *_args(sample_data, out, *steps,
                                                     "--resume", "latest")],
                   env={**ENV, "PYTHONHASHSEED": "3"})
    assert second.proc.returncode == 0, second.stderr[-2000:]
    assert f"resumed from {older} at step {checkpoint.step_of(older.name)}" in second.stdout
    expected, got = metrics(tmp_path / "whole"), metrics(out)
    assert [r["step"] for r in got] == list(range(1, 17))
    for key in ("loss", "grad_norm", "lr", "tokens_seen", "eval_loss"):
        assert [r.get(key) for r in got] == [r.get(key) for r in expected], key


@pytest.mark.slow
def test_bf16_computes_in_bf16_and_keeps_fp32_master_weights(sample_data, mlx_out, tmp_path):
    out = tmp_path / "out"
    run = train(tmp_path, "bf16", [*MLX, *_args(sample_data, out, "--max-steps", "2",
                                                "--mixed-precision", "bf16")], env=ENV)
    assert run.proc.returncode == 0, run.stderr[-2000:]
    fp32_first = metrics(mlx_out[0])[0]["loss"]  # same init, batch and LR at step 1
    bf16_first = metrics(out)[0]["loss"]
    assert bf16_first != fp32_first and abs(bf16_first - fp32_first) < 0.05
    weights = mx.load(str(_checkpoint(out, 2) / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.float32}


@pytest.mark.slow
def test_compiled_step_matches_the_eager_one(sample_data, mlx_out, tmp_path):
    """mx.compile (first compile 20-30 s) gives the eager run's losses within float noise."""
    out = tmp_path / "out"
    run = train(tmp_path, "compiled", [*MLX, *_args(sample_data, out, "--max-steps", "6",
                                                    "--compile")], env=ENV)
    assert run.proc.returncode == 0, run.stderr[-2000:]
    assert "compile True" in run.stdout
    eager = [r["loss"] for r in metrics(mlx_out[0])[:5]]  # warmup: the LR does not depend on
    compiled = [r["loss"] for r in metrics(out)[:5]]     # max_steps yet
    assert np.allclose(compiled, eager, rtol=0, atol=1e-3), (compiled, eager)


BROADCAST = """
import sys
sys.path.insert(0, sys.argv[1])
from utils.mlx_engine.dist import MlxProcesses
ranks = MlxProcesses()
rows = [[f"s{i:05d}.npy", 7 * i, "crc==", None] for i in range(5000)]
got = ranks.broadcast_object([rows if ranks.is_main_process else None, "é"])
assert got == [rows, "é"], got[:1]
print("rank", ranks.process_index, "received", len(got[0]))
"""


def test_mlx_ranks_broadcast_a_listing_sized_object(tmp_path):
    """Rank 0's objects reach the other rank whole, whatever their size (a streamed bucket's
    listing: 5,000 objects, about 190 KB of JSON) and text."""
    script = tmp_path / "broadcast.py"
    script.write_text(BROADCAST)
    done = finish(
        [str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring", "-n", "2",
         *ring_ports(), sys.executable, str(script), str(REPO)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(re.findall(r"rank (\d) received 5000", done.stdout)) == ["0", "1"]


@pytest.mark.slow
def test_two_mlx_launch_ranks_train_like_one_process_with_the_same_global_batch(
        sample_data, mlx_out, tmp_path):
    """`mlx.launch -n 2` x batch 2 repeats the one-process batch-4 losses; rank 0 alone writes."""
    out = tmp_path / "out"
    launcher = Path(sys.executable).parent / "mlx.launch"
    done = finish(
        [str(launcher), "--backend", "ring", "-n", "2", *ring_ports(), sys.executable,
         "mlx_train.py", *TINY,
         *_args(sample_data, out, "--max-steps", "10", "--save-steps", "10",
                "--per-device-train-batch-size", "2")],
        cwd=REPO,
        env={**os.environ, **ENV, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("x 2 processes = 4 sequences") == 1  # printed by rank 0 only
    two = metrics(out)
    assert [r["step"] for r in two] == list(range(1, 11))  # one writer
    one = metrics(mlx_out[0])[:10]  # warm-up: the LR does not depend on max_steps yet
    assert [r["tokens_seen"] for r in two] == [r["tokens_seen"] for r in one]
    assert np.allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=0, atol=1e-4)
    assert [p.name for p in checkpoint.find_complete(out / "checkpoints")] == [
        "checkpoint-epoch0-step10-files1"]
    state = json.loads((_checkpoint(out, 10) / "trainer_state.json").read_text())["state"]
    assert state["world_size"] == 2 and state["global_batch_windows"] == 4

    # One process (batch 4) resumes the two ranks' checkpoint and goes on as the 1-process run.
    run = train(tmp_path, "resumed", [*MLX, *_args(sample_data, out, "--max-steps", "12",
                                                   "--resume", "latest")], env=ENV)
    assert run.proc.returncode == 0, run.stderr[-2000:]
    assert "at step 10" in run.stdout
    resumed = [r["loss"] for r in metrics(out) if r["step"] > 10]
    expected = [r["loss"] for r in metrics(mlx_out[0])[10:12]]
    assert np.allclose(resumed, expected, rtol=0, atol=1e-4), (resumed, expected)


def test_unsupported_precision_is_one_line_from_the_mlx_cli(sample_data, tmp_path):
    result = finish(
        [sys.executable, "mlx_train.py", *_args(sample_data, tmp_path), "--mixed-precision",
         "fp16"], cwd=REPO)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --mixed-precision fp16 is not supported by the MLX backend (no loss scaler); "
        "use bf16 or no"]


def test_weight_decay_skips_biases_and_norms():
    """With zero gradients Adam moves nothing: what changes is decay alone."""
    model = build_model(to_hf_config(MODEL_SIZES["tiny"], vocab_size=64).to_dict(), seed=0)
    params = dict(tree_flatten(model.parameters()))
    optimizer = build_optimizer(0.5, 0.1, (0.9, 0.95), 1e-8)
    zeros = {k: mx.zeros_like(v) for k, v in params.items()}
    updated = dict(tree_flatten(optimizer.apply_gradients(tree_unflatten(list(zeros.items())),
                                                          model.parameters())))
    for name, before in params.items():
        factor = 1.0 if before.ndim < 2 else 1 - 0.5 * 0.1
        assert np.allclose(np.array(updated[name]), np.array(before) * factor, atol=1e-7), name
    assert any(v.ndim < 2 and "layernorm" in k for k, v in params.items())


def test_configs_mlx_lm_cannot_run_are_refused_in_one_line():
    config = to_hf_config(MODEL_SIZES["tiny"]).to_dict()
    with pytest.raises(CheckpointError) as err:
        model_args({**config, "hidden_act": "relu", "intermediate_size": 100})
    assert "\n" not in str(err.value)
    assert "tanh GELU" in str(err.value) and "4 x hidden_size" in str(err.value)
    del config["rotary_pct"], config["rotary_emb_base"]  # transformers 5 spelling only
    assert model_args(config).rotary_pct == MODEL_SIZES["tiny"].rotary_pct


@pytest.mark.slow
def test_resuming_with_another_model_size_is_one_line(mlx_out):
    small = build_model(to_hf_config(MODEL_SIZES["small"], vocab_size=2048).to_dict(), seed=0)
    optimizer = build_optimizer(1e-3, 0.1, (0.9, 0.95), 1e-8)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(small, optimizer, _checkpoint(mlx_out[0], 20))
    assert "\n" not in str(err.value) and "--model" in str(err.value)


@pytest.mark.slow
def test_torch_refuses_to_resume_an_mlx_checkpoint_in_one_line(sample_data, mlx_out, tmp_path):
    """Weights are shared, optimizer states are not: torch says which backend wrote it."""
    out = tmp_path / "out"
    name = _checkpoint(mlx_out[0], 20).name
    shutil.copytree(_checkpoint(mlx_out[0], 20), out / "checkpoints" / name)
    run = train(tmp_path, "torch-resume", _args(sample_data, out, "--max-steps", "22",
                                                 "--resume", name))
    assert run.proc.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "--backend mlx" in lines[-1], run.stderr[-2000:]

"""--per-device-train-batch-size auto: the micro-batch that fits, the step's sequences kept.

The memory model is checked against bench/sim_gpu.py's measured peaks (a fresh simulation of
the production step, cut to 2 layers at sequence 512); the regrouping by a real training run
whose losses equal the configured split's; the flag's bad values by the parser.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs.cli import parse_args
from configs.training_config import PRESETS
from utils.torch_engine.micro_batch import (
    Dims,
    by_estimate,
    candidates,
    estimate_gib,
    regroup,
)

REPO = Path(__file__).resolve().parent.parent
NEOX_1_2B = Dims(params=1_414_455_296, layers=24, hidden=2048, vocab=50304)


def test_production_keeps_its_global_batch_and_picks_by_memory():
    """16 sequences per step as before (existing checkpoints resume); on an 80 GB H100
    (79.1 GiB usable) the estimate picks 8 x 2, on an H200 (139.8 GiB) 16 x 1."""
    prod = PRESETS["production"]
    assert prod.auto_micro_batch
    sequences = prod.per_device_train_batch_size * prod.gradient_accumulation_steps
    assert sequences == 16 and candidates(sequences) == [16, 8, 4, 2, 1]
    h100 = by_estimate(NEOX_1_2B, sequences, prod.seq_len, True, prod.loss_chunk_tokens, 79.1)
    h200 = by_estimate(NEOX_1_2B, sequences, prod.seq_len, True, prod.loss_chunk_tokens, 139.8)
    assert (h100.size, h100.accumulation, h200.size, h200.accumulation) == (8, 2, 16, 1)
    # bench/sim_gpu.py's allocated peaks on 2026-12-05 (bench/RESULTS.md): within 3%.
    for size, measured in ((4, 39.9), (8, 52.9), (16, 74.9)):
        estimate = estimate_gib(NEOX_1_2B, size, 2048, 16 // size, True, 4096)
        assert estimate == pytest.approx(measured, rel=0.03), size


@pytest.mark.slow
def test_the_memory_model_matches_a_fresh_simulation(tmp_path: Path):
    """The production step on fake CUDA tensors, 2 layers at sequence 512, micro-batch 1 x 2
    and 2 x 1: the estimate is within 10% of the simulated allocated peak."""
    spec = importlib.util.spec_from_file_location("sim_gpu", REPO / "bench" / "sim_gpu.py")
    assert spec and spec.loader
    sim_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim_gpu)
    try:
        sim_gpu.build_guard()
    except sim_gpu.GuardUnavailable as err:
        pytest.skip(f"no fake CUDA device here: {err}")
    out = tmp_path / "sim.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "sim_gpu.py"), "--layers", "2",
                          "--seq", "512", "--micro-batches", "1,2", "--sequences", "2",
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "TMPDIR": str(tmp_path)}, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    two_layers = Dims(NEOX_1_2B.params - 22 * NEOX_1_2B.layer_params, 2, 2048, 50304)
    for r in json.loads(out.read_text()):
        estimate = estimate_gib(two_layers, r["micro_batch"], 512, r["accumulation"], True,
                                4096)
        assert estimate == pytest.approx(r["peak_allocated_gib"], rel=0.10), r["micro_batch"]


def test_regroup_keeps_the_rows_in_order():
    import numpy as np
    import torch

    batches = [{"input_ids": np.arange(6).reshape(2, 3) + 10 * i} for i in range(4)]
    (whole,) = regroup(batches, 1)
    assert whole["input_ids"].tolist() == np.concatenate(
        [b["input_ids"] for b in batches]).tolist()
    halves = regroup([{"input_ids": torch.tensor(b["input_ids"])} for b in batches], 2)
    assert [h["input_ids"].shape for h in halves] == [(4, 3), (4, 3)]
    assert torch.equal(torch.cat([h["input_ids"] for h in halves]),
                       torch.tensor(whole["input_ids"]))
    singles = regroup(batches, 8)
    assert len(singles) == 8 and singles[3]["input_ids"].tolist() == [[13, 14, 15]]


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "1.5", ""])
def test_bad_values_are_one_line_and_exit_2(value: str, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", "smoke", f"--per-device-train-batch-size={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "--per-device-train-batch-size" in err and repr(value).strip("'") in err


def test_auto_and_numbers_turn_the_switch_on_and_off():
    auto, _ = parse_args(["--config", "smoke", "--per-device-train-batch-size", "auto"])
    assert auto.auto_micro_batch and auto.per_device_train_batch_size == 8
    prod = ["--config", "production", "--no-sync-data"]
    number, _ = parse_args([*prod, "--per-device-train-batch-size", "8"])
    assert not number.auto_micro_batch and number.per_device_train_batch_size == 8
    both, _ = parse_args([*prod, "--per-device-train-batch-size", "8", "--auto-micro-batch"])
    assert both.auto_micro_batch
    with pytest.raises(SystemExit):
        parse_args(["--config", "smoke", "--per-device-train-batch-size", "auto", "--backend",
                    "mlx"])


@pytest.mark.slow
def test_a_training_run_with_auto_equals_the_configured_split(sample_data: Path,
                                                              tmp_path: Path):
    """Smoke training, 4 x 2 sequences per step: auto runs them as one micro-batch of 8 (the
    estimate: the host memory holds it), says so in the banner, and logs the losses of the
    configured 4 x 2 run (the same rows, the mean of two means of 4 = the mean of 8)."""
    from conftest import run_train
    from helpers import metrics

    def train(name: str, *extra: str) -> tuple[subprocess.CompletedProcess, list[float]]:
        out = tmp_path / name
        run = run_train("--config", "smoke", "--data-dir", str(sample_data), "--bucket", "",
                        "--output-dir", str(out), "--seq-len", "64", "--max-steps", "8",
                        "--logging-steps", "2", "--save-steps", "8", "--eval-steps", "8",
                        "--eval-windows", "8", "--report-to", "none",
                        "--per-device-train-batch-size", "4",
                        "--gradient-accumulation-steps", "2", *extra, tmp_path=tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        return run, [r["loss"] for r in metrics(out)]

    fixed, fixed_losses = train("fixed")
    auto, auto_losses = train("auto", "--auto-micro-batch")
    assert re.search(r"micro-batch 8 x 1 accumulation \(auto: estimated [\d.]+ GiB of "
                     r"[\d.]+ GiB\)", auto.stdout), auto.stdout[-3000:]
    assert "micro-batch 8 x 1" not in fixed.stdout
    assert "batch: 4 per device x 2 accumulation" in auto.stdout  # the data side: unchanged
    assert len(auto_losses) == 4
    assert auto_losses == pytest.approx(fixed_losses, abs=2e-5)

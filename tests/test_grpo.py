"""The GRPO stage through train.py on both backends: bad input is one line and leaves nothing
marked complete; the stage logs its rewards; a killed and resumed run repeats the
uninterrupted run's rewards exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_train
from helpers import metrics
from lora_data import LORA, error_line, write_jsonl

from utils.checkpoint import find_complete

SUMS = [{"question": f"What is {a} + {b}?", "answer": str(a + b)}
        for a in range(10) for b in range(0, 10, 3)]
GRPO = [*LORA, "--stage", "grpo", "--grpo-group-size", "4", "--grpo-max-new-tokens", "4",
        "--per-device-train-batch-size", "4", "--reward", "numeric_partial,numeric",
        "--lora-dropout", "0", "--eval-windows", "4"]


@pytest.fixture
def sums(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "grpo.jsonl", SUMS)


def _grpo(tiny_base: Path, data: Path, out: Path, tmp_path: Path, *extra: str):
    return run_train(*GRPO, "--init-from", str(tiny_base), "--data-dir", str(data),
                     "--output-dir", str(out), *extra, tmp_path=tmp_path)


def _nothing_complete(out: Path) -> bool:
    return not (out / "checkpoints").exists() or not find_complete(out / "checkpoints")


def test_bad_reward_name_is_one_line(tiny_base, sums, tmp_path):
    result = _grpo(tiny_base, sums, tmp_path / "out", tmp_path, "--reward", "numeric,nope")
    assert result.returncode == 2  # a configuration error (never restarted)
    line = error_line(result.stderr)
    assert "nope" in line and "numeric_partial" in line, line  # names the choices
    assert _nothing_complete(tmp_path / "out")


def test_bad_jsonl_line_is_one_line_naming_file_and_line(tiny_base, tmp_path):
    bad = write_jsonl(tmp_path / "grpo.jsonl", [*SUMS[:3], {"question": "What is 1 + 1?"}])
    result = _grpo(tiny_base, bad, tmp_path / "out", tmp_path)
    assert result.returncode == 1
    assert error_line(result.stderr).startswith(f"error: {bad}:4:"), result.stderr[-500:]


def test_a_reward_module_that_raises_stops_with_one_line(tiny_base, sums, tmp_path):
    module = tmp_path / "broken.py"
    module.write_text("def reward(prompt, completion, example):\n"
                      "    raise ValueError('cannot score this')\n")
    result = _grpo(tiny_base, sums, tmp_path / "out", tmp_path, "--reward-module", str(module),
                   "--reward", "broken", "--max-steps", "2")
    assert result.returncode == 1
    line = error_line(result.stderr)
    assert "broken" in line and "cannot score this" in line, line
    assert _nothing_complete(tmp_path / "out")


def _updates(ckpt: Path) -> int:
    """Optimizer updates recorded in a checkpoint's optimizer state (Adam's step count)."""
    if (ckpt / "optimizer.pt").exists():
        import torch

        state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
        return {int(s["step"]) for s in state.values()}.pop()
    from safetensors.numpy import load_file

    return int(load_file(str(ckpt / "optimizer.safetensors"))["step"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_grpo_logs_rewards_and_resumes_exactly(backend, tiny_base, sums, tmp_path):
    """Also --grpo-epochs 2: two optimizer updates per rollout (its old and reference
    log-probs taken once, before the first), which a resumed run repeats too."""
    args = ("--backend", backend, "--max-steps", "6", "--save-steps", "2", "--logging-steps",
            "1", "--eval-steps", "3", "--run-name", "g", "--grpo-epochs", "2")
    whole = _grpo(tiny_base, sums, tmp_path / "whole", tmp_path, *args)
    assert whole.returncode == 0, whole.stderr[-2000:]
    baseline, *records = metrics(tmp_path / "whole")
    assert baseline["step"] == 0 and 0.0 <= baseline["eval_reward"] <= 1.0  # before training
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("reward_mean", "reward_std", "reward_numeric", "reward_numeric_partial", "kl",
                "completion_len", "frac_zero_std_groups"):
        assert all(key in r for r in records), (key, records[0])
    assert [r["step"] for r in records if "eval_reward" in r] == [3, 6]
    assert all(0.0 <= r["reward_mean"] <= 1.0 and r["completion_len"] > 0 for r in records)
    assert _updates(find_complete(tmp_path / "whole" / "checkpoints")[-1]) == 12  # 6 x 2
    # A run cut at step 2 (its checkpoint, the end of the warmup: the learning rates so far
    # do not depend on --max-steps) and resumed repeats the same samples, rewards and losses.
    first = _grpo(tiny_base, sums, tmp_path / "cut", tmp_path, *args[:2], "--max-steps", "2",
                  *args[4:])
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = _grpo(tiny_base, sums, tmp_path / "cut", tmp_path, *args, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = [r for r in metrics(tmp_path / "cut") if r["step"]]
    for key in ("reward_mean", "loss", "kl"):
        assert [r[key] for r in again] == [r[key] for r in records], (key, json.dumps(records))


def test_a_stage_on_a_lora_checkpoint_records_that_checkpoint_as_its_base(tiny_base, tmp_path):
    """DPO/GRPO after SFT: the adapters' base is the SFT checkpoint (which merges its own
    adapters in), not the model that checkpoint was trained on."""
    from configs.training_config import preset
    from utils.torch_engine.lora import build_lora_model, load_base

    sft_checkpoint = tmp_path / "sft-checkpoint"
    model = build_lora_model(load_base(tiny_base), preset("grpo"), sft_checkpoint)
    assert model.peft_config["default"].base_model_name_or_path == str(sft_checkpoint)


@pytest.mark.slow
def test_a_topic_with_grpo_jsonl_runs_sft_dpo_then_grpo(tiny_base, tmp_path):
    from lora_data import PAIRS, prefs, qa

    topic = tmp_path / "topics" / "01-add"
    write_jsonl(topic / "sft.jsonl", qa(PAIRS[:8]))
    write_jsonl(topic / "dpo.jsonl", prefs(PAIRS[:8]))
    write_jsonl(topic / "grpo.jsonl", SUMS[:8])
    out = tmp_path / "out"
    result = run_train(*LORA, "--stage", "sft", "--topics", str(topic.parent), "--init-from",
                       str(tiny_base), "--output-dir", str(out), "--max-steps", "2",
                       "--save-steps", "2", "--per-device-train-batch-size", "4",
                       "--grpo-group-size", "2", "--grpo-max-new-tokens", "3",
                       "--run-name", "cur", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    finished = json.loads((out / "curriculum.json").read_text())["finished"]
    assert [e["stage"] for e in finished] == ["01-add/sft", "01-add/dpo", "01-add/grpo"]
    assert (out / "01-add" / "grpo" / "merged" / "model.safetensors").is_file()

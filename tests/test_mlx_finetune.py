"""LoRA on the MLX backend: adapters across backends, losses against torch's, QLoRA.

Adapters cross over through peft's file format: an MLX adapter is loaded by
``PeftModel.from_pretrained`` and judged in torch, and a peft adapter loads in MLX. The losses
are checked against the torch implementations on the same adapter and batch. The SFT and DPO
runs themselves are test_finetune.py's, parametrized over both backends; the QLoRA run is
here. Runs are real ``train.py --backend mlx`` processes on the CPU; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from conftest import REPO, run_train
from helpers import finish, metrics, ring_ports
from lora_data import (
    LORA,
    PAIRS,
    TRAIN_PAIRS,
    mean_answer_logp,
    prefs,
    qa,
    torch_collate,
    write_jsonl,
)
from mlx.utils import tree_flatten, tree_unflatten
from peft import PeftModel

from configs.cli import parse_args
from configs.model_config import LORA_TARGETS
from configs.training_config import TrainingConfig
from utils.checkpoint import CheckpointError, find_complete
from utils.mlx_engine import losses as mlx_losses
from utils.mlx_engine.blas import openblas_preload
from utils.mlx_engine.lora import (
    adapters_disabled,
    apply_lora,
    load_adapter,
    quantize_base,
    save_adapter,
)
from utils.mlx_engine.lora import load_base as mlx_load_base
from utils.stages.examples import load_dpo, load_sft, pad_dpo, pad_sft
from utils.stages.tokenizers import encoder
from utils.torch_engine.lora import build_lora_model, load_base
from utils.torch_engine.losses import dpo_loss, sft_loss

MLX = ["--backend", "mlx"]
ENV = openblas_preload()  # MLX processes only; {} where Debian's OpenBLAS is not installed
TARGETS = list(LORA_TARGETS)


def _mlx_lora_model(base: Path, r: int = 8, alpha: float = 16.0) -> nn.Module:
    """The base with LoRA on every target and random B: a trained-looking adapter."""
    model, _ = mlx_load_base(base)
    mx.random.seed(0)
    apply_lora(model, r, alpha, 0.0, TARGETS)
    model.update(tree_unflatten([
        (name, mx.random.normal(p.shape) * 0.05 if name.endswith("lora_b") else p)
        for name, p in tree_flatten(model.trainable_parameters())]))
    model.eval()
    return model


def _ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 2048, (2, 24))


def _mlx_logits(model: nn.Module, ids: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(ids.astype(np.int32))))


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def _mlx_sft(tiny_base: Path, data: Path, out: Path, tmp: Path, *extra: str):
    return run_train(*LORA, *MLX, "--stage", "sft", "--init-from", str(tiny_base),
                     "--data-dir", str(data), "--output-dir", str(out), "--learning-rate",
                     "3e-3", *extra, tmp_path=tmp, env=ENV)


# ---------------------------------------------------------------- adapters and losses

def test_mlx_adapter_loads_in_peft_and_both_losses_agree(tmp_path, tiny_base, tokenizer):
    """Same adapter, same batch: logits, SFT loss and DPO loss (reference = adapters off) agree."""
    model = _mlx_lora_model(tiny_base)
    adapter = tmp_path / "adapter"
    save_adapter(model.trainable_parameters(), adapter, r=8, alpha=16.0, dropout=0.0,
                 targets=TARGETS, base=tiny_base)
    peft_model = PeftModel.from_pretrained(load_base(tiny_base), adapter).eval()
    ids = _ids()
    np.testing.assert_allclose(_mlx_logits(model, ids), _torch_logits(peft_model, ids),
                               atol=1e-4)

    pad = tokenizer.pad_token_id
    sft = load_sft([write_jsonl(tmp_path / "s.jsonl", qa(PAIRS[:5]))], encoder(tokenizer),
                   tokenizer.eos_token_id, 64)
    mlx_loss, _ = mlx_losses.sft_loss(model, mlx_losses.to_mx(pad_sft(sft, pad)))
    torch_loss, _ = sft_loss(peft_model, torch_collate(sft, pad, pairs=False))
    assert mlx_loss.item() == pytest.approx(torch_loss.item(), rel=1e-5)

    pairs = load_dpo([write_jsonl(tmp_path / "d.jsonl", prefs(PAIRS[:3]))], encoder(tokenizer),
                     tokenizer.eos_token_id, 64)
    mlx_dpo, mlx_extras = mlx_losses.dpo_loss(model, mlx_losses.to_mx(pad_dpo(pairs, pad)), 0.2)
    with torch.no_grad():
        torch_dpo, torch_extras = dpo_loss(peft_model, torch_collate(pairs, pad, pairs=True), 0.2)
    assert mlx_dpo.item() == pytest.approx(torch_dpo.item(), rel=1e-4)
    for key, value in torch_extras.items():
        assert mlx_extras[key].item() == pytest.approx(value.item(), abs=1e-5), key
    assert abs(mlx_extras["reward_margin"].item()) > 1e-3  # policy differs from the reference

    # The reference is the base itself, and the adapters come back afterwards.
    fresh_base, _ = mlx_load_base(tiny_base)
    with adapters_disabled(model):
        np.testing.assert_allclose(_mlx_logits(model, ids), _mlx_logits(fresh_base, ids),
                                   atol=1e-5)
    np.testing.assert_allclose(_mlx_logits(model, ids), _torch_logits(peft_model, ids),
                               atol=1e-4)


def test_only_answer_tokens_carry_gradient(tmp_path, tiny_base, tokenizer):
    """Changing prompt or padding labels' targets does not change the loss; answers do."""
    model = _mlx_lora_model(tiny_base)
    sft = load_sft([write_jsonl(tmp_path / "s.jsonl", qa(PAIRS[:4]))], encoder(tokenizer),
                   tokenizer.eos_token_id, 64)
    batch = pad_sft(sft, tokenizer.pad_token_id)
    base_loss, _ = mlx_losses.sft_loss(model, mlx_losses.to_mx(batch))
    prompt_or_pad = batch["labels"] == -100
    shuffled = dict(batch, input_ids=np.where(
        prompt_or_pad & (batch["attention_mask"] == 0), 7, batch["input_ids"]))
    padded_loss, _ = mlx_losses.sft_loss(model, mlx_losses.to_mx(shuffled))
    assert padded_loss.item() == pytest.approx(base_loss.item(), rel=1e-6)  # padding is inert
    answers = dict(batch, labels=np.where(prompt_or_pad, -100, 5))
    answer_loss, _ = mlx_losses.sft_loss(model, mlx_losses.to_mx(answers))
    assert answer_loss.item() != pytest.approx(base_loss.item(), rel=1e-3)

    grads = nn.value_and_grad(model, lambda m, b: mlx_losses.sft_loss(m, b)[0])(
        model, mlx_losses.to_mx(batch))[1]
    names = [name for name, _ in tree_flatten(grads)]
    assert names and all(name.endswith(("lora_a", "lora_b")) for name in names)


def test_torch_adapter_loads_in_mlx_with_the_same_logits(tmp_path, tiny_base):
    torch.manual_seed(1)
    config = TrainingConfig(stage="sft", init_from=str(tiny_base), lora_dropout=0.0,
                            run_name="t", lora_target_modules=",".join(TARGETS))
    peft_model = build_lora_model(load_base(tiny_base), config, tiny_base)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.eval()
    adapter = tmp_path / "torch-adapter"
    peft_model.save_pretrained(adapter)
    want = _torch_logits(peft_model, _ids())

    fused, hf_config = mlx_load_base(adapter)  # fused onto its base, as --init-from does
    assert hf_config["model_type"] == "gpt_neox"
    np.testing.assert_allclose(_mlx_logits(fused, _ids()), want, atol=1e-4)
    model, _ = mlx_load_base(tiny_base)
    apply_lora(model, config.lora_r, config.lora_alpha, 0.0, TARGETS)
    load_adapter(model, adapter)
    np.testing.assert_allclose(_mlx_logits(model, _ids()), want, atol=1e-4)

    fewer, _ = mlx_load_base(tiny_base)
    apply_lora(fewer, config.lora_r, config.lora_alpha, 0.0, ["query_key_value"])
    with pytest.raises(CheckpointError, match="same --lora-target-modules") as err:
        load_adapter(fewer, adapter)
    assert "\n" not in str(err.value)


def test_quantized_base_keeps_fp32_adapters(tiny_base):
    model, _ = mlx_load_base(tiny_base)
    quantize_base(model, 4)
    apply_lora(model, 8, 16.0, 0.0, TARGETS)
    quantized = [n for n, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert len(quantized) == 4 * model.args.num_hidden_layers + 1  # every target + embed_out
    assert {p.dtype for _, p in tree_flatten(model.trainable_parameters())} == {mx.float32}
    logits = _mlx_logits(model, _ids())
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("argv, expected", [
    (["--config", "sft", "--quantize-bits", "4"], "needs --backend mlx"),
    (["--config", "sft", "--backend", "mlx", "--quantize-bits", "3"], "must be 4 or 8"),
    (["--config", "smoke", "--backend", "mlx", "--quantize-bits", "4"], "LoRA stages"),
])
def test_quantize_flag_mistakes_are_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err


# ---------------------------------------------------------------- real runs

@pytest.mark.slow
def test_qlora_4bit_run_learns_and_its_adapter_serves_the_full_base(tiny_base, tokenizer,
                                                                     tmp_path):
    train_file = write_jsonl(tmp_path / "data" / "train.jsonl", qa(TRAIN_PAIRS))
    out = tmp_path / "out"
    result = _mlx_sft(tiny_base, train_file.parent, out, tmp_path, "--max-steps", "30",
                      "--save-steps", "30", "--quantize-bits", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4-bit base" in result.stdout
    records = metrics(out)
    assert records[-1]["loss"] < 0.7 * records[0]["loss"]

    examples = load_sft([train_file], encoder(tokenizer), tokenizer.eos_token_id, 64)[:16]
    before = mean_answer_logp(load_base(tiny_base).eval(), examples, tokenizer.pad_token_id)
    tuned = PeftModel.from_pretrained(load_base(tiny_base),
                                      find_complete(out / "checkpoints")[-1]).eval()
    after = mean_answer_logp(tuned, examples, tokenizer.pad_token_id)
    assert after > before + 1.0, (before, after)


# ---------------------------------------------------------------- ranks

@pytest.mark.slow
def test_two_mlx_ranks_run_sft_and_a_curriculum_like_one_process(tiny_base, tmp_path):
    """`mlx.launch -n 2` x batch 2 runs the --topics curriculum (LoRA SFT, then DPO) as one
    process with batch 4 does: the same losses, and rank 0 alone resolves, merges and reports."""
    topics = tmp_path / "topics"
    write_jsonl(topics / "01-add" / "sft.jsonl", qa(TRAIN_PAIRS[:24]))
    write_jsonl(topics / "01-add" / "dpo.jsonl", prefs(TRAIN_PAIRS[:24]))
    args = [*LORA, "--stage", "sft", "--topics", str(topics), "--init-from", str(tiny_base),
            "--max-steps", "4", "--save-steps", "4", "--logging-steps", "1", "--run-name", "cur",
            "--lora-dropout", "0", "--learning-rate", "3e-3"]
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    one, two = tmp_path / "one", tmp_path / "two"
    single = run_train(*args, "--output-dir", str(one), "--per-device-train-batch-size", "4",
                       tmp_path=tmp_path, env=ENV, script="mlx_train.py")
    assert single.returncode == 0, single.stderr[-3000:]
    launcher = Path(sys.executable).parent / "mlx.launch"
    ranks = finish(
        [str(launcher), "--backend", "ring", "-n", "2", *ring_ports(), sys.executable,
         "mlx_train.py", *args,
         "--output-dir", str(two), "--per-device-train-batch-size", "2"],
        cwd=REPO, env=env)
    assert ranks.returncode == 0, ranks.stderr[-3000:]

    for stage in ("sft", "dpo"):
        got, want = metrics(two / "01-add" / stage), metrics(one / "01-add" / stage)
        assert [r["step"] for r in got] == [1, 2, 3, 4]  # one writer
        assert np.allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=0,
                           atol=1e-4), (stage, got, want)
        assert [p.name for p in find_complete(two / "01-add" / stage / "checkpoints")] == [
            "checkpoint-epoch0-step4-files1"]
        assert (two / "01-add" / stage / "merged" / "model.safetensors").is_file()
    # Rank 1 neither reports nor merges: each line of the curriculum appears once.
    for line in ("curriculum: 01-add/sft", "curriculum: 01-add/dpo",
                 "curriculum: all 2 stages finished"):
        assert ranks.stdout.count(line) == 1, (line, ranks.stdout[-3000:])
    record = json.loads((two / "curriculum.json").read_text())
    assert [e["stage"] for e in record["finished"]] == ["01-add/sft", "01-add/dpo"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_validate_checks_the_stage_data_and_base_on_the_chosen_backend(tiny_base, tmp_path,
                                                                       backend):
    data = write_jsonl(tmp_path / "sft.jsonl", qa(TRAIN_PAIRS[:20]))
    args = ["--config", "sft", "--backend", backend, "--validate", "--bucket", "",
            "--init-from", str(tiny_base), "--output-dir", str(tmp_path / "out")]
    ok = run_train(*args, "--data-dir", str(data), tmp_path=tmp_path, env=ENV)
    assert ok.returncode == 0, ok.stdout + ok.stderr[-2000:]
    assert ok.stdout.count("[PASS]") == 8 and "[skip] bucket" in ok.stdout
    assert f"18 training examples, 2 held out; base {tiny_base.resolve()}" in ok.stdout
    assert ("mlx on" if backend == "mlx" else "torch on") in ok.stdout
    assert "trainable" in ok.stdout and "after reload" in ok.stdout

    bad = write_jsonl(tmp_path / "bad.jsonl", [*qa(TRAIN_PAIRS[:3]), {"question": "2 + 2?"}])
    failed = run_train(*args, "--data-dir", str(bad), tmp_path=tmp_path, env=ENV)
    assert failed.returncode == 1
    assert "[FAIL] data present and readable" in failed.stdout
    assert f"{bad}:4: missing key 'answer'" in failed.stdout
    no_base = run_train(*args[:-4], "--init-from", str(tmp_path / "nothing"), "--data-dir",
                        str(data), "--output-dir", str(tmp_path / "out"), tmp_path=tmp_path,
                        env=ENV)
    assert no_base.returncode == 1 and "is not a folder" in no_base.stdout

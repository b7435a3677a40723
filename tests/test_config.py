"""Presets, overrides, validation, model sizes, LR schedule, optimizer groups, metrics maths."""

from __future__ import annotations

import math

import pytest
import torch

from configs.cli import parse_args
from configs.model_config import MODEL_SIZES, count_parameters, to_hf_config
from configs.training_config import PRESETS
from utils.loop.metrics import flops_per_token
from utils.loop.schedule import lr_factor
from utils.torch_engine.model import GPU_PEAK_BF16
from utils.torch_engine.optim import param_groups


def test_neox_1_2b_parameter_counts_on_meta_device():
    from transformers import GPTNeoXForCausalLM

    size = MODEL_SIZES["neox-1.2b"]
    config = to_hf_config(size)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers,
            config.num_attention_heads, config.intermediate_size,
            config.max_position_embeddings) == (50304, 2048, 24, 16, 8192, 2048)
    assert config.use_parallel_residual and not config.tie_word_embeddings
    assert config.hidden_act == "gelu_new"
    with torch.device("meta"):
        model = GPTNeoXForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    embeddings = 2 * config.vocab_size * config.hidden_size  # untied input and output
    # 50,257 tokens, 50,304 rows (padded to a multiple of 128, as Pythia)
    assert (total, total - embeddings) == (1_414_647_808, 1_208_602_624)
    assert count_parameters(config) == (total, total - embeddings)  # from the config alone


def test_config_json_carries_mlx_rotary_fields(tmp_path):
    import json

    to_hf_config(MODEL_SIZES["tiny"], vocab_size=2048).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rotary_pct"] == 0.25 and saved["rotary_emb_base"] == 10000
    assert saved["intermediate_size"] == 4 * saved["hidden_size"]


def test_presets_match_the_seed():
    test, prod = PRESETS["test"], PRESETS["production"]
    assert (test.model, test.max_files, test.max_steps, test.per_device_train_batch_size,
            test.gradient_accumulation_steps, test.save_steps, test.logging_steps,
            test.compile, test.mixed_precision) == ("neox-1.2b", 5, 1000, 2, 2, 200, 25, True,
                                                    "bf16")
    assert (prod.model, prod.max_files, prod.max_steps, prod.per_device_train_batch_size,
            prod.gradient_accumulation_steps, prod.save_steps, prod.logging_steps, prod.compile,
            prod.mixed_precision, prod.num_workers, prod.prefetch_factor) == (
        "neox-1.2b", 0, 10000, 4, 4, 500, 100, True, "bf16", 4, 4)
    smoke = PRESETS["smoke"]
    assert smoke.model == "tiny" and smoke.bucket and not smoke.sync_data


def test_every_field_is_a_flag():
    config, _ = parse_args(["--config", "smoke", "--max-steps", "7",
                            "--per-device-train-batch-size", "3",
                            "--gradient-accumulation-steps", "5", "--save-steps", "9",
                            "--logging-steps", "2", "--learning-rate", "0.01", "--seed", "5",
                            "--max-files", "1", "--mixed-precision", "bf16", "--compile",
                            "--no-background-upload", "--bucket", "gs://b/p"])
    assert (config.max_steps, config.per_device_train_batch_size,
            config.gradient_accumulation_steps, config.save_steps, config.logging_steps,
            config.learning_rate, config.seed, config.max_files, config.mixed_precision,
            config.compile, config.background_upload, config.bucket) == (
        7, 3, 5, 9, 2, 0.01, 5, 1, "bf16", True, False, "gs://b/p")


@pytest.mark.parametrize("argv, expected", [
    (["--config", "nope"], "invalid choice: 'nope' (choose from"),
    (["--frobnicate", "1"], "unrecognized arguments: --frobnicate"),
    (["--max-steps", "ten"], "invalid int value: 'ten'"),
    (["--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--model", "gpt5"], "unknown model 'gpt5'; choose one of: tiny"),
    (["--seq-len", "4096"], "--seq-len 4096 exceeds model tiny's 512 positions"),
    (["--config", "production"], "syncs data from a bucket but none is set"),
    (["--config", "grpo", "--grpo-epochs", "0"], "--grpo-epochs must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(argv, expected, capsys, monkeypatch):
    monkeypatch.delenv("HARNESS_BUCKET", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


def test_production_takes_bucket_from_environment(monkeypatch):
    monkeypatch.setenv("HARNESS_BUCKET", "gs://my-bucket/run")
    config, _ = parse_args(["--config", "production"])
    assert config.bucket == "gs://my-bucket/run"


def test_lr_schedule_shape():
    lrs = [lr_factor(s, warmup_steps=10, max_steps=100, min_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))      # linear warmup
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101], strict=False))  # cosine decay
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)  # floor


def test_no_weight_decay_on_biases_and_norms():
    from utils.torch_engine.model import build_model

    model = build_model(PRESETS["smoke"], {"vocab_size": 64})
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "layernorm" in names[id(p)] or "norm" in names[id(p)]
               for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flops_per_token_and_peak_table():
    # 6N + 12*L*H*T: the PaLM appendix formula.
    assert flops_per_token(1000, 2, 8, 16, output_embedding_params=24) == 6 * 1024 + 12 * 2 * 8 * 16
    peaks = dict(GPU_PEAK_BF16)
    assert peaks["H100"] == 989e12 and peaks["A100"] == 312e12


def test_components_get_their_section_of_the_settings():
    """Storage is handed the bucket section, the publisher the retention section: typed views
    of the flat config (flags and recorded checkpoints unchanged)."""
    from dataclasses import fields

    from configs.training_config import BucketSettings, RetentionSettings, preset

    config = preset("smoke", bucket="gs://b/p", credentials="k.json", billing_project="bp",
                    upload_streams=4, save_total_limit=3, remote_keep=2, keep_every_steps=50,
                    background_upload=False, upload_timeout_s=9.0)
    assert config.bucket_settings == BucketSettings("gs://b/p", "k.json", "bp", 4)
    assert config.retention == RetentionSettings(False, 3, 2, 50, 9.0)
    names = {f.name for f in fields(type(config))}
    for section in (BucketSettings, RetentionSettings):  # every section field is a flag
        assert {f.name for f in fields(section)} <= names

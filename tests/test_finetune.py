"""LoRA SFT and DPO on a real tiny GPT-NeoX base: data, masks, losses, peft round trips, runs.

The base is one of our own checkpoints (the smoke preset, 30 steps); training runs are real
train.py processes; nothing is mocked.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_train
from helpers import Watched, finish, metrics
from lora_data import (
    HELD_OUT_PAIRS,
    LORA,
    PAIRS,
    TRAIN_PAIRS,
    error_line,
    mean_answer_logp,
    prefs,
    qa,
    refusals,
    torch_collate,
    write_jsonl,
)

from configs.training_config import TrainingConfig
from utils.checkpoint import CheckpointError, find_complete, verify
from utils.errors import DataError
from utils.mlx_engine.blas import openblas_preload
from utils.stages.examples import IGNORE, load_dpo, load_sft, pad_sft
from utils.stages.init_from import resolve_base
from utils.stages.tokenizers import encoder, resolve_tokenizer
from utils.torch_engine.lora import (
    build_lora_model,
    load_adapter_weights,
    load_base,
    merge_adapter,
)
from utils.torch_engine.losses import answer_logps, dpo_from_logps, dpo_loss, sft_loss


def _lora_config(base: Path, **overrides) -> TrainingConfig:
    return replace(TrainingConfig(stage="sft", init_from=str(base), lora_dropout=0.0,
                                  run_name="t"), **overrides)


def _backend_args(backend: str) -> tuple[list[str], dict[str, str]]:
    """Extra flags and environment for a run on ``backend`` (MLX: OpenBLAS preloaded)."""
    return (["--backend", "mlx"], openblas_preload()) if backend == "mlx" else ([], {})


@pytest.fixture(scope="module", params=["torch", "mlx"])
def sft_run(request: pytest.FixtureRequest, tiny_base: Path,
            tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real SFT run per backend (train.py, LoRA dropout 0.1, --merge) on arithmetic answers.

    Both backends write peft adapters, so every test on this run judges them the same way.
    """
    backend = request.param
    tmp = tmp_path_factory.mktemp(f"sft-{backend}")
    train_file = write_jsonl(tmp / "data" / "train.jsonl", qa(TRAIN_PAIRS))
    held_out = write_jsonl(tmp / "held_out.jsonl", qa(HELD_OUT_PAIRS))
    out = tmp / "out"
    flags, env = _backend_args(backend)
    result = run_train(*LORA, *flags, "--stage", "sft", "--init-from", str(tiny_base),
                       "--data-dir", str(train_file.parent), "--output-dir", str(out),
                       "--max-steps", "40", "--save-steps", "20", "--learning-rate", "3e-3",
                       "--merge", tmp_path=tmp, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "held_out": held_out, "ckpt": find_complete(out / "checkpoints")[-1],
            "tmp": tmp, "backend": backend}


# ---------------------------------------------------------------- data and masks

def test_three_sft_formats_mask_prompts_and_end_answers_with_eos(tmp_path, tokenizer):
    rows = [{"question": "What is 2 + 3?", "answer": "5"},
            {"prompt": "The capital of France is", "completion": " Paris."},
            {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Bye"},
                          {"role": "assistant", "content": "Goodbye"}]}]
    examples = load_sft([write_jsonl(tmp_path / "a.jsonl", rows)], encoder(tokenizer),
                        tokenizer.eos_token_id, 64)
    eos = tokenizer.eos_token
    trained = [tokenizer.decode(e["labels"][e["labels"] != IGNORE]) for e in examples]
    prompts = [tokenizer.decode(e["input_ids"][e["labels"] == IGNORE]) for e in examples]
    assert trained == [f" 5{eos}", f" Paris.{eos}", f" Hello{eos} Goodbye{eos}"]
    assert prompts == ["Question: What is 2 + 3?\nAnswer:", "The capital of France is",
                       "System: Be brief.\nUser: Hi\nAssistant:User: Bye\nAssistant:"]

    batch = pad_sft(examples, tokenizer.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, n in enumerate(lengths):  # right padding: pad id, label -100, mask 0
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE).all()
        assert (batch["attention_mask"][row, :n] == 1).all()


@pytest.mark.parametrize(("line", "expected"), [
    ({"prompt": "Q", "chosen": "a"}, "missing key 'rejected'"),
    ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "Q", "chosen": 5, "rejected": "b"}, "'chosen' must be a string, got int"),
    ('{"prompt": "Q", "chosen": "a",', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object, got list"),
])
def test_bad_dpo_line_names_file_and_line(tmp_path, tokenizer, line, expected):
    path = write_jsonl(tmp_path / "dpo.jsonl", [*prefs(PAIRS[:2]), "", line])  # blank line skipped
    with pytest.raises(DataError) as err:
        load_dpo([path], encoder(tokenizer), tokenizer.eos_token_id, 64)
    assert str(err.value).startswith(f"{path}:4: ") and expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("line", "expected"), [
    ({"question": "Q"}, "missing key 'answer'"),
    ({"text": "Q"}, "expected 'messages', 'prompt' + 'completion' or 'question' + 'answer'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no 'assistant' message"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages[0]: role must be one of"),
    ({"messages": "hi"}, "'messages' must be a non-empty list"),
])
def test_bad_sft_line_names_file_and_line(tmp_path, tokenizer, line, expected):
    path = write_jsonl(tmp_path / "sft.jsonl", [*qa(PAIRS[:1]), line])
    with pytest.raises(DataError) as err:
        load_sft([path], encoder(tokenizer), tokenizer.eos_token_id, 64)
    assert str(err.value).startswith(f"{path}:2: ") and expected in str(err.value)


def test_example_without_answer_room_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 80, "completion": " x"}])
    with pytest.raises(DataError, match=r"long.jsonl:1: no answer token left within --seq-len"):
        load_sft([path], encoder(tokenizer), tokenizer.eos_token_id, 32)


def test_bundled_examples_are_valid(tokenizer):
    root = REPO / "data" / "examples"
    encode, eos = encoder(tokenizer), tokenizer.eos_token_id
    assert len(load_sft([root / "sft" / "train.jsonl"], encode, eos, 64)) >= 24
    assert len(load_dpo([root / "dpo" / "train.jsonl"], encode, eos, 64)) >= 24
    topics = sorted(p for p in (root / "topics").iterdir() if p.is_dir())
    assert len(topics) == 2
    for topic in topics:
        assert load_sft([topic / "sft.jsonl"], encode, eos, 64)
        assert load_dpo([topic / "dpo.jsonl"], encode, eos, 64)


# ---------------------------------------------------------------- losses

def test_prompt_and_padding_positions_get_no_gradient(tmp_path, tiny_base, tokenizer):
    torch.manual_seed(0)
    model = build_lora_model(load_base(tiny_base), _lora_config(tiny_base), tiny_base)
    rows = [{"question": "What is 7 + 8?", "answer": "15"},
            {"prompt": "A much longer prompt that pads the other row", "completion": " yes"}]
    examples = load_sft([write_jsonl(tmp_path / "s.jsonl", rows)], encoder(tokenizer),
                        tokenizer.eos_token_id, 64)
    batch = torch_collate(examples, tokenizer.pad_token_id, pairs=False)
    captured = {}

    def keep_logits(module, args, output):
        output.retain_grad()
        captured["logits"] = output

    hook = model.get_output_embeddings().register_forward_hook(keep_logits)
    loss, _ = sft_loss(model, batch)
    hook.remove()
    loss.backward()
    logits = captured["logits"]
    grad = logits.grad.abs().sum(-1)                 # (B, L): position t predicts token t+1
    answer_target = batch["labels"][:, 1:] != IGNORE
    assert (~answer_target & (batch["attention_mask"][:, 1:] == 1)).any()  # prompts exist
    assert (batch["attention_mask"] == 0).any()                            # padding exists
    assert (grad[:, :-1][~answer_target] == 0).all() and (grad[:, -1] == 0).all()
    assert (grad[:, :-1][answer_target] > 0).all()

    # The loss is the mean NLL over answer tokens, computed independently here.
    logp = torch.log_softmax(logits.detach().double(), -1)
    nll = [-logp[b, t, batch["labels"][b, t + 1]].item()
           for b in range(2) for t in range(logits.shape[1] - 1) if answer_target[b, t]]
    assert loss.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    # Each row scores the same alone as inside the padded batch.
    for b, example in enumerate(examples):
        alone = torch_collate([example], tokenizer.pad_token_id, pairs=False)
        with torch.no_grad():
            single = answer_logps(model(input_ids=alone["input_ids"]).logits, alone["labels"])
        batched = answer_logps(logits.detach(), batch["labels"])[b]
        assert single.item() == pytest.approx(batched.item(), abs=1e-4)


def test_dpo_loss_matches_the_formula_on_fixed_logps():
    pc = torch.tensor([-4.0, -10.0, -2.5])
    pr = torch.tensor([-6.0, -7.0, -2.5])
    rc = torch.tensor([-5.0, -9.0, -3.0])
    rr = torch.tensor([-5.5, -8.0, -2.0])
    beta = 0.3
    loss, extras = dpo_from_logps(pc, pr, rc, rr, beta)
    z = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(),
                                                          rr.tolist(), strict=True)]
    assert loss.item() == pytest.approx(sum(math.log1p(math.exp(-x)) for x in z) / 3, rel=1e-6)
    chosen = [beta * (a - c) for a, c in zip(pc.tolist(), rc.tolist(), strict=True)]
    rejected = [beta * (b - d) for b, d in zip(pr.tolist(), rr.tolist(), strict=True)]
    assert extras["rewards_chosen"].item() == pytest.approx(sum(chosen) / 3, rel=1e-6)
    assert extras["rewards_rejected"].item() == pytest.approx(sum(rejected) / 3, rel=1e-6)
    assert extras["reward_margin"].item() == pytest.approx(sum(z) / 3 / 1, rel=1e-6)
    assert extras["reward_accuracy"].item() == pytest.approx(
        sum(c > r for c, r in zip(chosen, rejected, strict=True)) / 3)


def test_dpo_reference_is_the_base_with_adapters_off(tmp_path, tiny_base, tokenizer):
    torch.manual_seed(0)
    model = build_lora_model(load_base(tiny_base), _lora_config(tiny_base), tiny_base)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a trained-looking adapter: policy != reference
    pairs = load_dpo([write_jsonl(tmp_path / "d.jsonl", prefs(PAIRS[:3]))], encoder(tokenizer),
                     tokenizer.eos_token_id, 64)
    batch = torch_collate(pairs, tokenizer.pad_token_id, pairs=True)
    model.eval()
    loss, extras = dpo_loss(model, batch, beta=0.2)

    reference = load_base(tiny_base).eval()  # an independent copy of the base
    with torch.no_grad():
        ref = answer_logps(reference(input_ids=batch["input_ids"],
                                     attention_mask=batch["attention_mask"]).logits,
                           batch["labels"])
        policy = answer_logps(model(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).logits,
                              batch["labels"])
    expected, _ = dpo_from_logps(policy[:3], policy[3:], ref[:3], ref[3:], 0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.allclose(policy, ref)
    assert set(extras) == {"rewards_chosen", "rewards_rejected", "reward_accuracy",
                           "reward_margin"}
    assert any(p.requires_grad and "lora_" in n for n, p in model.named_parameters())
    assert loss.requires_grad  # gradients flow into the adapters only
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


# ---------------------------------------------------------------- adapters: save, load, merge

def test_adapter_round_trip_and_merge_give_the_same_logits(tmp_path, tiny_base):
    torch.manual_seed(1)
    config = _lora_config(tiny_base, lora_target_modules="query_key_value,dense,dense_h_to_4h,"
                                                         "dense_4h_to_h")
    model = build_lora_model(load_base(tiny_base), config, tiny_base)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.eval()
    ids = torch.randint(0, 2048, (2, 24))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {
        p.name for p in adapter.iterdir()}

    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(load_base(tiny_base), adapter).eval()
    fresh = build_lora_model(load_base(tiny_base), config, tiny_base).eval()
    load_adapter_weights(fresh, adapter)  # the resume path
    merged_dir = merge_adapter(adapter, tmp_path / "merged")
    merged = load_base(merged_dir).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, want)
        assert torch.equal(fresh(input_ids=ids).logits, want)
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-4)
        assert torch.allclose(load_base(adapter)(input_ids=ids).logits, want, atol=1e-4)
    assert (merged_dir / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp leftovers

    other = build_lora_model(load_base(tiny_base), _lora_config(tiny_base), tiny_base)
    with pytest.raises(CheckpointError, match="same --lora-target-modules"):
        load_adapter_weights(other, adapter)  # fewer targets: a clear error, not a silent load


# ---------------------------------------------------------------- real runs

@pytest.mark.slow
def test_sft_run_raises_held_out_answer_likelihood_and_merges(sft_run, tiny_base, tokenizer):
    out, ckpt = sft_run["out"], sft_run["ckpt"]
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # adapters only: megabytes, not the base
    trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
    assert trainer_state["state"]["step"] == 40
    assert trainer_state.get("backend", "torch") == sft_run["backend"]
    records = metrics(out)
    assert records[-1]["loss"] < records[0]["loss"]

    held_out = load_sft([sft_run["held_out"]], encoder(tokenizer), tokenizer.eos_token_id, 64)
    from peft import PeftModel

    base = load_base(tiny_base).eval()
    before = mean_answer_logp(base, held_out, tokenizer.pad_token_id)
    tuned = PeftModel.from_pretrained(load_base(tiny_base), ckpt).eval()
    after = mean_answer_logp(tuned, held_out, tokenizer.pad_token_id)
    assert after > before + 1.0, (before, after)  # nats per answer, on unseen questions

    merged = out / "merged"
    ids = torch.tensor([held_out[0]["input_ids"].tolist()])
    with torch.no_grad():
        assert torch.allclose(load_base(merged)(input_ids=ids).logits,
                              tuned(input_ids=ids).logits, atol=1e-4)


@pytest.mark.slow
def test_sft_resume_is_exact(sft_run, tiny_base, tmp_path):
    """A run resumed from the step-20 checkpoint ends with the same adapters as one that ran on."""
    first = sft_run["out"]
    second = tmp_path / "resumed"
    step20 = next(p for p in find_complete(first / "checkpoints") if "-step20-" in p.name)
    shutil.copytree(step20, second / "checkpoints" / step20.name)
    flags, env = _backend_args(sft_run["backend"])
    result = run_train(*LORA, *flags, "--stage", "sft", "--init-from", str(tiny_base),
                       "--data-dir", str(sft_run["tmp"] / "data"), "--output-dir", str(second),
                       "--max-steps", "40", "--save-steps", "20", "--learning-rate", "3e-3",
                       "--resume", "latest", tmp_path=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 20" in result.stdout
    from safetensors.torch import load_file

    want = load_file(sft_run["ckpt"] / "adapter_model.safetensors")
    got = load_file(find_complete(second / "checkpoints")[-1] / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert metrics(second)[-1]["loss"] == metrics(first)[-1]["loss"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_dpo_run_raises_reward_accuracy_on_its_pairs(tiny_base, tokenizer, tmp_path, backend):
    """Judged in torch for both backends: an MLX run (compiled step) writes a peft adapter."""
    data = write_jsonl(tmp_path / "dpo.jsonl", refusals(TRAIN_PAIRS[:32]))
    out = tmp_path / "out"
    flags, env = _backend_args(backend)
    compiled = ["--compile"] if backend == "mlx" else []
    result = run_train(*LORA, *flags, *compiled, "--stage", "dpo", "--init-from", str(tiny_base),
                       "--data-dir", str(data), "--output-dir", str(out), "--max-steps", "20",
                       "--save-steps", "20", "--learning-rate", "3e-3", "--dpo-beta", "0.1",
                       tmp_path=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = metrics(out)
    for key in ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy",
                "reward_margin"):
        assert all(key in r for r in records), key
    assert records[-1]["reward_margin"] > records[0]["reward_margin"] > 0
    assert records[-1]["loss"] < 0.5 * math.log(2)  # log 2: policy == reference

    # Measured directly on every training pair: policy vs. the base (adapters off).
    from peft import PeftModel

    pairs = load_dpo([data], encoder(tokenizer), tokenizer.eos_token_id, 64)
    model = PeftModel.from_pretrained(load_base(tiny_base),
                                      find_complete(out / "checkpoints")[-1]).eval()
    batch = torch_collate(pairs, tokenizer.pad_token_id, pairs=True)
    with torch.no_grad():
        _, extras = dpo_loss(model, batch, beta=0.1)
        with model.disable_adapter():  # before training: policy == reference, accuracy 0
            _, untrained = dpo_loss(model, batch, beta=0.1)
    assert untrained["reward_accuracy"].item() == 0.0
    assert extras["reward_accuracy"].item() >= 0.9


# ---------------------------------------------------------------- CLI errors, base resolution

def test_bad_line_via_cli_is_one_line_naming_file_and_line(tiny_base, tmp_path):
    bad = write_jsonl(tmp_path / "dpo.jsonl", [*prefs(PAIRS[:2]), {"prompt": "Q", "chosen": "",
                                                               "rejected": "x"}])
    result = run_train(*LORA, "--stage", "dpo", "--init-from", str(tiny_base), "--data-dir",
                       str(bad), "--output-dir", str(tmp_path / "out"), tmp_path=tmp_path)
    assert result.returncode == 1
    assert f"{bad}:3: 'chosen' is empty" in error_line(result.stderr)


def test_lora_flags_are_checked_at_parse_time_with_one_line(capsys):
    from configs.cli import parse_args

    for argv, expected in ((["--stage", "sft", "--init-from", ""], "--init-from"),
                           (["--stage", "dpo", "--init-from", "x", "--lora-target-modules",
                             "query,dense"], "unknown query"),
                           (["--stage", "dpo", "--init-from", "x", "--dpo-beta", "0"],
                            "--dpo-beta must be > 0")):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--config", "smoke", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err


def test_sft_and_dpo_presets_parse():
    from configs.cli import parse_args

    sft, _ = parse_args(["--config", "sft"])
    dpo, _ = parse_args(["--config", "dpo"])
    assert (sft.stage, sft.init_from, sft.init_run) == ("sft", "latest", "smoke")
    assert (dpo.stage, dpo.init_from, dpo.init_run) == ("dpo", "latest", "sft")
    assert all((REPO / c.data_dir).is_dir() for c in (sft, dpo))


def test_latest_base_comes_from_the_bucket_when_not_local(gcs_bucket, tiny_base, tmp_path,
                                                          monkeypatch):
    from utils.storage import open_store, sync_up

    upload = tmp_path / "upload" / tiny_base.name
    shutil.copytree(tiny_base, upload)
    sync_up(upload, open_store(gcs_bucket), f"checkpoints/base-run/{tiny_base.name}",
            progress=False)
    monkeypatch.chdir(tmp_path)  # outputs/<init_run> is relative to the working directory
    config = TrainingConfig(stage="sft", init_from="latest", init_run="base-run",
                            bucket=gcs_bucket, run_name="t")
    found = resolve_base(config)
    assert found == (tmp_path / "outputs" / "base-run" / "checkpoints" / tiny_base.name)
    assert verify(found, hashes=True) is None
    assert resolve_tokenizer(found) == found
    with pytest.raises(CheckpointError, match="run 'nothing' has no complete checkpoint"):
        resolve_base(replace(config, init_run="nothing"))
    with pytest.raises(CheckpointError, match="is not a folder"):
        resolve_base(replace(config, init_from=str(tmp_path / "missing")))


@pytest.mark.slow
def test_resumed_run_keeps_its_base_and_generate_prints(sft_run, tiny_base, tmp_path):
    # A resumed run uses the base its checkpoints were trained on, not a newer `latest`.
    config = TrainingConfig(stage="sft", init_from="latest", init_run="never-trained",
                            output_dir=str(sft_run["out"]), resume="latest", run_name="t")
    assert resolve_base(config) == tiny_base.resolve()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    ok = finish([sys.executable, "generate.py", "--adapter", str(sft_run["ckpt"]),
                         "--prompt", "What is 1 + 2?", "--prompt", "What is 4 + 4?",
                         "--template", "question", "--max-new-tokens", "4"], tmp_path, env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.count("### Question: What is") == 2 and "\nAnswer:\n" in ok.stdout
    bad = finish([sys.executable, "generate.py", "--model", str(tmp_path / "none"),
                  "--prompt", "x"], tmp_path, env, name="bad")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: base model")


# ---------------------------------------------------------------- curriculum

@pytest.mark.slow
def test_curriculum_resumes_at_the_first_unfinished_stage(tiny_base, tmp_path):
    topics = tmp_path / "topics"
    for name, pairs in (("01-small", PAIRS[:8]), ("02-large", PAIRS[50:58])):
        write_jsonl(topics / name / "sft.jsonl", qa(pairs))
        write_jsonl(topics / name / "dpo.jsonl", prefs(pairs))
    out = tmp_path / "out"
    args = [*LORA, "--stage", "sft", "--topics", str(topics), "--init-from", str(tiny_base),
            "--output-dir", str(out), "--max-steps", "3", "--save-steps", "3",
            "--logging-steps", "1", "--per-device-train-batch-size", "4", "--run-name", "cur"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
           "PYTHONUNBUFFERED": "1"}
    state = out / "curriculum.json"

    def finished() -> list[str]:
        try:
            return [e["stage"] for e in json.loads(state.read_text())["finished"]]
        except (OSError, ValueError):
            return []

    first = Watched([sys.executable, "train.py", *args], tmp_path, "first", env,
                    merge_output=True)  # killed once topic 1 is done
    first.wait_for(lambda: len(finished()) >= 2, "topic 1's two stages")
    first.kill()
    first.proc.wait()
    assert finished() == ["01-small/sft", "01-small/dpo"], first.stdout[-3000:]
    topic1 = {p: p.read_bytes() for p in (out / "01-small").rglob("*") if p.is_file()}

    second = run_train(*args, tmp_path=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    started = [line.split()[1] for line in second.stdout.splitlines()
               if line.startswith("curriculum: ") and " from " in line]
    assert started == ["02-large/sft", "02-large/dpo"]
    assert finished() == ["01-small/sft", "01-small/dpo", "02-large/sft", "02-large/dpo"]
    assert {p: p.read_bytes() for p in (out / "01-small").rglob("*") if p.is_file()} == topic1
    # Each stage starts from the one before: 02/sft from 01/dpo's merged model, and so on.
    chain = [json.loads((find_complete(out / t / s / "checkpoints")[-1]
                         / "adapter_config.json").read_text())["base_model_name_or_path"]
             for t, s in (("02-large", "sft"), ("02-large", "dpo"))]
    assert chain == [str(out / "01-small" / "dpo" / "merged"),
                     str(out / "02-large" / "sft" / "merged")]
    assert (out / "02-large" / "dpo" / "merged" / "model.safetensors").is_file()
    again = run_train(*args, tmp_path=tmp_path)
    assert again.returncode == 0 and "all 4 stages already finished" in again.stdout
    assert np.isfinite([r["loss"] for r in metrics(out / "02-large" / "dpo")]).all()

"""The GRPO loss of both backends: hand-computed cases, TRL's own code, and torch against MLX.

* ``grpo_from_logps`` on hand-made log-probs (both backends): the policy-gradient value at
  ratio 1, clipping on the side where it removes the gradient, the k3 KL, empty rows, padding.
* ``token_logps`` scores sampled tokens as they were sampled: the log-probs of greedy
  completions at generation (transformers' ``generate`` with left-padded prompts, mlx-lm's
  ``generate_step``) equal those computed on the whole padded sequence.
* TRL parity: a real ``trl.GRPOTrainer`` (trl 1.16.0) built around the same tiny peft model
  computes the loss with its own ``_compute_loss``; ours must match it (and its gradients).
* MLX parity: the same base and adapter loaded into mlx-lm give the same log-probs, loss,
  metrics and LoRA gradients as torch.

The model is a random tiny GPT-NeoX with random LoRA B matrices (the policy differs from the
reference), built in-process: nothing is trained and nothing is mocked.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPTNeoXForCausalLM

from configs.model_config import LORA_TARGETS, ModelSize, to_hf_config
from utils.mlx_engine import losses as mlx_losses
from utils.mlx_engine.lora import apply_lora, load_adapter, peft_key, read_adapter_config
from utils.mlx_engine.model import load_pretrained
from utils.stages.step import stage_loss
from utils.torch_engine import losses as torch_losses

PAD, EOS, VOCAB = 0, 1, 128
PROMPT, COMPLETION = 5, 6
R, ALPHA = 4, 8.0
# hidden 64, 4 heads, half the head rotated: positions matter, the model stays tiny.
SIZE = ModelSize(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                 max_position_embeddings=64, rotary_pct=0.5)

# transformers 5 deprecations that peft and TRL trigger (gradient_checkpointing renames)
pytestmark = pytest.mark.filterwarnings("ignore:.*deprecated.*:FutureWarning")


# ---------------------------------------------------------------- models and batch

@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base folder, peft adapter folder): random weights, LoRA B ~ N(0, 0.05)."""
    root = tmp_path_factory.mktemp("grpo")
    torch.manual_seed(0)
    base = GPTNeoXForCausalLM(to_hf_config(SIZE, vocab_size=VOCAB, eos_token_id=EOS,
                                           pad_token_id=PAD))
    base.save_pretrained(root / "base")
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                            target_modules=list(LORA_TARGETS),
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


@pytest.fixture
def peft_model(saved: tuple[Path, Path]) -> PeftModel:
    """A fresh torch policy per test (TRL patches the forward of the model it is given)."""
    base = GPTNeoXForCausalLM.from_pretrained(saved[0], dtype=torch.float32)
    return PeftModel.from_pretrained(base, saved[1], is_trainable=True).eval()


@pytest.fixture(scope="module")
def mlx_model(saved: tuple[Path, Path]) -> nn.Module:
    model, _ = load_pretrained(saved[0])
    lora = read_adapter_config(saved[1])
    apply_lora(model, lora["r"], lora["alpha"], 0.0, lora["targets"])
    load_adapter(model, saved[1])
    model.eval()
    return model


def rollout() -> dict[str, np.ndarray]:
    """Four rows as TRL holds them: left-padded prompts (one unpadded, three padded by 0-3),
    right-padded completions (row 0 stops at an EOS, row 2 ends on one), advantages."""
    rng = np.random.default_rng(1)
    prompt_ids = rng.integers(2, VOCAB, (4, PROMPT))
    prompt_mask = np.ones((4, PROMPT), np.int64)
    for row, pad in enumerate([0, 2, 1, 3]):
        prompt_mask[row, :pad] = 0
    prompt_ids[prompt_mask == 0] = PAD
    completion_ids = rng.integers(2, VOCAB, (4, COMPLETION))
    completion_mask = np.ones((4, COMPLETION), np.int64)
    completion_ids[0, 3], completion_ids[0, 4:], completion_mask[0, 4:] = EOS, PAD, 0
    completion_ids[2, -1] = EOS
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": np.array([1.0, -0.5, 0.7, -1.2], np.float32)}


def our_batch(parts: dict[str, np.ndarray], **per_token: np.ndarray) -> dict[str, np.ndarray]:
    """The engines' batch for ``parts``: whole rows, the completion mask 0 on the prompt;
    ``per_token`` (old_logps, ref_logps over the completion) padded with 0 on the prompt."""
    zeros = np.zeros_like(parts["prompt_mask"], dtype=np.float32)
    batch = {"input_ids": np.concatenate([parts["prompt_ids"], parts["completion_ids"]], 1),
             "attention_mask": np.concatenate([parts["prompt_mask"], parts["completion_mask"]],
                                              1),
             "completion_mask": np.concatenate([np.zeros_like(parts["prompt_mask"]),
                                                parts["completion_mask"]], 1),
             "advantages": parts["advantages"]}
    for key, value in per_token.items():
        batch[key] = np.concatenate([zeros, value.astype(np.float32)], 1)
    return batch


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value) for key, value in batch.items()}


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """LoRA gradients under peft's file names (``...lora_A.weight``), then cleared."""
    grads = {name.replace(".default", ""): p.grad.clone() for name, p in model.named_parameters()
             if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


# ---------------------------------------------------------------- hand-computed cases

def _torch_from_logps(*args, **kwargs):
    tensors = [None if a is None else torch.tensor(a) for a in args]
    loss, metrics = torch_losses.grpo_from_logps(*tensors, **kwargs)
    return loss.item(), {k: v.item() for k, v in metrics.items()}


def _mlx_from_logps(*args, **kwargs):
    arrays = [None if a is None else mx.array(a) for a in args]
    loss, metrics = mlx_losses.grpo_from_logps(*arrays, **kwargs)
    return loss.item(), {k: v.item() for k, v in metrics.items()}


BACKENDS = {"torch": _torch_from_logps, "mlx": _mlx_from_logps}


@pytest.mark.parametrize("backend", BACKENDS)
def test_grpo_from_logps_by_hand(backend: str):
    from_logps = BACKENDS[backend]
    logps = np.log(np.array([[0.5, 0.25, 0.1, 0.9], [0.3, 0.3, 0.3, 0.3],
                             [0.2, 0.6, 0.7, 0.1]], np.float32))
    mask = np.array([[0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], np.int64)  # row 2: no tokens
    adv = np.array([1.5, -0.5, 2.0], np.float32)

    # Ratio 1, no KL: each row's per-token loss is -A, so the loss is -mean(A) over the rows
    # (an empty row adds 0, as TRL's clamp(min=1) of its token count makes it).
    loss, metrics = from_logps(logps, logps, None, adv, mask, beta=0.0, epsilon=0.2)
    assert loss == pytest.approx(-(1.5 - 0.5 + 0.0) / 3, abs=1e-6)
    assert "kl" not in metrics and metrics["clip_ratio"] == 0.0

    # The reference equal to the policy: k3 is 0, the loss is the same with any beta.
    loss, metrics = from_logps(logps, logps, logps, adv, mask, beta=0.5, epsilon=0.2)
    assert loss == pytest.approx(-1.0 / 3, abs=1e-6) and metrics["kl"] == pytest.approx(0.0)

    # k3 by hand: ref - logp = log 2 on every token -> 2 - log 2 - 1 per token.
    loss, metrics = from_logps(logps, logps, logps + math.log(2), adv, mask, beta=0.1,
                               epsilon=0.2)
    k3 = 1 - math.log(2)
    assert metrics["kl"] == pytest.approx(k3, abs=1e-6)
    assert loss == pytest.approx((-1.5 + 0.1 * k3 + 0.5 + 0.1 * k3 + 0.0) / 3, abs=1e-6)

    # Ratio 1.5 (above 1 + eps): a positive advantage is clipped to 1.2 A, a negative one is
    # not (min keeps 1.5 A); ratio 0.5 with A < 0 is clipped to 0.8 A, with A > 0 it is not.
    up = np.log(np.full((2, 2), 1.5, np.float32))
    down = np.log(np.full((2, 2), 0.5, np.float32))
    ones = np.ones((2, 2), np.int64)
    zero = np.zeros((2, 2), np.float32)
    signs = np.array([1.0, -1.0], np.float32)
    loss, metrics = from_logps(up, zero, None, signs, ones, beta=0.0, epsilon=0.2)
    assert loss == pytest.approx((-1.2 + 1.5) / 2, abs=1e-6)
    assert metrics["clip_ratio"] == pytest.approx(0.5)
    assert metrics["clip_ratio_high"] == pytest.approx(0.5)
    assert metrics["clip_ratio_low"] == 0.0
    loss, metrics = from_logps(down, zero, None, signs, ones, beta=0.0, epsilon=0.2)
    assert loss == pytest.approx((-0.5 + 0.8) / 2, abs=1e-6)
    assert metrics["clip_ratio_low"] == pytest.approx(0.5)
    assert metrics["clip_ratio_high"] == 0.0

    # Padding cannot poison the loss: -inf log-probs outside the mask stay out of it.
    old = logps.copy()
    old[mask == 0] = -np.inf
    loss, _ = from_logps(logps, old, logps, adv, mask, beta=0.1, epsilon=0.2)
    assert loss == pytest.approx(-1.0 / 3, abs=1e-6)

    with pytest.raises(ValueError, match="ref_logps"):
        from_logps(logps, logps, None, adv, mask, beta=0.1, epsilon=0.2)


def test_grpo_gradient_is_the_policy_gradient():
    """At ratio 1 the gradient per completion token is -A / (the row's tokens) (TRL's
    per-sequence mean, over B rows); a clipped token and the padding get none."""
    logps = torch.log(torch.tensor([[0.5, 0.2, 0.4], [0.3, 0.6, 0.1]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    loss, _ = torch_losses.grpo_from_logps(logps, logps.detach(), None, adv, mask, 0.0, 0.2)
    loss.backward()
    expected = torch.tensor([[-2.0 / 2, -2.0 / 2, 0.0], [1.0 / 3, 1.0 / 3, 1.0 / 3]]) / 2
    torch.testing.assert_close(logps.grad, expected)

    old = logps.detach().clone()
    old[0, 0] -= math.log(1.5)  # ratio 1.5 with A > 0: clipped, no gradient
    logps.grad = None
    torch_losses.grpo_from_logps(logps, old, None, adv, mask, 0.0, 0.2)[0].backward()
    assert logps.grad[0, 0] == 0.0 and logps.grad[0, 1] == expected[0, 1]


@pytest.mark.parametrize("bias_correction_kl", [True, False])
def test_grpo_kl_gradient(bias_correction_kl: bool):
    """The KL term's gradient at ratio 1, ref - logp = d = log 2, A = 0: d(k3)/dlogp =
    1 - e^d = -1 without the correction; with it, d(k3 r)/dlogp = 1 - e^d + k3 = -d, the
    gradient of the reverse KL itself (TRL 1.16's default)."""
    logps = torch.log(torch.tensor([[0.5, 0.2, 0.4], [0.3, 0.6, 0.1]])).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ref = logps.detach() + math.log(2)
    loss, metrics = torch_losses.grpo_from_logps(logps, logps.detach(), ref, torch.zeros(2),
                                                 mask, 0.1, 0.2, bias_correction_kl)
    loss.backward()
    per_token = -math.log(2) if bias_correction_kl else -1.0
    expected = 0.1 * per_token * torch.tensor([[1 / 2, 1 / 2, 0.0], [1 / 3, 1 / 3, 1 / 3]]) / 2
    torch.testing.assert_close(logps.grad, expected)
    assert metrics["kl"].item() == pytest.approx(1 - math.log(2))  # the value: r = 1


# ---------------------------------------------------------------- positions: as sampled

def test_torch_logps_are_the_generation_logps(peft_model):
    """Greedy completions of left-padded prompts: the log-probs ``generate`` saw equal
    ``token_logps`` on the padded sequence, and rows of other lengths do not change a row."""
    parts = rollout()
    prompt_ids, prompt_mask = (torch.from_numpy(parts[k]) for k in ("prompt_ids", "prompt_mask"))
    with torch.no_grad():
        out = peft_model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                                  max_new_tokens=COMPLETION, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True,
                                  pad_token_id=PAD, eos_token_id=None)
        completion = out.sequences[:, PROMPT:]
        at_generation = torch.stack(out.logits, 1).float().log_softmax(-1).gather(
            -1, completion[..., None]).squeeze(-1)
        ids = torch.cat([prompt_ids, completion], 1)
        mask = torch.cat([prompt_mask, torch.ones_like(completion)], 1)
        logps = torch_losses.token_logps(peft_model, {"input_ids": ids, "attention_mask": mask})
        torch.testing.assert_close(logps[:, PROMPT:], at_generation, atol=1e-5, rtol=0)
        row = 3  # its prompt alone, unpadded
        real = mask[row].bool()
        alone = torch_losses.token_logps(peft_model, {
            "input_ids": ids[row:row + 1, real], "attention_mask": mask[row:row + 1, real]})
        torch.testing.assert_close(alone[0, -COMPLETION:], logps[row, PROMPT:], atol=1e-5,
                                   rtol=0)


def test_mlx_logps_are_the_generation_logps(mlx_model):
    """mlx-lm's ``generate_step`` (the MLX engine's sampler) on each unpadded prompt scores
    its tokens as ``token_logps`` does on the left-padded batch."""
    parts = rollout()
    completions, at_generation = [], []
    for ids, mask in zip(parts["prompt_ids"], parts["prompt_mask"], strict=True):
        prompt = mx.array(ids[mask.astype(bool)].astype(np.int32))
        steps = list(generate_step(prompt, mlx_model, max_tokens=COMPLETION))
        completions.append([token for token, _ in steps])
        at_generation.append([logprobs[token].item() for token, logprobs in steps])
    parts["completion_ids"] = np.array(completions, np.int64)
    parts["completion_mask"] = np.ones_like(parts["completion_ids"])
    batch = mlx_losses.to_mx(our_batch(parts))
    # Each row's positions start at its first real token, as mlx-lm's BatchKVCache sets them.
    assert mlx_losses._RowPositions(batch["attention_mask"]).offset.tolist() == [0, -2, -1, -3]
    logps = mlx_losses.token_logps(mlx_model, batch)
    np.testing.assert_allclose(np.array(logps)[:, PROMPT:], np.array(at_generation),
                               atol=1e-4)


# ---------------------------------------------------------------- TRL's own loss

def _trl_trainer(model: PeftModel, beta: float, epsilon: float, temperature: float,
                 out: Path, **options: object):
    """trl.GRPOTrainer around ``model``, loss_type="grpo"; bf16 off (TRL's default turns it
    on, and CPU autocast to bf16 moves log-probs by ~3e-3)."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, VOCAB)}}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
        pad_token="<pad>", eos_token="<eos>")
    args = GRPOConfig(output_dir=str(out), beta=beta, epsilon=epsilon, loss_type="grpo",
                      temperature=temperature, num_generations=2,
                      per_device_train_batch_size=4, max_completion_length=COMPLETION,
                      report_to="none", use_cpu=True, bf16=False, logging_steps=1, **options)
    return GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                       args=args, train_dataset=Dataset.from_dict({"prompt": ["t3 t4"] * 4}),
                       processing_class=tokenizer)


@pytest.mark.parametrize(("case", "bias_correction_kl"),
                         [("one_epoch", True), ("one_epoch", False), ("clipped", True),
                          ("clipped", False)])
def test_loss_and_gradients_match_trl(peft_model, tmp_path, case: str,
                                      bias_correction_kl: bool):
    """``one_epoch``: beta 0.04, no old log-probs (ratio 1), our reference computed with the
    adapters off and TRL's as its ``_generate_and_score_completions`` does (the same model
    with ``use_adapter(model, None)``). ``clipped``: temperature 0.7, beta 0.1, given old and
    reference log-probs that push ratios out of the clip range on both sides. Each with
    TRL's KL bias correction (its default) and without."""
    from trl.trainer.utils import use_adapter

    beta, epsilon, temperature = (0.04, 0.2, 1.0) if case == "one_epoch" else (0.1, 0.2, 0.7)
    trainer = _trl_trainer(peft_model, beta, epsilon, temperature, tmp_path,
                           use_bias_correction_kl=bias_correction_kl)
    parts = rollout()
    inputs = {key: torch.from_numpy(value) for key, value in parts.items()}
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        current, _, _ = trainer._get_per_token_logps_and_entropies(peft_model, ids, mask,
                                                                   COMPLETION)
        with use_adapter(peft_model, adapter_name=None):
            ref, _, _ = trainer._get_per_token_logps_and_entropies(peft_model, ids, mask,
                                                                   COMPLETION)
    inputs["ref_per_token_logps"] = ref
    given = {}
    if case == "clipped":
        shift = torch.tensor([[0.5, -0.5, 0.05, 0.3, -0.3, 0.0]]).expand(4, -1)
        inputs["old_per_token_logps"] = current - shift  # ratios e^0.5, e^-0.5, ...
        given = {"old_logps": inputs["old_per_token_logps"].numpy(), "ref_logps": ref.numpy()}

    trl_loss = trainer._compute_loss(peft_model, inputs)  # eval mode: no accumulation divisor
    trl_loss.backward()
    trl_grads = lora_grads(peft_model)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    loss, metrics = torch_losses.grpo_loss(peft_model, to_torch(our_batch(parts, **given)),
                                           beta, epsilon, temperature, bias_correction_kl)
    loss.backward()
    grads = lora_grads(peft_model)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"], abs=1e-6)
    assert metrics["clip_ratio"].item() == pytest.approx(trl_metrics["clip_ratio/region_mean"])
    assert metrics["clip_ratio_low"].item() == pytest.approx(trl_metrics["clip_ratio/low_mean"])
    assert metrics["clip_ratio_high"].item() == pytest.approx(
        trl_metrics["clip_ratio/high_mean"])
    if case == "clipped":  # both sides really clipped something
        assert metrics["clip_ratio_low"].item() > 0 and metrics["clip_ratio_high"].item() > 0
    assert grads.keys() == trl_grads.keys() and len(grads) == 4 * 2 * SIZE.num_hidden_layers
    for name, grad in grads.items():
        torch.testing.assert_close(grad, trl_grads[name], atol=1e-6, rtol=1e-4,
                                   msg=lambda text, name=name: f"{name}: {text}")
    assert sum(g.abs().sum() for g in grads.values()) > 0


# ---------------------------------------------------------------- torch against MLX

@pytest.mark.parametrize("case", ["one_epoch", "given"])
def test_mlx_matches_torch(peft_model, mlx_model, case: str):
    """Same base, adapter and batch: log-probs, loss, metrics and every LoRA gradient agree
    (MLX's LoRA matrices are peft's transposed). ``one_epoch`` computes the reference with
    the adapters off on both backends; ``given`` brings old/ref log-probs, temperature 0.7."""
    parts = rollout()
    beta, epsilon, temperature = (0.04, 0.2, 1.0) if case == "one_epoch" else (0.1, 0.2, 0.7)
    given = {}
    if case == "given":
        rng = np.random.default_rng(2)
        given = {"old_logps": -3.0 + rng.normal(0, 0.4, (4, COMPLETION)),
                 "ref_logps": -3.0 + rng.normal(0, 0.4, (4, COMPLETION))}
    batch = our_batch(parts, **given)

    loss, metrics = torch_losses.grpo_loss(peft_model, to_torch(batch), beta, epsilon,
                                           temperature)
    loss.backward()
    torch_grads = lora_grads(peft_model)
    with torch.no_grad():
        torch_logps = torch_losses.token_logps(peft_model, to_torch(batch), temperature)

    mlx_batch = mlx_losses.to_mx(batch)
    assert mlx_batch["advantages"].dtype == mx.float32  # not truncated to ints
    mlx_logps = mlx_losses.token_logps(mlx_model, mlx_batch, temperature)
    completion = batch["completion_mask"].astype(bool)
    np.testing.assert_allclose(np.array(mlx_logps)[completion], torch_logps.numpy()[completion],
                               atol=1e-4)

    def loss_of(params: dict, batch: dict):
        mlx_model.update(params)
        return mlx_losses.grpo_loss(mlx_model, batch, beta, epsilon, temperature)

    (mlx_loss, mlx_metrics), grads = mx.value_and_grad(loss_of)(
        mlx_model.trainable_parameters(), mlx_batch)
    assert mlx_loss.item() == pytest.approx(loss.item(), abs=1e-4)
    assert mlx_metrics.keys() == metrics.keys()
    for key, value in metrics.items():
        assert mlx_metrics[key].item() == pytest.approx(value.item(), abs=1e-4), key
    mlx_grads = {peft_key(name): np.array(g).T for name, g in tree_flatten(grads)}
    assert mlx_grads.keys() == torch_grads.keys()
    for name, grad in torch_grads.items():
        np.testing.assert_allclose(mlx_grads[name], grad.numpy(), atol=1e-5, rtol=1e-3,
                                   err_msg=name)


# ---------------------------------------------------------------- the stage's loss

def test_stage_loss_grpo():
    """Both engines get the GRPO loss from ``stage_loss`` (one dispatch over either losses
    module); without its settings it refuses rather than inventing them."""
    for losses in (torch_losses, mlx_losses):
        with pytest.raises(ValueError, match="grpo_beta"):
            stage_loss(losses, "grpo", 0.1)
        assert callable(stage_loss(losses, "grpo", 0.1, grpo_beta=0.04, grpo_epsilon=0.2))
        assert stage_loss(losses, "sft", 0.1) is losses.sft_loss

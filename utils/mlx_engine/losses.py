"""The losses of every stage in MLX; ``utils/torch_engine/losses.py`` is the same math in torch.

Both read the batches of ``utils/stages`` (numpy arrays turned into arrays here): pretraining
windows of seq_len+1 tokens, SFT rows with -100 labels off the answers, DPO rows with the
chosen half first. Log-probabilities are taken in fp32 for stability.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from utils.mlx_engine.lora import adapters_disabled
from utils.stages.examples import IGNORE

Batch = dict[str, mx.array]


def to_mx(batch: dict[str, np.ndarray]) -> Batch:
    """Token ids and masks as int32; float arrays (GRPO's advantages and log-probs) as float32,
    which an int cast would truncate."""
    return {key: mx.array(value.astype(np.float32 if np.issubdtype(value.dtype, np.floating)
                                       else np.int32)) for key, value in batch.items()}


def causal_lm_loss(model: nn.Module, windows: mx.array) -> mx.array:
    """Next-token cross-entropy over windows of seq_len+1 tokens (fp32 logits for stability)."""
    logits = model(windows[:, :-1]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, windows[:, 1:], reduction="mean")


def _token_nll(model: nn.Module, batch: Batch) -> tuple[mx.array, mx.array]:
    """Per-token next-token NLL (fp32) and the mask of positions that are trained on.

    Position t predicts label t+1; padding sits at the end (right-padded), so the causal
    model's real positions never see it and no attention mask is needed.
    """
    logits = model(batch["input_ids"]).astype(mx.float32)
    labels = batch["labels"]
    targets = mx.concatenate([labels[:, 1:], mx.full((labels.shape[0], 1), IGNORE,
                                                     labels.dtype)], axis=1)
    mask = targets != IGNORE
    nll = nn.losses.cross_entropy(logits, mx.where(mask, targets, 0), reduction="none")
    return nll * mask, mask


def sft_loss(model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
    """Next-token cross-entropy over the batch's answer tokens only, summed and divided by
    ``batch["target_count"]`` when training, by this batch's own count otherwise (as torch)."""
    nll, mask = _token_nll(model, batch)
    count = batch["target_count"] if "target_count" in batch else mx.maximum(mask.sum(), 1)
    return nll.sum() / count, {}


def answer_logps(model: nn.Module, batch: Batch) -> mx.array:
    """Per row, the summed log-probability of its answer tokens."""
    nll, _ = _token_nll(model, batch)
    return -nll.sum(axis=-1)


def dpo_loss(model: nn.Module, batch: Batch,
             beta: float) -> tuple[mx.array, dict[str, mx.array]]:
    """Sigmoid DPO on a pad_dpo batch (chosen rows, then rejected rows).

    The reference is the same model with its adapters off, as torch's peft
    ``disable_adapter()``; its log-probabilities carry no gradient.
    """
    half = batch["input_ids"].shape[0] // 2
    with adapters_disabled(model):
        ref = mx.stop_gradient(answer_logps(model, batch))
    policy = answer_logps(model, batch)
    chosen = beta * (policy[:half] - ref[:half])
    rejected = beta * (policy[half:] - ref[half:])
    margin = chosen - rejected
    loss = -nn.log_sigmoid(margin).mean()
    return loss, {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
                  "reward_accuracy": (margin > 0).astype(mx.float32).mean(),
                  "reward_margin": margin.mean()}


def pretrain_loss(model: nn.Module, batch: Batch) -> tuple[mx.array, dict[str, mx.array]]:
    return causal_lm_loss(model, batch["input_ids"]), {}


class _RowPositions:
    """Stands in for mlx-lm's KV cache in one whole-sequence forward of left-padded rows.

    mlx-lm's GPT-NeoX takes no attention mask or positions; it reads both from its cache
    (``create_attention_mask`` asks the cache for ``make_mask``, ``Attention`` rotates by
    ``cache.offset``). Its batched generation (``BatchKVCache``) sets each row's offset to
    minus its left padding, so a real token's position is its index among the real tokens:
    transformers' ``generate`` positions (``cumsum(mask) - 1``). This object does the same
    and stores nothing: keys and values pass through.
    """

    def __init__(self, attention_mask: mx.array):
        length = attention_mask.shape[1]
        real = attention_mask.astype(mx.bool_)
        left_padding = (mx.cumsum(real.astype(mx.int32), axis=1) == 0).sum(axis=1)
        self.offset = -left_padding
        causal = mx.tril(mx.ones((length, length), dtype=mx.bool_))
        # Each query sees the real keys up to itself; a left-padding query sees only itself, so
        # no softmax row is empty (NaN); its output never reaches the completion mask.
        self.mask = (causal[None] & (real[:, None, :] | mx.eye(length, dtype=mx.bool_)[None])
                     )[:, None]

    def make_mask(self, *_: object, **__: object) -> mx.array:
        return self.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


def token_logps(model: nn.Module, batch: Batch, temperature: float = 1.0) -> mx.array:
    """(B, T) fp32: position t holds log p(input_ids[t] | input_ids[:t]); position 0 holds 0.

    As torch's: left-padded prompt + right-padded completion, padding masked out of the
    attention, positions counted from each row's first real token (see ``_RowPositions``;
    mlx-lm's own generation of an unpadded prompt uses the same positions), logits divided
    by the sampling temperature.
    """
    ids = batch["input_ids"]
    rows = _RowPositions(batch["attention_mask"])
    logits = model(ids, cache=[rows] * len(model.layers)).astype(mx.float32)
    if temperature != 1.0:
        logits = logits / temperature
    logps = -nn.losses.cross_entropy(logits[:, :-1], ids[:, 1:], reduction="none")
    return mx.concatenate([mx.zeros((ids.shape[0], 1), mx.float32), logps], axis=1)


def grpo_from_logps(logps: mx.array, old_logps: mx.array, ref_logps: mx.array | None,
                    advantages: mx.array, completion_mask: mx.array, beta: float,
                    epsilon: float, bias_correction_kl: bool = True,
                    ) -> tuple[mx.array, dict[str, mx.array]]:
    """TRL's GRPO loss for ``loss_type="grpo"``: see the torch twin for the formula, why this
    loss type and ``bias_correction_kl`` (TRL 1.16's default, on). Same metrics (``kl`` only
    with a reference), none carrying gradient."""
    if ref_logps is None and beta != 0.0:
        raise ValueError("grpo_from_logps: ref_logps is needed when beta != 0")
    mask = completion_mask.astype(mx.float32)
    on = mask > 0
    adv = advantages.astype(mx.float32)[:, None]
    ratio = mx.exp(mx.where(on, logps - old_logps, 0.0))
    clipped = mx.clip(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -mx.minimum(ratio * adv, clipped * adv)
    metrics: dict[str, mx.array] = {}
    tokens = mx.maximum(mask.sum(), 1)
    if ref_logps is not None:
        delta = mx.where(on, ref_logps - logps, 0.0)
        kl = mx.exp(delta) - delta - 1
        if bias_correction_kl:
            kl = kl * ratio
        if beta != 0.0:
            per_token = per_token + beta * kl
        metrics["kl"] = mx.stop_gradient((kl * mask).sum() / tokens)
    loss = ((per_token * mask).sum(axis=-1) / mx.maximum(mask.sum(axis=-1), 1)).mean()
    low = ((ratio < 1 - epsilon) & (adv < 0)).astype(mx.float32)
    high = ((ratio > 1 + epsilon) & (adv > 0)).astype(mx.float32)
    metrics["clip_ratio"] = mx.stop_gradient((mx.maximum(low, high) * mask).sum() / tokens)
    metrics["clip_ratio_low"] = mx.stop_gradient((low * mask).sum() / tokens)
    metrics["clip_ratio_high"] = mx.stop_gradient((high * mask).sum() / tokens)
    return loss, metrics


def reference_logps(model: nn.Module, batch: Batch, temperature: float = 1.0) -> mx.array:
    """The reference's token log-probs: the model with its adapters off, no gradient."""
    with adapters_disabled(model):
        return mx.stop_gradient(token_logps(model, batch, temperature))


def rollout_logps(model: nn.Module, batch: Batch, beta: float,
                  temperature: float = 1.0) -> dict[str, mx.array]:
    """What stays fixed while one rollout trains several passes: ``old_logps`` and, when
    beta != 0, ``ref_logps`` (see the torch twin). Call it with the model as it sampled."""
    fixed = {"old_logps": mx.stop_gradient(token_logps(model, batch, temperature))}
    if beta != 0.0:
        fixed["ref_logps"] = reference_logps(model, batch, temperature)
    mx.eval(fixed)
    return fixed


def grpo_loss(model: nn.Module, batch: Batch, beta: float, epsilon: float,
              temperature: float = 1.0,
              bias_correction_kl: bool = True) -> tuple[mx.array, dict[str, mx.array]]:
    """GRPO on a rollout batch; the reference is the model with its adapters off (no
    gradient) unless the batch brings ``ref_logps``, and ``old_logps`` defaults to the
    policy's own log-probs without gradient (ratio 1), as torch's."""
    ref = batch.get("ref_logps")
    if ref is None and beta != 0.0:
        ref = reference_logps(model, batch, temperature)
    logps = token_logps(model, batch, temperature)
    old = batch.get("old_logps")
    return grpo_from_logps(logps, mx.stop_gradient(logps) if old is None else old, ref,
                           batch["advantages"], batch["completion_mask"], beta, epsilon,
                           bias_correction_kl)


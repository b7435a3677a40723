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
    return {key: mx.array(value.astype(np.int32)) for key, value in batch.items()}


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


def stage_loss(stage: str, dpo_beta: float):
    """(model, batch) -> (loss, extra metrics) for ``stage``."""
    if stage == "dpo":
        return lambda model, batch: dpo_loss(model, batch, dpo_beta)
    return sft_loss if stage == "sft" else pretrain_loss

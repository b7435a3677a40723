"""What a training stage plugs into the MLX loop: utils/tasks.py's seam, mirrored for MLX.

Pretraining, LoRA SFT and LoRA DPO differ only here; ``mlx_train.py`` runs any of them with
the same sampler, accumulation, clipping, schedule, metrics, checkpoints and uploads. The data
side (JSONL formats, tokenizing, masks, padding, the held-out split) is utils/finetune.py's,
shared with torch; the losses are the torch ones written in MLX.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from configs.model_config import hf_config_for
from configs.training_config import TrainingConfig
from utils.data_utils import pretrain_data
from utils.finetune import IGNORE, check_vocab, lora_targets, pad_dpo, pad_sft, prepare_finetune
from utils.mlx_model import build_model, load_full_weights, save_pretrained

Batch = dict[str, mx.array]
LossFn = Callable[[nn.Module, Batch], tuple[mx.array, dict[str, mx.array]]]


@dataclass
class MlxTask:
    model: nn.Module
    examples: Sequence              # map-style; indexed by the WindowBatchSampler
    train_idx: np.ndarray
    eval_idx: np.ndarray
    num_files: int
    collate: Callable[[list], dict[str, np.ndarray]]
    loss: LossFn                    # (model, batch) -> (loss, extra metrics to log)
    count_tokens: Callable[[dict[str, np.ndarray]], int]
    write_weights: Callable[[dict, Path], None]  # (trainable fp32 params, checkpoint folder)
    read_weights: Callable[[Path], None]         # a checkpoint's weights into the model
    total_params: int
    non_embedding_params: int
    lengths: np.ndarray | None = None  # per example: the sampler groups batches by length
    meta: dict = field(default_factory=dict)


def build_mlx_task(config: TrainingConfig, dtype: mx.Dtype) -> MlxTask:
    """The task for ``config.stage``, its model computing in ``dtype``."""
    if config.stage == "pretrain":
        return pretrain_task(config)
    return finetune_task(config, dtype)


def to_mx(batch: dict[str, np.ndarray]) -> Batch:
    return {key: mx.array(value.astype(np.int32)) for key, value in batch.items()}


def _counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, without the input and output embeddings), before any quantization."""
    args = model.args
    total = sum(p.size for _, p in tree_flatten(model.parameters()))
    return total, total - 2 * args.vocab_size * args.hidden_size  # untied in and out


# ------------------------------------------------------------------ pretraining

def pretrain_task(config: TrainingConfig) -> MlxTask:
    data = pretrain_data(config.data_dir, config.seq_len, config.max_files, config.eval_windows,
                         config.seed)
    hf_config = hf_config_for(config.model, data.meta)
    model = build_model(hf_config.to_dict(), config.seed)
    total, non_embedding = _counts(model)
    return MlxTask(
        model=model, examples=data.windows, train_idx=data.train_idx, eval_idx=data.eval_idx,
        num_files=data.num_files, collate=lambda rows: {"input_ids": np.stack(rows)},
        loss=lambda m, batch: (causal_lm_loss(m, batch["input_ids"]), {}),
        count_tokens=lambda batch: batch["input_ids"].size - len(batch["input_ids"]),
        write_weights=lambda params, folder: save_pretrained(params, hf_config, folder),
        read_weights=partial(load_full_weights, model),
        total_params=total, non_embedding_params=non_embedding, meta=data.meta)


def causal_lm_loss(model: nn.Module, windows: mx.array) -> mx.array:
    """Next-token cross-entropy over windows of seq_len+1 tokens (fp32 logits for stability)."""
    logits = model(windows[:, :-1]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, windows[:, 1:], reduction="mean")


# ------------------------------------------------------------------ LoRA SFT and DPO

def finetune_task(config: TrainingConfig, dtype: mx.Dtype) -> MlxTask:
    """SFT or DPO on a frozen (optionally 4/8-bit) base with LoRA adapters, as on torch."""
    from utils.mlx_lora import apply_lora, load_adapter, load_base, quantize_base, save_adapter

    data = prepare_finetune(config)
    model, _ = load_base(data.base_path)
    check_vocab(data, model.args.vocab_size)
    total, non_embedding = _counts(model)
    if dtype != mx.float32:
        model.set_dtype(dtype)  # the frozen base computes in dtype; adapters stay fp32
    if config.quantize_bits:
        quantize_base(model, config.quantize_bits)
    mx.random.seed(config.seed)  # the adapters' initialisation
    targets = lora_targets(config.lora_target_modules)
    apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, targets)
    pairs = config.stage == "dpo"
    loss = partial(dpo_loss, beta=config.dpo_beta) if pairs else sft_loss
    return MlxTask(
        model=model, examples=data.examples, train_idx=data.train_idx, eval_idx=data.eval_idx,
        num_files=data.num_files,
        collate=partial(pad_dpo if pairs else pad_sft, pad_id=data.pad_id),
        loss=loss, count_tokens=lambda batch: int(batch["attention_mask"].sum()),
        write_weights=partial(save_adapter, r=config.lora_r, alpha=config.lora_alpha,
                              dropout=config.lora_dropout, targets=targets, base=data.base_path),
        read_weights=partial(load_adapter, model),
        total_params=total, non_embedding_params=non_embedding, lengths=data.lengths,
        meta={"tokenizer": str(data.tokenizer_dir)})


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
    """Mean next-token cross-entropy over the batch's answer tokens only."""
    nll, mask = _token_nll(model, batch)
    return nll.sum() / mx.maximum(mask.sum(), 1), {}


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
    from utils.mlx_lora import adapters_disabled

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

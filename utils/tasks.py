"""What a training stage plugs into the shared loop: model, examples, collate, loss.

Pretraining, LoRA SFT and LoRA DPO differ only here; ``train.py`` runs any of them with the
same sampler, accumulation, clipping, schedule, metrics, checkpoints and uploads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from configs.training_config import TrainingConfig
from utils.data_utils import TokenWindows, find_shards, read_dataset_meta, train_eval_split
from utils.modeling import build_model, causal_lm_loss

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]],
                  tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Task:
    model: torch.nn.Module
    examples: Sequence              # map-style; indexed by the WindowBatchSampler
    train_idx: np.ndarray
    eval_idx: np.ndarray
    num_files: int
    collate: Callable[[list], dict[str, torch.Tensor]]
    loss: LossFn                    # (model, batch) -> (loss, extra metrics to log)
    count_tokens: Callable[[dict[str, torch.Tensor]], int]
    lengths: np.ndarray | None = None  # per example: the sampler groups batches by length
    meta: dict = field(default_factory=dict)


def build_task(config: TrainingConfig) -> Task:
    """The task for ``config.stage``; fine-tuning stages live in utils/finetune.py."""
    if config.stage != "pretrain":
        from utils.finetune import build_finetune_task

        return build_finetune_task(config)
    return pretrain_task(config)


def pretrain_task(config: TrainingConfig) -> Task:
    root = Path(config.data_dir)
    shards = find_shards(root, max_files=config.max_files or None)
    windows = TokenWindows(shards, config.seq_len, root=root)
    train_idx, eval_idx = train_eval_split(len(windows), config.eval_windows, config.seed)
    meta = read_dataset_meta(root) or {}
    model = build_model(config, meta)
    if meta.get("vocab_size", 0) > model.config.vocab_size:
        raise ValueError("dataset vocabulary is larger than the model's")
    return Task(model=model, examples=windows, train_idx=train_idx, eval_idx=eval_idx,
                num_files=len(shards), collate=_stack_windows, loss=_pretrain_loss,
                count_tokens=lambda batch: batch["input_ids"].shape[0] * config.seq_len,
                meta=meta)


def _stack_windows(windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(np.stack(windows))}


def _pretrain_loss(model, batch: dict[str, torch.Tensor]):
    return causal_lm_loss(model, batch["input_ids"]), {}

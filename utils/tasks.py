"""What a training stage plugs into the shared loop: model, examples, collate, loss.

Pretraining, LoRA SFT and LoRA DPO differ only here; ``train.py`` runs any of them with the
same sampler, accumulation, clipping, schedule, metrics, checkpoints and uploads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from configs.training_config import TrainingConfig
from utils.data_utils import pretrain_data
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
    data = pretrain_data(config.data_dir, config.seq_len, config.max_files, config.eval_windows,
                         config.seed)
    return Task(model=build_model(config, data.meta), examples=data.windows,
                train_idx=data.train_idx, eval_idx=data.eval_idx, num_files=data.num_files,
                collate=_stack_windows, loss=_pretrain_loss,
                count_tokens=lambda batch: batch["input_ids"].shape[0] * config.seq_len,
                meta=data.meta)


def _stack_windows(windows: list[np.ndarray]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.from_numpy(np.stack(windows))}


def _pretrain_loss(model, batch: dict[str, torch.Tensor]):
    return causal_lm_loss(model, batch["input_ids"]), {}

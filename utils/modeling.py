"""The model side of the torch loop: build GPT-NeoX from config, the LM loss, compile support."""

from __future__ import annotations

import shutil
import sys

import torch
import torch.nn.functional as F

from configs.model_config import hf_config_for
from configs.training_config import TrainingConfig


def build_model(config: TrainingConfig, meta: dict | None):
    """GPT-NeoX from config, never downloaded; vocab and special ids from the data's tokenizer."""
    from transformers import GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per checkpoint write is noise in the log
    return GPTNeoXForCausalLM(hf_config_for(config.model, meta))


def causal_lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over windows of seq_len+1 tokens (fp32 logits for stability)."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run here, or None."""
    if not torch._dynamo.is_dynamo_supported():
        return f"dynamo does not support Python {sys.version_info.major}.{sys.version_info.minor}"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "inductor needs a C++ compiler on the CPU and none is installed"
    return None

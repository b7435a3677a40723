"""The model side of the torch engine: GPT-NeoX from config, compile support, device facts."""

from __future__ import annotations

import shutil
import sys

import psutil
import torch
import torch.nn.functional as F

from configs.model_config import hf_config_for
from configs.training_config import TrainingConfig

CAUSAL_ATTENTION = "harness_causal_sdpa"  # the name transformers knows it by

# Dense bf16 tensor-core peaks (FLOP/s) by GPU name substring; first match wins,
# so more specific names come first.
GPU_PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16: V100 has no bf16
    ("T4", 65e12),     # fp16
)


def causal_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None,
                     **_: object) -> tuple[torch.Tensor, None]:
    """Attention over packed, unpadded windows: causal, and SDPA gets no mask.

    With no mask and ``is_causal=True`` SDPA may pick its flash or cuDNN kernels. transformers'
    own SDPA path does that in eager mode but, under ``torch.compile``, builds a dense 4-D mask
    for every call (its issue 48925), which rules those kernels out. Registered with
    transformers' AttentionInterface (no mask is built for it either), used for pretraining
    only: stages with padding keep transformers' masked attention. A query shorter than the
    keys (decoding with a cache) gets the bottom-right-aligned causal mask it needs.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = None if q_len == kv_len else torch.ones(
        q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                         scale=scaling, is_causal=mask is None and q_len > 1)
    return out.transpose(1, 2).contiguous(), None


def _register_causal_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CAUSAL_ATTENTION, causal_attention)
    AttentionMaskInterface.register(CAUSAL_ATTENTION, lambda *_, **__: None)  # build no mask


def build_model(config: TrainingConfig, meta: dict | None):
    """GPT-NeoX from config, never downloaded; vocab and special ids from the data's tokenizer.

    Attention is ``causal_attention`` (windows are packed and unpadded); checkpoints do not
    record it, so ``from_pretrained`` loads them with transformers' default.
    """
    from transformers import GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per checkpoint write is noise in the log
    _register_causal_attention()
    hf_config = hf_config_for(config.model, meta)
    hf_config._attn_implementation = CAUSAL_ATTENTION
    return GPTNeoXForCausalLM(hf_config)


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run here, or None."""
    if not torch._dynamo.is_dynamo_supported():
        return f"dynamo does not support Python {sys.version_info.major}.{sys.version_info.minor}"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "inductor needs a C++ compiler on the CPU and none is installed"
    return None


def device_peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """The device's dense peak in FLOP/s, or None where it is not known (MFU is then omitted)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_BF16 if key in name), None)


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's resident set on other devices."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30

"""The model side of the torch engine: GPT-NeoX from config, compile support, device facts."""

from __future__ import annotations

import shutil
import sys

import psutil
import torch

from configs.model_config import hf_config_for
from configs.training_config import TrainingConfig

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


def build_model(config: TrainingConfig, meta: dict | None):
    """GPT-NeoX from config, never downloaded; vocab and special ids from the data's tokenizer."""
    from transformers import GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per checkpoint write is noise in the log
    return GPTNeoXForCausalLM(hf_config_for(config.model, meta))


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

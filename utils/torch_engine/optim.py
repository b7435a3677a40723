"""AdamW with the usual decay groups: no weight decay on biases and norms."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (biases, LayerNorm weights) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: torch.nn.Module, lr: float, weight_decay: float,
                betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """Fused AdamW (one kernel for all parameters, on CUDA and the CPU): besides speed, it
    takes ``found_inf``, which lets the engine skip a non-finite update on the device."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=True)

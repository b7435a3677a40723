"""Log-likelihood scoring of downstream task rows in torch (``utils/mlx_engine/scoring.py``
is the same math in MLX).

The rows come padded from ``utils.stages.downstream.pad_requests``; only the scored positions
are upcast to fp32 and normalised, so a large vocabulary never makes whole fp32 log-probs.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate.utils import DistributedType, extract_model_from_parallel

from utils.stages.downstream import RowScore


def scoring_model(model: torch.nn.Module, distributed_type: DistributedType) -> torch.nn.Module:
    """The plain module to run: outside DDP (whose forward may broadcast buffers, a collective
    the processes would not all reach) and torch.compile (every row width a recompile). FSDP
    keeps its wrapper: its forward gathers the sharded weights."""
    if distributed_type == DistributedType.FSDP:
        return model
    return extract_model_from_parallel(model, keep_torch_compile=False)


@torch.no_grad()
def score_batch(model: torch.nn.Module, batch: dict[str, np.ndarray],
                device: torch.device) -> list[RowScore]:
    """Per row: (summed log-prob of its continuation, every continuation token the argmax,
    continuation tokens). Right padding needs no mask: a causal model's real positions never
    attend to it."""
    ids = torch.from_numpy(batch["input_ids"]).to(device)
    rows, cols, targets = (torch.from_numpy(batch[k]).to(device)
                           for k in ("rows", "cols", "targets"))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    picked = logits[rows, cols].float()
    token_ll = picked.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    missed = (picked.argmax(-1) != targets).float()
    n = ids.shape[0]
    ll = torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, rows, token_ll.double())
    misses = torch.zeros(n, device=device).index_add_(0, rows, missed)
    counts = torch.bincount(rows, minlength=n)
    return [(float(a), bool(b == 0), int(c)) for a, b, c in
            zip(ll.tolist(), misses.tolist(), counts.tolist(), strict=True)]

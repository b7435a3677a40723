"""Log-likelihood scoring of downstream task rows in MLX (``utils/torch_engine/scoring.py`` is
the same math in torch).

The rows come padded from ``utils.stages.downstream.pad_requests``; only the scored positions
are upcast to fp32 and normalised, so a large vocabulary never makes whole fp32 log-probs.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from utils.mlx_engine.losses import to_mx
from utils.stages.downstream import RowScore


def score_batch(model: nn.Module, batch: dict[str, np.ndarray]) -> list[RowScore]:
    """Per row: (summed log-prob of its continuation, every continuation token the argmax,
    continuation tokens). Right padding needs no mask: a causal model's real positions never
    attend to it. No gradient is taken: nothing here is under ``mx.grad``."""
    arrays = to_mx(batch)
    rows, targets = arrays["rows"], arrays["targets"]
    logits = model(arrays["input_ids"])
    picked = logits[rows, arrays["cols"]].astype(mx.float32)
    token_ll = mx.take_along_axis(picked, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(
        picked, axis=-1)
    missed = (mx.argmax(picked, axis=-1) != targets).astype(mx.float32)
    n = arrays["input_ids"].shape[0]
    ll = mx.zeros((n,), mx.float32).at[rows].add(token_ll)
    misses = mx.zeros((n,), mx.float32).at[rows].add(missed)
    counts = mx.zeros((n,), mx.int32).at[rows].add(mx.ones_like(rows))
    mx.eval(ll, misses, counts)
    return [(float(a), bool(b == 0), int(c)) for a, b, c in
            zip(ll.tolist(), misses.tolist(), counts.tolist(), strict=True)]

"""``--per-device-train-batch-size auto``: the largest micro-batch that fits the device.

A step's sequences per process (``per_device_train_batch_size`` x
``gradient_accumulation_steps``, what the data position counts) never change: the engine
regroups each step's rows into micro-batches of the chosen size and accumulates over
``sequences / size`` of them. So a checkpoint resumes alike on any device, whatever size
each one picks. Fewer, larger micro-batches make larger matmuls and fewer gradient
accumulations and weight casts (bench/sim_gpu.py: neox-1.2b on an H100 is bounded at
75.4% MFU at 4 x 4, 79.5% at 8 x 2).

On CUDA a short probe decides: a forward and backward (two, where gradients would already be
alive in the step's later micro-batches) at each candidate size, largest first, with the
AdamW state's memory held aside; an out-of-memory error backs off to the next. Elsewhere,
and as the probe's first candidate, :func:`estimate_gib` says what fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from utils.errors import TrainingError

GIB = 2**30
BUDGET = 0.9  # of the device's memory: the allocator's fragmentation and the CUDA context


@dataclass(frozen=True)
class Dims:
    """What the memory model needs of a GPT-NeoX: sizes, not weights."""

    params: int  # trainable, all of them (pretraining)
    layers: int
    hidden: int
    vocab: int

    @property
    def layer_params(self) -> int:
        return 12 * self.hidden * self.hidden + 13 * self.hidden


@dataclass(frozen=True)
class MicroBatch:
    """The resolved split of a step: ``size`` sequences per micro-batch, ``accumulation``
    micro-batches per optimizer step; ``how`` says how it was chosen (for the banner)."""

    size: int
    accumulation: int
    how: str


# Bytes per token per layer kept for backward by the compiled GPT-NeoX layer under bf16
# autocast (bench/sim_gpu.py's saved-tensor report, seq 2048): the fp32 residual input (4h),
# the two LayerNorm outputs and the attention output (3 x 2h), q, k, v and flash's output
# (4 x 2h), the MLP's input and GELU output (2 x 8h) = 34h.
ACT_BYTES_PER_TOKEN_H = 34
# Fitted to bench/sim_gpu.py's allocated peaks (2026-12-05, neox-1.2b at micro-batch 4, 8,
# 16): a loss chunk's logits and their gradient as the op-by-op run holds them (bytes per
# logit), the final hidden states, their norm and gradients (bytes per token per h).
LOSS_BYTES_PER_LOGIT = 18
HIDDEN_BYTES_PER_TOKEN_H = 32


def estimate_gib(dims: Dims, size: int, seq_len: int, accumulation: int, bf16: bool,
                 chunk_tokens: int) -> float:
    """The allocated peak of a training step at micro-batch ``size``: fp32 weights and AdamW
    moments (12 bytes per parameter); fp32 gradients (4) where an earlier micro-batch left
    them alive; each layer's saved activations and its weights' bf16 casts; the loss chunk's
    logits; the final hidden states. Within 2% of bench/sim_gpu.py's peaks for neox-1.2b
    (tests/test_micro_batch.py checks a small case against a fresh simulation). fp32 (no
    autocast) doubles the activations and has no casts: a rougher estimate."""
    tokens = size * seq_len
    resident = 12 * dims.params + (4 * dims.params if accumulation > 1 else 0)
    per_layer = ACT_BYTES_PER_TOKEN_H * dims.hidden * tokens * (1 if bf16 else 2)
    per_layer += 2 * dims.layer_params if bf16 else 0
    chunk = min(chunk_tokens, tokens) if chunk_tokens > 0 else tokens
    loss = LOSS_BYTES_PER_LOGIT * chunk * dims.vocab
    hidden = HIDDEN_BYTES_PER_TOKEN_H * dims.hidden * tokens
    return (resident + dims.layers * per_layer + loss + hidden) / GIB


def candidates(sequences: int) -> list[int]:
    """The micro-batch sizes that split a step's ``sequences`` evenly, largest first."""
    return [n for n in range(sequences, 0, -1) if sequences % n == 0]


def by_estimate(dims: Dims, sequences: int, seq_len: int, bf16: bool, chunk_tokens: int,
                memory_gib: float) -> MicroBatch:
    """The largest size whose :func:`estimate_gib` is within :data:`BUDGET` of
    ``memory_gib`` (1 if none is)."""
    budget = BUDGET * memory_gib
    for size in candidates(sequences):
        need = estimate_gib(dims, size, seq_len, sequences // size, bf16, chunk_tokens)
        if need <= budget:
            return MicroBatch(size, sequences // size, f"estimated {need:.1f} GiB of "
                              f"{memory_gib:.1f} GiB")
    return MicroBatch(1, sequences, f"estimated: none fits {budget:.1f} GiB; 1 per micro-batch")


def probe(try_size: Callable[[int], bool], sequences: int, largest: int,
          say: Callable[[str], None], memory_gib: float) -> MicroBatch:
    """The largest size up to ``largest`` that splits ``sequences`` evenly and for which
    ``try_size`` returns True (it runs the step's work at that size and returns False on an
    out-of-memory error, the cache emptied); ``say`` reports each back-off. TrainingError
    where not even one sequence fits."""
    for size in (n for n in candidates(sequences) if n <= largest):
        if try_size(size):
            return MicroBatch(size, sequences // size,
                              f"the largest that fit a start-up probe on {memory_gib:.1f} GiB")
        say(f"micro-batch {size}: out of memory in the start-up probe; trying a smaller one")
    raise TrainingError(f"not even one sequence of the step fits the device "
                        f"({memory_gib:.1f} GiB); lower --seq-len or pick a smaller --model")


def regroup(micro_batches: list[dict], accumulation: int) -> list[dict]:
    """A step's rows (the data's micro-batches, numpy arrays or tensors by key) as
    ``accumulation`` equal micro-batches, rows in the same order."""
    import numpy as np
    import torch

    if len(micro_batches) == accumulation:
        return micro_batches
    merged = {key: (torch.cat if torch.is_tensor(values[0]) else np.concatenate)(values)
              for key, values in ((k, [b[k] for b in micro_batches])
                                  for k in micro_batches[0])}
    rows = len(next(iter(merged.values())))
    if rows % accumulation:  # not a whole step (a preflight's single batch): as it came
        return micro_batches
    size = rows // accumulation
    return [{key: value[i * size:(i + 1) * size] for key, value in merged.items()}
            for i in range(accumulation)]

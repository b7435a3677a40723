"""LM head + cross-entropy a chunk of tokens at a time, so (tokens x vocab) logits never exist.

The plain path (``lm_head(h)`` then ``F.cross_entropy(logits.float())``) holds the whole
micro-batch's logits in the compute dtype and in fp32, autograd keeps them (or the
log-softmax) for backward, and backward allocates a gradient of the same size: several
batch x seq x vocab tensors, 1.6 GB each in fp32 for 4 x 2048 tokens and a 50k vocabulary.
Here (as Liger kernel's fused linear cross-entropy does, in plain torch) the forward walks the
tokens ``chunk`` at a time: logits of the chunk upcast to fp32, logsumexp, the loss, and at
once the gradient ``softmax - onehot``, turned into the chunk's hidden-state gradient and
added to an fp32 head-weight gradient. Peak memory is bounded by chunk x vocab; nothing is
recomputed in backward, which only scales the saved gradients by the incoming one.

On CUDA the memory-bound part of a chunk (fp32 upcast, logsumexp, the loss, softmax - onehot,
the cast back) is one ``torch.compile``d function (``softmax_grad``): fused, it reads the
chunk's logits once and writes their gradient once, where the eager ops below make ~40
passes over chunk x vocab (``bench/sim_gpu.py`` counts them). Elsewhere (the CPU, where
compiling is slow and gains nothing here) the eager in-place ops run, the leanest in memory.

Mixed precision: the matmuls run in forward, under the caller's autocast state, exactly where
the plain path runs its head matmul, so bf16 autocast gives bf16 matmuls and fp32 logits as
before. The head weight's gradient reaches it through autograd (the Function's backward), so
DDP's and FSDP's gradient hooks fire as for any parameter; dynamo traces the Function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from utils.stages.examples import IGNORE

# What compiles ``softmax_grad`` where the loss is fused; bench/sim_gpu.py swaps in its own.
LOSS_BACKEND: str | Callable = "inductor"
FUSED_DEVICES = ("cuda",)  # where the fused path is the default


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int, fused: bool | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (IGNORE rows skipped).

    ``hidden`` is (N, d), ``weight`` the bias-free head's (V, d), ``targets`` (N,); ``chunk``
    tokens at a time (<= 0: all at once). Returns an fp32 scalar: the caller picks the mean's
    denominator (valid tokens, or those of the whole optimizer step). Without autograd (eval,
    ``torch.no_grad``, nothing requiring grad) no gradient is computed. ``fused``: the
    compiled per-chunk softmax gradient (None: on CUDA, when dynamo runs here).
    """
    chunk = chunk if chunk > 0 else max(hidden.shape[0], 1)
    needs_hidden, needs_weight = hidden.requires_grad, weight.requires_grad
    if torch.is_grad_enabled() and (needs_hidden or needs_weight):
        fused = _fuse_by_default(hidden) if fused is None else fused
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, needs_hidden,
                                         needs_weight, fused)
    return _loss_only(hidden, weight, targets, chunk)


def _fuse_by_default(hidden: torch.Tensor) -> bool:
    """Fused on CUDA; not while dynamo traces the caller (it fuses the whole thing itself)."""
    return (hidden.device.type in FUSED_DEVICES and torch._dynamo.is_dynamo_supported()
            and not torch.compiler.is_compiling())


def softmax_grad(raw: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed loss and d loss / d logits (softmax - onehot, zero on ignored rows)
    in ``raw``'s dtype, from its logits ``raw`` (the matmul's dtype), in fp32 inside. Written
    out of place so one compiled kernel can read ``raw`` once and write the gradient once."""
    logits = raw.float()
    valid = targets != IGNORE
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
    onehot = torch.arange(logits.shape[1], device=raw.device) == safe.unsqueeze(1)
    grad = ((logits - lse.unsqueeze(1)).exp() - onehot.float()) * valid.unsqueeze(1)
    return loss, grad.to(raw.dtype)


@functools.cache
def _compiled_softmax_grad(backend: str | Callable) -> Callable:
    return torch.compile(softmax_grad, backend=backend, fullgraph=True, dynamic=False)


def _softmax_grad_in_place(raw: torch.Tensor,
                           targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax_grad`` eagerly, in place on the fp32 logits: the fewest chunk x vocab
    temporaries alive at once (the CPU's path)."""
    logits = raw.float()
    valid = targets != IGNORE
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    grad = logits.sub_(top).exp_()
    norm = grad.sum(dim=-1, keepdim=True)
    lse = (top + norm.log()).squeeze(1)
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
    grad.div_(norm)
    grad.scatter_add_(1, safe.unsqueeze(1), torch.full_like(picked, -1.0).unsqueeze(1))
    grad.mul_(valid.unsqueeze(1))
    return loss, grad.to(raw.dtype)


def _loss_only(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               chunk: int) -> torch.Tensor:
    """Forward only: the plain path's numerics, one chunk of logits alive at a time."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start:start + chunk], weight).float()
        total = total + F.cross_entropy(logits, targets[start:start + chunk],
                                        ignore_index=IGNORE, reduction="sum")
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in forward, chunk by chunk; backward scales the saved ones."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int, needs_hidden: bool, needs_weight: bool,
                fused: bool = False) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # fp32 accumulation over chunks, whatever the matmul dtype (cast once, in backward).
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if needs_weight else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk_grad = _compiled_softmax_grad(LOSS_BACKEND) if fused else _softmax_grad_in_place
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            raw = F.linear(h, weight)  # the compute dtype: bf16 under bf16 autocast
            loss, grad = chunk_grad(raw, targets[start:start + chunk])
            total = total + loss
            if grad_hidden is not None:
                grad_hidden[start:start + chunk] = grad @ weight
            if grad_weight is not None:
                grad_weight += grad.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None

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

Mixed precision: the matmuls run in forward, under the caller's autocast state, exactly where
the plain path runs its head matmul, so bf16 autocast gives bf16 matmuls and fp32 logits as
before. The head weight's gradient reaches it through autograd (the Function's backward), so
DDP's and FSDP's gradient hooks fire as for any parameter; dynamo traces the Function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.stages.examples import IGNORE


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (IGNORE rows skipped).

    ``hidden`` is (N, d), ``weight`` the bias-free head's (V, d), ``targets`` (N,); ``chunk``
    tokens at a time (<= 0: all at once). Returns an fp32 scalar: the caller picks the mean's
    denominator (valid tokens, or those of the whole optimizer step). Without autograd (eval,
    ``torch.no_grad``, nothing requiring grad) no gradient is computed.
    """
    chunk = chunk if chunk > 0 else max(hidden.shape[0], 1)
    needs_hidden, needs_weight = hidden.requires_grad, weight.requires_grad
    if torch.is_grad_enabled() and (needs_hidden or needs_weight):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, needs_hidden,
                                         needs_weight)
    return _loss_only(hidden, weight, targets, chunk)


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
                chunk: int, needs_hidden: bool, needs_weight: bool) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # fp32 accumulation over chunks, whatever the matmul dtype (cast once, in backward).
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if needs_weight else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            raw = F.linear(h, weight)  # the compute dtype: bf16 under bf16 autocast
            logits = raw.float()
            valid = t != IGNORE
            safe = torch.where(valid, t, torch.zeros_like(t))
            picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
            # Softmax and logsumexp in place, in as few passes over chunk x vocab as we can.
            top = logits.amax(dim=-1, keepdim=True)
            grad = logits.sub_(top).exp_()
            norm = grad.sum(dim=-1, keepdim=True)
            lse = (top + norm.log()).squeeze(1)
            total = total + torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
            # d loss / d logits = softmax - onehot(target), zero on ignored rows.
            grad.div_(norm)
            grad.scatter_add_(1, safe.unsqueeze(1), torch.full_like(picked, -1.0).unsqueeze(1))
            grad.mul_(valid.unsqueeze(1))
            grad = grad.to(raw.dtype)
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
        return grad_hidden, grad_weight, None, None, None, None

"""The losses of every stage in torch; ``utils/mlx_engine/losses.py`` is the same math in MLX.

Both read the batches of ``utils/stages`` (numpy arrays turned into tensors): pretraining
windows of seq_len+1 tokens, SFT rows with -100 labels off the answers, DPO rows with the
chosen half first. Log-probabilities are taken in fp32 for stability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel

from utils.stages.examples import IGNORE

Batch = dict[str, torch.Tensor]


def causal_lm_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over windows of seq_len+1 tokens (fp32 logits).

    A model built with ``loss_chunk_tokens`` > 0 (``utils/torch_engine/model.py``) computes
    it inside its forward, a chunk of tokens at a time, so whole-batch fp32 logits never
    exist; the targets go in as ``shift_labels`` (already the next tokens: not shifted
    again). Otherwise the whole logits are upcast here, as transformers' own loss does.
    """
    inputs, targets = windows[:, :-1], windows[:, 1:]
    if getattr(extract_model_from_parallel(model, keep_torch_compile=False),
               "loss_chunk_tokens", 0) > 0:
        return model(input_ids=inputs, shift_labels=targets, use_cache=False).loss
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def pretrain_loss(model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return causal_lm_loss(model, batch["input_ids"]), {}


def _forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 use_cache=False).logits


def _next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is label t+1 (the last position has none): shifting the labels,
    not the logits, avoids copying a (batch, length, vocab) tensor."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of its answer tokens (fp32)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), _next_tokens(labels).flatten(),
                          ignore_index=IGNORE, reduction="none")
    return -nll.view(labels.shape).sum(-1)


def sft_loss(model, batch: Batch) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy over the batch's answer tokens only.

    Summed, then divided by ``batch["target_count"]`` when training (the answer tokens of the
    whole optimizer step, per micro-batch and process: see ``utils/loop/trainer.py``), so
    accumulation and ranks weigh every token alike; by this batch's own count otherwise.
    """
    logits = _forward(model, batch)
    targets = _next_tokens(batch["labels"])
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                          reduction="sum")
    count = batch.get("target_count")
    return nll / (count if count is not None else (targets != IGNORE).sum().clamp(min=1)), {}


def dpo_from_logps(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                   ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                   beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO: -log sigmoid(beta * ((pc - rc) - (pr - rr))), and the rewards it implies."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, {"rewards_chosen": chosen.detach().mean(),
                  "rewards_rejected": rejected.detach().mean(),
                  "reward_accuracy": (chosen > rejected).float().mean().detach(),
                  "reward_margin": (chosen - rejected).detach().mean()}


def dpo_loss(model, batch: dict[str, torch.Tensor],
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on a pad_dpo batch; the reference is the same model with its adapters disabled."""
    peft_model = extract_model_from_parallel(model, keep_torch_compile=False)
    half = batch["input_ids"].shape[0] // 2
    with torch.no_grad(), peft_model.disable_adapter():  # through the wrapper (DDP/FSDP)
        ref = answer_logps(_forward(model, batch), batch["labels"])
    policy = answer_logps(_forward(model, batch), batch["labels"])
    return dpo_from_logps(policy[:half], policy[half:], ref[:half], ref[half:], beta)


def stage_loss(stage: str, dpo_beta: float):
    """(model, batch) -> (loss, extra metrics) for ``stage``."""
    if stage == "dpo":
        return lambda model, batch: dpo_loss(model, batch, dpo_beta)
    return sft_loss if stage == "sft" else pretrain_loss

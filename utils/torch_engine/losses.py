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
    # An explicit all-ones mask: without one, transformers looks for packed sequences in the
    # position ids with a data-dependent ``if`` (a host sync every forward). Pretraining's
    # causal attention builds no mask from it (utils/torch_engine/model.py).
    ones = torch.ones_like(inputs)
    if getattr(extract_model_from_parallel(model, keep_torch_compile=False),
               "loss_chunk_tokens", 0) > 0:
        return model(input_ids=inputs, attention_mask=ones, shift_labels=targets,
                     use_cache=False).loss
    logits = model(input_ids=inputs, attention_mask=ones, use_cache=False).logits
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


def token_logps(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) fp32: position t holds log p(input_ids[t] | input_ids[:t]); position 0 holds 0.

    Rows are GRPO sequences: a left-padded prompt, then a right-padded completion. The
    positions are transformers' ``generate`` ones (``_prepare_position_ids_for_generation``:
    ``cumsum(attention_mask) - 1``, 0 on padding), so a sampled token is scored at the
    position it was sampled at. (TRL passes no ``position_ids``, which gives 0..T-1 with the
    padding counted; GPT-NeoX's rotary attention depends only on position differences, so the
    two agree to float rounding, ~5e-7 here.) Logits are divided by the sampling temperature,
    as TRL's fused LM head does, so the ratio to the sampler's log-probs compares like with
    like. A left-padded row's first real token is scored after padding only: a prompt token,
    outside the completion mask, and not comparable across backends.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                   use_cache=False).logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    nll = F.cross_entropy(logits.flatten(0, 1), _next_tokens(ids).flatten(),
                          ignore_index=IGNORE, reduction="none").view(ids.shape)
    return F.pad(-nll[:, :-1], (1, 0))


def grpo_from_logps(logps: torch.Tensor, old_logps: torch.Tensor,
                    ref_logps: torch.Tensor | None, advantages: torch.Tensor,
                    completion_mask: torch.Tensor, beta: float, epsilon: float,
                    bias_correction_kl: bool = True,
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's GRPO loss for ``loss_type="grpo"`` (DeepSeekMath's formula), per-token inputs (B, T).

    per_token = -min(r A, clip(r, 1-eps, 1+eps) A) + beta * k3 [* r], with
    r = exp(logp - old) and k3 = exp(ref - logp) - (ref - logp) - 1 (a never negative
    estimate of KL(policy || reference)); the loss is the mean over each sequence's
    completion tokens, then the mean over sequences (trl 1.16.0, trl/trainer/grpo_trainer.py,
    ``GRPOTrainer._compute_loss``, lines 3020-3157). TRL 1.16's default is
    ``loss_type="dapo"`` (one token-weighted mean over the whole accumulated batch); we
    implement "grpo" because it is the paper's objective, needs no count of the tokens of
    the whole optimizer step, and does not change with how a step is split into
    micro-batches of whole sequences. TRL divides by the gradient accumulation steps inside
    the loss; our engines average the micro-batches themselves, so this is TRL's loss with
    accumulation 1.

    ``bias_correction_kl`` multiplies k3 by r, as TRL 1.16 does by default
    (``GRPOConfig.use_bias_correction_kl=True``, after DeepSeek-V3.2): the completions were
    sampled from the old policy, and the ratio makes the KL term's gradient the unbiased
    reverse-KL gradient. It changes the gradient even at r = 1 (r carries one), not the
    value there. False gives the original DeepSeekMath term, beta * k3.

    ``ref_logps`` may be None only when ``beta`` is 0 (no KL term, no "kl" metric). Outside
    the mask, the log-ratios are set to 0 before exponentiating: a padding position can then
    never turn into inf * 0 = NaN, and the masked positions carry no gradient.

    Metrics (no gradient), means over all completion tokens of the batch as TRL logs them:
    ``kl`` (the KL term as it enters the loss, before beta), ``clip_ratio`` (TRL's
    ``clip_ratio/region_mean``: tokens whose ratio left the clip range on the side where
    clipping removes their gradient) and its two sides, ``clip_ratio_low``/``_high``.
    """
    if ref_logps is None and beta != 0.0:
        raise ValueError("grpo_from_logps: ref_logps is needed when beta != 0")
    mask = completion_mask.to(logps.dtype)
    on = mask > 0
    adv = advantages.to(logps.dtype).unsqueeze(-1)
    ratio = torch.exp(torch.where(on, logps - old_logps, 0.0))
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics: dict[str, torch.Tensor] = {}
    tokens = mask.sum().clamp(min=1)
    if ref_logps is not None:
        delta = torch.where(on, ref_logps - logps, 0.0)
        kl = torch.exp(delta) - delta - 1
        if bias_correction_kl:
            kl = kl * ratio
        if beta != 0.0:
            per_token = per_token + beta * kl
        metrics["kl"] = ((kl * mask).sum() / tokens).detach()
    loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    low = ((ratio < 1 - epsilon) & (adv < 0)).to(mask.dtype)
    high = ((ratio > 1 + epsilon) & (adv > 0)).to(mask.dtype)
    metrics["clip_ratio"] = ((torch.maximum(low, high) * mask).sum() / tokens).detach()
    metrics["clip_ratio_low"] = ((low * mask).sum() / tokens).detach()
    metrics["clip_ratio_high"] = ((high * mask).sum() / tokens).detach()
    return loss, metrics


def reference_logps(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """The reference's token log-probs: the same model with its adapters disabled (through
    the DDP/FSDP wrapper), without gradient."""
    peft_model = extract_model_from_parallel(model, keep_torch_compile=False)
    with torch.no_grad(), peft_model.disable_adapter():
        return token_logps(model, batch, temperature)


def rollout_logps(model, batch: Batch, beta: float,
                  temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """What stays fixed while one rollout trains several passes (``--grpo-epochs``): the
    sampling policy's log-probs (``old_logps``, so the ratio and its clipping measure how far
    the passes moved the policy) and, with a KL penalty, the reference's (``ref_logps``).
    TRL computes both once per generation batch when ``num_iterations > 1``. Call it with the
    model as it sampled (eval mode)."""
    with torch.no_grad():
        fixed = {"old_logps": token_logps(model, batch, temperature)}
    if beta != 0.0:
        fixed["ref_logps"] = reference_logps(model, batch, temperature)
    return fixed


def grpo_loss(model, batch: Batch, beta: float, epsilon: float, temperature: float = 1.0,
              bias_correction_kl: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO on a rollout batch (see ``token_logps`` for its rows).

    The reference is the same model with its adapters disabled, under no_grad, unless the
    batch brings ``ref_logps`` (or beta is 0: no reference at all, as TRL). ``old_logps``
    (the sampling policy, needed when one rollout trains several epochs) defaults to the
    policy's own log-probs detached: ratio 1, TRL's shortcut for one epoch.
    """
    ref = batch.get("ref_logps")
    if ref is None and beta != 0.0:
        ref = reference_logps(model, batch, temperature)
    logps = token_logps(model, batch, temperature)
    old = batch.get("old_logps")
    return grpo_from_logps(logps, logps.detach() if old is None else old, ref,
                           batch["advantages"], batch["completion_mask"], beta, epsilon,
                           bias_correction_kl)


"""The model side of the torch engine: GPT-NeoX from config, compile support, device facts."""

from __future__ import annotations

import shutil
import sys
from types import MethodType

import psutil
import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from configs.model_config import generation_config_for, hf_config_for, tokenizer_vocab
from configs.training_config import TrainingConfig
from utils.stages.examples import IGNORE
from utils.torch_engine.chunked_ce import chunked_cross_entropy

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
    # transformers hands ``value`` over as a view of the fused QKV projection's output:
    # saved for backward as such, it keeps all of q, k and v alive per layer (3x its size;
    # q and k are saved separately after the rotary embedding anyway). Its own copy lets the
    # QKV output go after forward (measured by bench/sim_gpu.py: the saved activations).
    value = value.contiguous()  # a strided view of QKV: copied; a cache's value: as it is
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


def chunked_loss_forward(self, input_ids: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None,
                         inputs_embeds: torch.Tensor | None = None, past_key_values=None,
                         labels: torch.Tensor | None = None, use_cache: bool | None = None,
                         logits_to_keep: int | torch.Tensor = 0, **kwargs):
    """GPT-NeoX's forward whose loss, given labels, never holds whole-batch fp32 logits.

    Bound to a model by ``use_chunked_loss``. With ``labels`` or ``shift_labels`` it runs the
    base model and ``chunked_cross_entropy`` on the final (layer-normed) hidden states and
    returns the loss with no logits; the loss stays inside ``forward`` so DDP/FSDP wrappers
    see the head used (FSDP's gather, DDP's prepare_for_backward). Arguments mean what they
    mean to transformers: ``labels`` are shifted here (position t predicts label t+1),
    ``shift_labels`` are already the next tokens; the loss is the mean over valid tokens, or
    the sum over ``num_items_in_batch``. Without labels it is transformers' own forward.
    """
    shift_labels = kwargs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    outputs = self.gpt_neox(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, past_key_values=past_key_values,
                            use_cache=use_cache, **kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    targets = shift_labels.reshape(-1).to(hidden.device)
    total = chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]),
                                  self.get_output_embeddings().weight, targets,
                                  self.loss_chunk_tokens)
    if num_items is None:
        loss = total / (targets != IGNORE).sum().clamp(min=1)
    else:
        loss = total / (num_items.to(total.device) if torch.is_tensor(num_items) else num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


def use_chunked_loss(model: GPTNeoXForCausalLM, chunk_tokens: int) -> GPTNeoXForCausalLM:
    """Give ``model`` (in place) the chunked loss, ``chunk_tokens`` at a time (0: leave it).

    A forward bound to the instance, not a subclass: transformers keys several behaviours on
    the class (its name in config.json's ``architectures``, the embed_out <-> lm_head renaming
    on save and load, weight init, all skipped or changed for a class defined outside
    transformers), so the model stays exactly ``GPTNeoXForCausalLM`` and its checkpoints plain
    GPT-NeoX for ``from_pretrained`` and mlx-lm. Wrappers (DDP, FSDP, accelerate's autocast,
    torch.compile) call ``model.forward`` and so this one.
    """
    if model.get_output_embeddings().bias is not None:
        raise ValueError("chunked_cross_entropy assumes GPT-NeoX's bias-free LM head")
    model.loss_chunk_tokens = chunk_tokens
    if chunk_tokens > 0:
        model.forward = MethodType(chunked_loss_forward, model)
    return model


def build_model(config: TrainingConfig, meta: dict | None) -> GPTNeoXForCausalLM:
    """GPT-NeoX from config, never downloaded; vocab and special ids from the data's tokenizer.

    Attention is ``causal_attention`` (windows are packed and unpadded) or, with
    ``attention="sdpa"``, transformers' own; checkpoints record neither, so ``from_pretrained``
    loads them with transformers' default. The loss runs ``config.loss_chunk_tokens`` tokens
    at a time (``use_chunked_loss``; 0: transformers' whole-logits path).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per checkpoint write is noise in the log
    hf_config = hf_config_for(config.model, meta)
    if config.attention == "causal":
        _register_causal_attention()
        hf_config._attn_implementation = CAUSAL_ATTENTION
    else:
        hf_config._attn_implementation = config.attention
    model = GPTNeoXForCausalLM(hf_config)
    model.generation_config = generation_config_for(hf_config,
                                                    tokenizer_vocab(config.model, meta))
    return use_chunked_loss(model, config.loss_chunk_tokens)


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


def device_memory_gib(device: torch.device) -> float:
    """What training may fill: a CUDA device's total memory, elsewhere the host memory
    available now (the CPU trains in it; --per-device-train-batch-size auto's estimate)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return psutil.virtual_memory().available / 2**30


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's resident set on other devices."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30

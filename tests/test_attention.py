"""Pretraining attention is causal with no mask, eager and compiled (flash/cuDNN eligible on a
GPU), and computes exactly what transformers' default SDPA path computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM

from configs.model_config import hf_config_for
from configs.training_config import preset
from utils.torch_engine.model import build_model

META = {"vocab_size": 256}


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours, and the same weights under transformers' default attention."""
    torch.manual_seed(0)
    ours = build_model(preset("smoke"), META)
    stock = GPTNeoXForCausalLM(hf_config_for("tiny", META))
    stock.load_state_dict(ours.state_dict())
    return ours, stock


def _sdpa_calls(graphs: list) -> list[tuple[bool, bool]]:
    """(mask given, is_causal) of every SDPA call in the traced FX graphs."""
    return [(node.kwargs.get("attn_mask") is not None or len(node.args) > 3,
             bool(node.kwargs.get("is_causal")))
            for gm in graphs for node in gm.graph.nodes
            if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target)]


def _compiled_calls(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[bool, bool]]:
    """Trace the model with torch.compile (a backend that only records the graphs)."""
    graphs: list = []

    def record(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record)(input_ids=ids, use_cache=False)
    return _sdpa_calls(graphs)


def test_attention_is_causal_without_a_mask_eager_and_compiled(monkeypatch):
    ours, stock = _models()
    ids = torch.randint(0, 256, (2, 64))
    eager: list[tuple[bool, bool]] = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        eager.append((kwargs.get("attn_mask") is not None, bool(kwargs.get("is_causal"))))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ours(input_ids=ids, use_cache=False)
    monkeypatch.setattr(F, "scaled_dot_product_attention", real)
    layers = ours.config.num_hidden_layers
    assert eager == [(False, True)] * layers
    assert _compiled_calls(ours, ids) == [(False, True)] * layers
    # What this replaces: transformers' own path hands SDPA a dense mask under compile.
    assert all(masked for masked, _ in _compiled_calls(stock, ids))


def test_value_is_not_a_view_of_the_fused_qkv_output(monkeypatch):
    """transformers slices v out of the QKV projection; saved for backward as that view it
    would keep all of QKV alive. SDPA gets a value that owns its storage."""
    ours, _ = _models()
    held: list[tuple[int, int]] = []
    real = F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        held.append((value.untyped_storage().nbytes(), value.numel() * value.element_size()))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ours(input_ids=torch.randint(0, 256, (2, 32)), use_cache=False)
    assert len(held) == ours.config.num_hidden_layers
    assert all(storage == size for storage, size in held)


def test_causal_attention_matches_the_default_path_in_values_and_gradients():
    ours, stock = _models()
    ids = torch.randint(0, 256, (3, 48))
    ours_logits = ours(input_ids=ids, use_cache=False).logits
    stock_logits = stock(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(ours_logits, stock_logits, rtol=0, atol=1e-5)
    ours_logits.square().mean().backward()
    stock_logits.square().mean().backward()
    for (name, a), b in zip(ours.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_cached_decode_step_attends_to_every_earlier_token():
    """Decoding with a cache (one query, many keys) needs no causal flag; a few queries over
    more keys need the bottom-right-aligned mask: both equal the default path."""
    ours, stock = _models()
    ours.eval()
    stock.eval()
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        for split in (19, 16):
            outs = []
            for model in (ours, stock):
                past = model(input_ids=ids[:, :split], use_cache=True).past_key_values
                outs.append(model(input_ids=ids[:, split:], past_key_values=past,
                                  use_cache=True).logits)
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)

"""The model's vocabulary is the tokenizer's rounded up to a multiple of 128; the extra ids
round-trip through from_pretrained and MLX, and generation never picks them."""

from __future__ import annotations

import numpy as np
import torch
from transformers import GPTNeoXForCausalLM

from configs.model_config import hf_config_for, padded_vocab, padding_ids
from configs.training_config import preset
from utils.mlx_engine.model import load_pretrained
from utils.torch_engine.model import build_model

META = {"vocab_size": 300, "eos_token_id": 0, "bos_token_id": 0}


def test_vocab_rounds_up_to_a_multiple_of_128():
    assert [padded_vocab(n) for n in (50257, 2048, 300, 1)] == [50304, 2048, 384, 128]
    assert hf_config_for("neox-1.2b", None).vocab_size == 50304
    assert hf_config_for("tiny", META).vocab_size == 384
    assert padding_ids(300, 384) == list(range(300, 384))


def test_padded_model_round_trips_and_never_generates_a_padding_id(tmp_path):
    torch.manual_seed(0)
    model = build_model(preset("smoke", loss_chunk_tokens=0), META).eval()
    model.save_pretrained(tmp_path)
    loaded = GPTNeoXForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
        # Untrained, a padding id is ~22% of every sampled token; suppressed, none.
        out = loaded.generate(ids[:, :4], do_sample=True, max_new_tokens=200, min_new_tokens=200,
                              top_k=0, top_p=1.0, pad_token_id=0)
    assert out.shape[1] == 204 and int(out.max()) < 300
    mlx_model, _ = load_pretrained(tmp_path)
    import mlx.core as mx

    got = np.array(mlx_model(mx.array(ids.numpy())))
    assert got.shape[-1] == 384
    assert np.abs(got - expected.numpy()).max() < 1e-4

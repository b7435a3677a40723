"""GPT-NeoX sizes, mapped onto transformers' ``GPTNeoXConfig``.

Both backends read the ``config.json`` this produces: transformers through
``GPTNeoXConfig``, mlx-lm through its ``gpt_neox`` module, which hard-codes the
MLP at 4x hidden and tanh GELU and still reads ``rotary_pct``/``rotary_emb_base``
(transformers 5 writes ``rope_parameters`` instead), so every size keeps the MLP
at 4x and ``to_hf_config`` writes both spellings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: flag parsing stays fast (start_training.sh runs it)
    from transformers import GPTNeoXConfig

# Embedding and LM-head rows are padded to a multiple of this (50,257 -> 50,304, as Pythia
# did): tensor-core matmuls want dimensions divisible by 64/128. The extra ids are never in the
# data, so training pushes them down; generation suppresses them (see ``padding_ids``).
VOCAB_MULTIPLE = 128

# GPT-NeoX linear layers LoRA may adapt (peft's target names; each engine maps them).
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int = 50257  # the tokenizer's; the model's is padded_vocab() of it
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25
    rotary_emb_base: int = 10000

    @property
    def intermediate_size(self) -> int:
        return 4 * self.hidden_size


MODEL_SIZES: dict[str, ModelSize] = {
    # A few million parameters: trains usefully on a 2-core CPU in a minute.
    "tiny": ModelSize(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      max_position_embeddings=512),
    "small": ModelSize(hidden_size=512, num_hidden_layers=8, num_attention_heads=8),
    "neox-160m": ModelSize(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "neox-410m": ModelSize(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "neox-1.2b": ModelSize(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16),
}


def to_hf_config(
    size: ModelSize,
    vocab_size: int | None = None,
    bos_token_id: int = 0,
    eos_token_id: int = 0,
    pad_token_id: int | None = None,
) -> GPTNeoXConfig:
    """Build the transformers config; ``vocab_size`` (the tokenizer's) overrides the size's,
    and the model's is that padded to ``VOCAB_MULTIPLE``."""
    from transformers import GPTNeoXConfig

    config = GPTNeoXConfig(
        vocab_size=padded_vocab(vocab_size or size.vocab_size),
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=size.max_position_embeddings,
        rotary_pct=size.rotary_pct,
        rotary_emb_base=size.rotary_emb_base,
        hidden_act="gelu_new",
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_bias=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    # Kept as plain attributes so they land in config.json for mlx-lm.
    config.rotary_pct = size.rotary_pct
    config.rotary_emb_base = size.rotary_emb_base
    return config


def padded_vocab(tokens: int) -> int:
    """The model's vocabulary for a tokenizer of ``tokens`` ids: the next multiple of 128."""
    return -(-tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def padding_ids(tokens: int, model_vocab: int) -> list[int]:
    """The ids a model may score but no tokenizer id maps to: generation must never pick them."""
    return list(range(tokens, model_vocab))


def generation_config_for(hf_config: GPTNeoXConfig, tokens: int):
    """Generation defaults saved with every checkpoint (generation_config.json): the padding
    rows' ids are suppressed, so sampling never picks an id the tokenizer cannot decode."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=hf_config.bos_token_id,
                            eos_token_id=hf_config.eos_token_id,
                            pad_token_id=hf_config.pad_token_id,
                            suppress_tokens=padding_ids(tokens, hf_config.vocab_size) or None)


def tokenizer_vocab(model: str, meta: dict | None) -> int:
    """The tokenizer's vocabulary behind preset ``model`` and the data's ``dataset.json``."""
    return (meta or {}).get("vocab_size") or MODEL_SIZES[model].vocab_size


def hf_config_for(model: str, meta: dict | None) -> GPTNeoXConfig:
    """The config of preset ``model`` with the vocabulary and special ids of the data's tokenizer
    (``dataset.json``), as both backends build it."""
    meta = meta or {}
    return to_hf_config(MODEL_SIZES[model], vocab_size=tokenizer_vocab(model, meta),
                        bos_token_id=meta.get("bos_token_id", 0),
                        eos_token_id=meta.get("eos_token_id", 0),
                        pad_token_id=meta.get("pad_token_id"))


def count_parameters(config: GPTNeoXConfig | dict) -> tuple[int, int]:
    """Total parameters and those without the (untied) input and output embeddings.

    From the config alone, so both backends report the same numbers before any LoRA or
    quantization: per layer 12 h^2 (QKV, output, the 4x MLP) + 13 h (their biases, two
    LayerNorms), a final LayerNorm, and two V x h embeddings.
    """
    cfg = config if isinstance(config, dict) else config.to_dict()
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    non_embedding = layers * (12 * hidden * hidden + 13 * hidden) + 2 * hidden
    return non_embedding + 2 * cfg["vocab_size"] * hidden, non_embedding

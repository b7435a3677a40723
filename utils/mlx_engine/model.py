"""The MLX engine's model: mlx-lm's GPT-NeoX from our config, HF-named weights, AdamW.

Weights are saved and loaded under transformers' names (``model.h.0`` <-> ``gpt_neox.layers.0``)
so a checkpoint of either backend loads in the other.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.gpt_neox import Model, ModelArgs

from utils.errors import CheckpointError

_TANH_GELUS = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")
DTYPES = {"no": mx.float32, "bf16": mx.bfloat16}


# ------------------------------------------------------------------ model

def model_args(hf_config: dict) -> ModelArgs:
    """mlx-lm's arguments from a transformers GPT-NeoX config.json, or a one-line refusal.

    transformers 5 writes rotary settings under ``rope_parameters``; mlx-lm reads the old
    ``rotary_pct``/``rotary_emb_base``, so either spelling is accepted.
    """
    cfg = dict(hf_config)
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rotary_pct", rope.get("partial_rotary_factor"))
    cfg.setdefault("rotary_emb_base", rope.get("rope_theta"))
    problems = []
    if cfg.get("model_type") != "gpt_neox":
        problems.append(f"model_type is {cfg.get('model_type')!r}, not 'gpt_neox'")
    if cfg.get("rotary_pct") is None or cfg.get("rotary_emb_base") is None:
        problems.append("no rotary_pct/rotary_emb_base (or rope_parameters)")
    if cfg.get("hidden_act", "gelu_new") not in _TANH_GELUS:
        problems.append(f"hidden_act {cfg['hidden_act']!r} is not a tanh GELU")
    if cfg.get("intermediate_size", 4 * cfg.get("hidden_size", 0)) != 4 * cfg.get("hidden_size", 0):
        problems.append("intermediate_size is not 4 x hidden_size")
    if cfg.get("tie_word_embeddings"):
        problems.append("tied embeddings")
    if cfg.get("attention_bias") is False:
        problems.append("attention without biases")
    if problems:
        raise CheckpointError(f"mlx-lm's gpt_neox cannot run this config ({'; '.join(problems)}); "
                              "build it with configs.model_config.to_hf_config")
    return ModelArgs.from_dict(cfg)


def build_model(hf_config: dict, seed: int) -> Model:
    """Freshly initialised model, the way transformers initialises GPT-NeoX.

    Weights ~ N(0, initializer_range), biases 0, LayerNorms 1/0 (mlx's defaults are
    uniform fan-in inits, which would make the two backends' runs differ in kind).
    """
    model = Model(model_args(hf_config))
    std = float(hf_config.get("initializer_range", 0.02))
    key = mx.random.key(seed)
    fresh = []
    for name, param in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        if param.ndim >= 2:
            param = mx.random.normal(param.shape, param.dtype, key=sub) * std
        elif name.endswith(".bias"):
            param = mx.zeros_like(param)
        fresh.append((name, param))
    model.update(tree_unflatten(fresh))
    mx.eval(model.parameters())
    return model


def hf_name(name: str) -> str:
    """An MLX parameter name as transformers spells it (``model.h.0`` -> ``gpt_neox.layers.0``)."""
    name = name.removeprefix("model.")
    if name == "embed_out.weight":
        return name
    if name.startswith("h."):
        name = "layers." + name.removeprefix("h.")
    return "gpt_neox." + name


def hf_weights(params: dict) -> dict[str, mx.array]:
    """MLX parameter tree -> flat dict with transformers' names (the inverse of ``sanitize``)."""
    return {hf_name(name): value for name, value in tree_flatten(params)}


def load_weights(model: Model, weights: dict[str, mx.array], source: Path) -> None:
    """Load HF- or MLX-named weights strictly: a missing or extra key is an error, not a warning."""
    weights = model.sanitize(weights)
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or extra or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"shape of {wrong[0]} is {weights[wrong[0]].shape}, "
                       f"model has {expected[wrong[0]].shape}")
        raise CheckpointError(f"{source} does not match the model ({detail}): use the --model "
                              "that wrote it")
    model.update(tree_unflatten([(k, v.astype(expected[k].dtype)) for k, v in weights.items()]))
    mx.eval(model.parameters())


def load_full_weights(model: Model, directory: Path) -> None:
    """A checkpoint's model.safetensors into ``model`` (strictly, see ``load_weights``)."""
    load_weights(model, mx.load(str(directory / "model.safetensors")),
                 directory / "model.safetensors")


def save_pretrained(params: dict, hf_config, directory: Path) -> None:
    """config.json + model.safetensors that transformers and mlx-lm both load."""
    directory.mkdir(parents=True, exist_ok=True)
    hf_config.architectures = ["GPTNeoXForCausalLM"]
    hf_config.save_pretrained(directory)
    save_weights(params, directory)


def save_weights(params: dict, directory: Path) -> None:
    """model.safetensors with transformers' names, fp32 (what ``from_pretrained`` expects)."""
    weights = {k: v.astype(mx.float32) for k, v in hf_weights(params).items()}
    mx.save_safetensors(str(directory / "model.safetensors"), weights, metadata={"format": "pt"})


def load_pretrained(directory: Path) -> tuple[Model, dict]:
    """An MLX model from a checkpoint folder written by either backend, and its config dict."""
    try:
        hf_config = json.loads((directory / "config.json").read_text())
        weights = mx.load(str(directory / "model.safetensors"))
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read the model in {directory} ({err}); "
                              "point at a checkpoint folder") from None
    model = Model(model_args(hf_config))
    load_weights(model, weights, directory / "model.safetensors")
    return model, hf_config


# ------------------------------------------------------------------ optimizer

class DecayMaskedAdamW(optim.AdamW):
    """AdamW whose weight decay skips vectors (biases, LayerNorms), like ``utils.optim`` in torch.

    A mask, not two optimizers: ``MultiOptimizer`` merges its groups' results through a Python
    ``set`` of keys, so the parameter order - and with it the float summation order of the
    global gradient norm - changes with ``PYTHONHASHSEED`` from one process to the next,
    which breaks bit-exact resume. One optimizer also keeps one step counter and one state.
    """

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        if parameter.ndim < 2:
            return optim.Adam.apply_single(self, gradient, parameter, state)
        return super().apply_single(gradient, parameter, state)


def build_optimizer(lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> DecayMaskedAdamW:
    """AdamW with torch's bias correction (MLX's default leaves it off)."""
    return DecayMaskedAdamW(lr, betas=list(betas), eps=eps, weight_decay=weight_decay,
                            bias_correction=True)

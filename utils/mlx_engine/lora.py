"""LoRA on MLX in peft's file format, so an adapter trained on either backend loads in both.

mlx-lm's ``LoRALinear`` computes ``W x + scale * (x A) B`` with A ``(in, r)`` and B ``(r, out)``;
peft computes ``W x + (alpha / r) * B' A' x`` with ``lora_A.weight`` ``(r, in)`` and
``lora_B.weight`` ``(out, r)``. So A' = A.T, B' = B.T and scale = alpha / r, and an MLX adapter
is written as ``adapter_config.json`` + ``adapter_model.safetensors`` with peft's key names
(``base_model.model.gpt_neox.layers.0.attention.query_key_value.lora_A.weight``):
``PeftModel.from_pretrained`` loads it as is, and ``load_adapter`` here reads peft's.

A quantized base (QLoRA) keeps its linear layers 4- or 8-bit (``nn.quantize``); the adapters
stay fp32 and are saved the same way, so they also load onto the unquantized base in torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.gpt_neox import Model
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.utils import linear_to_lora_layers

from utils.checkpoint.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from utils.errors import CheckpointError
from utils.fs import staged_dir
from utils.mlx_engine.model import hf_name, load_pretrained, save_weights
from utils.stages.init_from import adapter_base, check_base
from utils.stages.tokenizers import copy_tokenizer, resolve_tokenizer

# peft's target names for GPT-NeoX (configs.model_config.LORA_TARGETS) -> mlx-lm's paths.
MLX_KEYS = {"query_key_value": "attention.query_key_value", "dense": "attention.dense",
            "dense_h_to_4h": "mlp.dense_h_to_4h", "dense_4h_to_h": "mlp.dense_4h_to_h"}
GROUP_SIZE = 64
_PEFT_PREFIX = "base_model.model."
_PEFT_SUFFIX = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}


def apply_lora(model: Model, r: int, alpha: float, dropout: float, targets: list[str]) -> None:
    """Freeze the model and put LoRA on ``targets`` of every block (peft's default: all)."""
    model.freeze()
    linear_to_lora_layers(model, len(model.layers),
                          {"rank": r, "scale": alpha / r, "dropout": dropout,
                           "keys": [MLX_KEYS[t] for t in targets]})


def quantize_base(model: Model, bits: int) -> None:
    """4- or 8-bit linear layers (QLoRA's frozen base); layers whose width does not split into
    groups of ``GROUP_SIZE`` stay in full precision."""
    nn.quantize(model, group_size=GROUP_SIZE, bits=bits,
                class_predicate=lambda _, m: (isinstance(m, nn.Linear)
                                              and m.weight.shape[-1] % GROUP_SIZE == 0))


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model alone (DPO's reference), without a second copy of its weights."""
    layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    scales = [m.scale for m in layers]
    for m in layers:
        m.scale = 0.0
    try:
        yield
    finally:
        for m, scale in zip(layers, scales, strict=True):
            m.scale = scale


def peft_key(mlx_name: str) -> str:
    """``model.h.0.attention.dense.lora_a`` -> ``base_model.model.gpt_neox...lora_A.weight``."""
    module, kind = mlx_name.rsplit(".", 1)
    return f"{_PEFT_PREFIX}{hf_name(module + '.weight').removesuffix('.weight')}." \
           f"{_PEFT_SUFFIX[kind]}"


def peft_weights(params: dict) -> dict[str, mx.array]:
    """Trainable LoRA parameters (MLX tree) -> peft's names and layout, fp32."""
    return {peft_key(name): value.T.astype(mx.float32) for name, value in tree_flatten(params)}


def save_adapter(params: dict, directory: Path, *, r: int, alpha: float, dropout: float,
                 targets: list[str], base: Path) -> None:
    """adapter_config.json + adapter_model.safetensors as peft writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
              "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none",
              "base_model_name_or_path": str(base), "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(directory / ADAPTER_WEIGHTS), peft_weights(params),
                        metadata={"format": "pt"})


def read_adapter_config(directory: Path) -> dict:
    """r, alpha, dropout and targets of a peft LoRA adapter; one line for what MLX cannot run."""
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: unreadable ({err}); use another "
                              f"checkpoint") from None
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    unsupported = [t for t in targets if t not in MLX_KEYS]
    problems = [f"target modules {unsupported}" if unsupported else "",
                "use_rslora" if config.get("use_rslora") else "",
                "use_dora" if config.get("use_dora") else "",
                "layers_to_transform" if config.get("layers_to_transform") else "",
                "rank_pattern/alpha_pattern" if config.get("rank_pattern")
                or config.get("alpha_pattern") else ""]
    problems = [p for p in problems if p]
    if config.get("peft_type", "LORA") != "LORA" or problems:
        raise CheckpointError(f"{directory}: this adapter uses {', '.join(problems) or 'a '}"
                              f"{'' if problems else config.get('peft_type')}, which the MLX "
                              f"backend does not support; train it with plain LoRA on "
                              f"{','.join(MLX_KEYS)}")
    return {"r": int(config["r"]), "alpha": float(config["lora_alpha"]),
            "dropout": float(config.get("lora_dropout", 0.0)), "targets": targets}


def load_adapter(model: Model, directory: Path) -> None:
    """Load a peft-format adapter (written by torch or MLX) into a LoRA model, strictly."""
    path = directory / ADAPTER_WEIGHTS
    try:
        saved = mx.load(str(path))
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read {path} ({err}); use another checkpoint") from None
    names = {peft_key(name): name for name, _ in tree_flatten(model.trainable_parameters())}
    missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
    if missing or extra:
        raise CheckpointError(f"{path}: adapters do not match this model ({len(missing)} missing, "
                              f"{len(extra)} unexpected, e.g. {(missing + extra)[0]}); use the "
                              f"same --lora-target-modules as the run that wrote it")
    current = dict(tree_flatten(model.trainable_parameters()))
    update = []
    for key, name in names.items():
        value = saved[key].T
        if value.shape != current[name].shape:
            raise CheckpointError(f"{path}: {key} has shape {saved[key].shape}, this model needs "
                                  f"{current[name].T.shape}; use the same --lora-r as its run")
        update.append((name, value.astype(current[name].dtype)))
    model.update(tree_unflatten(update))
    mx.eval(model.parameters())


def fuse(model: Model) -> None:
    """Fold every LoRA layer into its base weight (plain Linear layers again)."""
    fused = [(name, m.fuse(dequantize=True)) for name, m in model.named_modules()
             if isinstance(m, LoRALinear)]
    model.update_modules(tree_unflatten(fused))


def load_base(path: Path) -> tuple[Model, dict]:
    """An MLX model for ``--init-from``: a full checkpoint, or a LoRA one fused onto its base.

    Returns the model and the ``config.json`` of the full model underneath.
    """
    check_base(path)
    if not (path / ADAPTER_CONFIG).is_file():
        return load_pretrained(path)
    model, hf_config = load_base(adapter_base(path))
    lora = read_adapter_config(path)
    apply_lora(model, lora["r"], lora["alpha"], 0.0, lora["targets"])
    load_adapter(model, path)
    fuse(model)
    model.unfreeze()
    return model, hf_config


def merge_adapter(ckpt_dir: Path, out_dir: Path) -> Path:
    """Base + adapters as a plain Hugging Face folder with its tokenizer, fp32.

    Built from the full-precision base on disk, so a QLoRA run merges without quantization
    error in the base. Written under a hidden name and renamed into place.
    """
    model, hf_config = load_base(ckpt_dir)
    with staged_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        save_weights(model.parameters(), tmp)
        copy_tokenizer(resolve_tokenizer(ckpt_dir), tmp)
    return out_dir

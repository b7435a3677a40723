"""MLX side of the harness: mlx-lm's GPT-NeoX from our config, HF-named checkpoints, optimizer.

The checkpoint layout is the torch loop's (``utils/checkpoint.py``) so one folder serves both:

    config.json, model.safetensors  -> HF key names, fp32: ``GPTNeoXForCausalLM.from_pretrained``
                                       and ``mlx_lm.utils.load_model`` both load it as is
    optimizer.safetensors           -> the flattened MLX optimizer state (torch: optimizer.pt)
    trainer_state.json              -> step, data position, tokens seen, config, backend
    COMPLETE.json                   -> written last by ``utils.checkpoint.write_manifest``

LoRA stages write adapter_config.json + adapter_model.safetensors in peft's format instead of
the model (``utils/mlx_lora.py``).

No scheduler file: the learning rate is a pure function of the step (``lr_factor``). No RNG
file: the data order depends only on seed and epoch, and LoRA dropout draws from a key seeded
by (seed, step, micro-batch), so a resumed run repeats the same masks.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.gpt_neox import Model, ModelArgs

from utils.checkpoint import CheckpointError, TrainState, checkpoint_name, verify
from utils.data_utils import DataError

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
"""Debian's ``libopenblas0-pthread``: 3-8x faster MLX matmuls than the Linux wheel's own BLAS."""
OPENBLAS_OPT_OUT = "HARNESS_MLX_OPENBLAS"  # set to 0 to keep the wheel's reference BLAS
_TANH_GELUS = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")
DTYPES = {"no": mx.float32, "bf16": mx.bfloat16}


def openblas_preload() -> dict[str, str]:
    """``{"LD_PRELOAD": ...}`` putting OpenBLAS first, or ``{}`` (missing, opted out, loaded).

    Merge it into the environment of MLX processes only; torch brings its own BLAS.
    """
    preload = os.environ.get("LD_PRELOAD", "")
    if (sys.platform != "linux" or not OPENBLAS.is_file()
            or os.environ.get(OPENBLAS_OPT_OUT) == "0" or str(OPENBLAS) in preload.split(":")):
        return {}
    return {"LD_PRELOAD": f"{OPENBLAS}:{preload}" if preload else str(OPENBLAS)}


def reexec_with_openblas() -> None:
    """Restart this very process (same pid, same argv) with OpenBLAS preloaded, if it helps.

    LD_PRELOAD only works at process start, so a CLI calls this first thing; a no-op when
    OpenBLAS is missing, already loaded, or opted out.
    """
    preload = openblas_preload()
    if preload:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **preload})


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


def save_optimizer(optimizer: optim.Optimizer, path: Path) -> None:
    """The flattened state (moments, step, learning rate) as safetensors: no pickles."""
    mx.save_safetensors(str(path), dict(tree_flatten(optimizer.state)),
                        metadata={"format": "mlx"})


def restore_optimizer(optimizer: optim.Optimizer, params: dict, state: dict,
                      source: Path) -> None:
    """Put a saved optimizer state in place after checking its layout against ``params``."""
    optimizer.init(params)
    expected = {k: v.shape for k, v in tree_flatten(optimizer.state)}
    got = {k: v.shape for k, v in tree_flatten(state)}
    if got != expected:
        diff = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise CheckpointError(f"{source} does not match this model and optimizer (first "
                              f"difference: {diff[0]}): resume with the --model that wrote it")
    optimizer.state = state
    optimizer.init(params)  # marks the restored state initialised; keeps its values


def torch_optimizer_state(ckpt_dir: Path, hf_config: dict) -> dict:
    """The MLX optimizer state equivalent to a torch checkpoint's ``optimizer.pt``.

    torch numbers parameters by position in ``utils.optim.param_groups`` over the model's
    parameters; rebuilding that model on the meta device (no memory) recovers the names.
    """
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from utils.optim import param_groups

    with torch.device("meta"):
        meta_model = GPTNeoXForCausalLM(GPTNeoXConfig.from_dict(hf_config))
    names = {id(p): n for n, p in meta_model.named_parameters()}
    saved = torch.load(ckpt_dir / "optimizer.pt", weights_only=True)
    groups = [[names[id(p)] for p in g["params"]] for g in param_groups(meta_model, 0.0)]
    if [len(g) for g in groups] != [len(g["params"]) for g in saved["param_groups"]]:
        raise CheckpointError(f"{ckpt_dir}/optimizer.pt does not match the model's parameter "
                              "groups: resume with the --model that wrote it")
    rename = {hf_name(k): k for k, _ in tree_flatten(Model(model_args(hf_config)).parameters())}
    rename["lm_head.weight"] = rename["embed_out.weight"]  # transformers 5's in-memory name
    moments = []
    for torch_group, names_in_group in zip(saved["param_groups"], groups, strict=True):
        for index, name in zip(torch_group["params"], names_in_group, strict=True):
            entry = saved["state"][index]
            moments.append((f"{rename[name]}.m", _to_mx(entry["exp_avg"])))
            moments.append((f"{rename[name]}.v", _to_mx(entry["exp_avg_sq"])))
    step = int(next(iter(saved["state"].values()))["step"])
    return {**tree_unflatten(moments), "step": mx.array(step, mx.uint64),
            "learning_rate": mx.array(float(saved["param_groups"][0]["lr"]))}


def _to_mx(tensor) -> mx.array:
    return mx.array(tensor.float().numpy())


# ------------------------------------------------------------------ checkpoints

def save_checkpoint(write_weights: Callable[[Path], None], optimizer: optim.Optimizer,
                    state: TrainState, config_dict: dict, root: Path) -> Path:
    """Write the checkpoint under a temporary name, then rename it; the marker comes later.

    ``write_weights(folder)`` writes the model (config.json + model.safetensors) or the LoRA
    adapters (peft's two files); ``utils.checkpoint.write_manifest`` (run by the publisher)
    marks the checkpoint complete.
    """
    name = checkpoint_name(state)
    final, tmp = root / name, root / f".tmp-{name}"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-checkpoint-*"):  # writes cut short by a crash
        shutil.rmtree(stale, ignore_errors=True)
    write_weights(tmp)
    save_optimizer(optimizer, tmp / "optimizer.safetensors")
    trainer_state = {"state": state.to_dict(), "epoch": state.position.epoch,
                     "config": config_dict, "backend": "mlx"}
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    if final.exists():  # an earlier attempt at this step (resumed from an older one)
        shutil.rmtree(final)
    tmp.replace(final)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def load_checkpoint(model: Model, optimizer: optim.Optimizer, ckpt_dir: Path,
                    read_weights: Callable[[Path], None] | None = None) -> tuple[dict, TrainState]:
    """Restore weights and optimizer state (MLX's, or converted from torch's); return both.

    ``read_weights`` loads the checkpoint's weights into ``model`` (default: the full model;
    LoRA stages pass their adapter loader). Returns the fp32 trainable parameter tree and the
    saved TrainState.
    """
    problem = verify(ckpt_dir, hashes=True)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt_dir} is not usable: {problem}; "
                              f"resume from another one (--resume latest skips it)")
    try:
        (read_weights or partial(load_full_weights, model))(ckpt_dir)
        params = model.trainable_parameters()
        if (ckpt_dir / "optimizer.safetensors").is_file():
            source = ckpt_dir / "optimizer.safetensors"
            state = tree_unflatten(list(mx.load(str(source)).items()))
        elif (ckpt_dir / "model.safetensors").is_file():  # torch's full model: convert
            source = ckpt_dir / "optimizer.pt"  # (utils.checkpoint requires one of the two)
            state = torch_optimizer_state(ckpt_dir,
                                          json.loads((ckpt_dir / "config.json").read_text()))
        else:
            raise CheckpointError(f"{ckpt_dir} is a torch LoRA checkpoint: resume it with "
                                  f"--backend torch, or start an MLX run on it with "
                                  f"--init-from {ckpt_dir}")
        restore_optimizer(optimizer, params, state, source)
        saved = json.loads((ckpt_dir / "trainer_state.json").read_text())
        return params, TrainState.from_dict(saved["state"])
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError,
            DataError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {ckpt_dir} could not be loaded ({first[:200]}); "
                              f"resume with the same --model as the run that wrote it, or "
                              f"from another checkpoint") from None

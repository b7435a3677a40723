"""MLX's side of the checkpoint format: weights through the task, optimizer as safetensors.

The folder layout and the manifest-last rule are ``utils/checkpoint``'s, so one folder serves
both backends:

    config.json, model.safetensors  -> HF key names, fp32: ``GPTNeoXForCausalLM.from_pretrained``
                                       and ``mlx_lm.utils.load_model`` both load it as is
    optimizer.safetensors           -> the flattened MLX optimizer state (torch: optimizer.pt)
    trainer_state.json              -> step, data position, tokens seen, config, backend

No scheduler file: the learning rate is a pure function of the step (``lr_factor``). No RNG
file: the data order depends only on seed and epoch, and LoRA dropout draws from a key seeded
by (seed, step, micro-batch), so a resumed run repeats the same masks. A torch checkpoint's
optimizer.pt is converted on load (the one place this engine imports torch, lazily).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.gpt_neox import Model

from utils.checkpoint import TrainState, checkpoint_name, verify
from utils.checkpoint.format import read_trainer_state, write_trainer_state
from utils.errors import CheckpointError, DataError, first_line
from utils.fs import remove_stale_tmp, staged_dir
from utils.mlx_engine.model import hf_name, load_full_weights, model_args


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

    torch numbers parameters by position in its decay groups over the model's
    parameters; rebuilding that model on the meta device (no memory) recovers the names.
    """
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    with torch.device("meta"):
        meta_model = GPTNeoXForCausalLM(GPTNeoXConfig.from_dict(hf_config))
    names = {id(p): n for n, p in meta_model.named_parameters()}
    saved = torch.load(ckpt_dir / "optimizer.pt", weights_only=True)
    # torch's decay groups (utils/torch_engine/optim.py): matrices, then vectors.
    params = list(meta_model.parameters())
    groups = [[names[id(p)] for p in params if p.ndim >= 2], [names[id(p)] for p in params
                                                              if p.ndim < 2]]
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


@dataclass(frozen=True)
class WrittenSnapshot:
    """A checkpoint MLX has already written (see ``MlxEngine.snapshot`` for why)."""

    path: Path

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    def write(self) -> Path:
        return self.path


def save_checkpoint(write_weights: Callable[[Path], None], optimizer: optim.Optimizer,
                    state: TrainState, config_dict: dict, root: Path) -> Path:
    """Write the checkpoint under a temporary name, then rename it; the marker comes later.

    ``write_weights(folder)`` writes the model (config.json + model.safetensors) or the LoRA
    adapters (peft's two files); ``utils.checkpoint.write_manifest`` (run by the publisher)
    marks the checkpoint complete.
    """
    final = root / checkpoint_name(state)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(root, "checkpoint-*")  # writes cut short by a crash
    # Replaces an earlier attempt at this step (a run resumed from an older checkpoint).
    with staged_dir(final) as tmp:
        write_weights(tmp)
        save_optimizer(optimizer, tmp / "optimizer.safetensors")
        write_trainer_state(tmp, state, config_dict, backend="mlx")
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
        return params, read_trainer_state(ckpt_dir)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError,
            DataError) as err:
        raise CheckpointError(f"checkpoint {ckpt_dir} could not be loaded ({first_line(err)}); "
                              f"resume with the same --model as the run that wrote it, or "
                              f"from another checkpoint") from None

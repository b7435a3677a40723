"""torch's side of the checkpoint format: weights, optimizer, scheduler, scaler and RNG states.

The folder layout and the manifest-last rule are ``utils/checkpoint``'s; this module writes
and reads the torch files (``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``,
``rng_state_{rank}.pt``) and never unpickles code: safetensors for weights,
``torch.load(weights_only=True)`` for the rest, JSON for metadata.
"""

from __future__ import annotations

import copy
import pickle
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.checkpoint import TrainState, checkpoint_name, verify
from utils.checkpoint.format import read_trainer_state, write_trainer_state
from utils.errors import CheckpointError, DataError, first_line
from utils.fs import remove_stale_tmp, staged_dir
from utils.torch_engine.lora import ADAPTER_WEIGHTS, load_adapter_weights


class HostStaging:
    """Host buffers a snapshot copies the training state into, kept from save to save.

    On CUDA they are pinned, so the copies run at full PCIe speed without blocking the GPU's
    queue, and allocating (slow, for gigabytes of pinned memory) happens at the first save
    only (torchtitan's ``async_with_pinned_mem`` does the same). Reuse is safe because the loop
    never takes a snapshot while the previous one is still being written.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def copy(self, tree: Any, keep_cpu: bool, path: tuple = ()) -> Any:
        """``tree`` with every tensor copied to host memory. ``keep_cpu``: CPU tensors are
        already private copies (FSDP2's gather), so they are kept as they are."""
        if isinstance(tree, dict):
            return {k: self.copy(v, keep_cpu, (*path, k)) for k, v in tree.items()}
        if isinstance(tree, (list, tuple)):
            return type(tree)(self.copy(v, keep_cpu, (*path, i)) for i, v in enumerate(tree))
        if not isinstance(tree, torch.Tensor) or (keep_cpu and tree.device.type == "cpu"):
            return tree
        buffer = self.buffers.get(path)
        if buffer is None or buffer.shape != tree.shape or buffer.dtype != tree.dtype:
            buffer = torch.empty(tree.shape, dtype=tree.dtype, device="cpu",
                                 pin_memory=tree.device.type == "cuda")
            self.buffers[path] = buffer
        return buffer.copy_(tree.detach(), non_blocking=True)


@dataclass
class Snapshot:
    """Everything a torch checkpoint holds, in host memory: written while training goes on."""

    state: TrainState
    config_dict: dict
    root: Path
    weights: dict
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    rng: list[dict]
    save_pretrained: Callable[..., Any]  # the unwrapped model's (config.json, safetensors)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors((self.weights, self.optimizer)))

    def write(self) -> Path:
        """The checkpoint folder, written under a temporary name and renamed into place.

        The marker is NOT written here but by ``write_manifest`` (in the background
        publisher), after the tokenizer is copied in."""
        final = self.root / checkpoint_name(self.state)
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(self.root, "checkpoint-*")  # writes cut short by a crash
        # Replaces an earlier attempt at this step (a run resumed from an older checkpoint).
        with staged_dir(final) as tmp:
            for rank, rng in enumerate(self.rng):
                torch.save(rng, tmp / f"rng_state_{rank}.pt")
            self.save_pretrained(tmp, state_dict=self.weights, safe_serialization=True)
            torch.save(self.optimizer, tmp / "optimizer.pt")
            torch.save(self.scheduler, tmp / "scheduler.pt")
            if self.scaler is not None:
                torch.save(self.scaler, tmp / "scaler.pt")
            write_trainer_state(tmp, self.state, self.config_dict, backend="torch")
        return final


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, torch.Tensor):
        yield tree


def take_snapshot(accelerator, model, optimizer, scheduler, state: TrainState,
                  config_dict: dict, root: Path, staging: HostStaging) -> Snapshot | None:
    """Copy the whole training state into host memory: a save's only blocking part.

    Collective (every rank calls it): the RNG states and, under FSDP, the full model and
    optimizer states are gathered to the main process, the only one that writes (so other
    machines need no shared disk); it gets the Snapshot, the others None.
    """
    rng_states = _all_ranks(_rng_state(), accelerator.num_processes)
    state_dict, optim_state = _full_states(accelerator, model, optimizer)
    if not accelerator.is_main_process:
        return None
    keep_cpu = _is_fsdp2(accelerator.unwrap_model(model))
    snapshot = Snapshot(
        copy.deepcopy(state), copy.deepcopy(config_dict), root,
        staging.copy(state_dict, keep_cpu, ("model",)),
        staging.copy(optim_state, keep_cpu, ("optimizer",)),
        copy.deepcopy(scheduler.state_dict()),
        copy.deepcopy(accelerator.scaler.state_dict()) if accelerator.scaler else None,
        rng_states, accelerator.unwrap_model(model).save_pretrained)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies have landed
    return snapshot


def save_checkpoint(accelerator, model, optimizer, scheduler, state: TrainState,
                    config_dict: dict, root: Path) -> Path:
    """Snapshot and write at once (collectively, every rank calls this); the final path."""
    snapshot = take_snapshot(accelerator, model, optimizer, scheduler, state, config_dict, root,
                             HostStaging())
    path = snapshot.write() if snapshot else root / checkpoint_name(state)
    accelerator.wait_for_everyone()
    return path


def _all_ranks(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj``, in rank order (a small all-gather; just [obj] for one process)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _is_fsdp2(model) -> bool:
    """Parameters sharded by torch's fully_shard (FSDP2), whether or not accelerate did it."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or isinstance(getattr(model, "_orig_mod", None),
                                                       FSDPModule)


def _full_states(accelerator, model, optimizer) -> tuple[dict, dict]:
    """The whole model and optimizer state on the main process (collective under FSDP2).

    FSDP2 gives rank 0 full tensors on the CPU; its optimizer state is keyed by parameter
    name (torch.distributed.checkpoint's full format), every other layout by index.
    """
    if not _is_fsdp2(accelerator.unwrap_model(model)):
        return accelerator.get_state_dict(model), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    unwrapped = accelerator.unwrap_model(model)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return (get_model_state_dict(unwrapped, options=options),
            get_optimizer_state_dict(unwrapped, inner, options=options))


def _rng_state() -> dict:
    """This rank's RNGs as tensors and plain lists, so weights_only loading accepts them."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- load

def _load_tensors(path: Path) -> Any:
    """torch.load that never runs pickled code: anything but tensors and containers is refused."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {path}: it holds more than tensors ({first_line(err, 160)}); a "
            f"checkpoint file was replaced, so do not use it; resume from another one") from None


def load_checkpoint(accelerator, model, optimizer, scheduler, ckpt_dir: Path) -> TrainState:
    """Restore weights, optimizer, scheduler, scaler and RNG; return the saved TrainState.

    Nothing here unpickles code: safetensors for weights, ``weights_only=True`` for
    the rest, JSON for metadata.
    """
    problem = verify(ckpt_dir, hashes=True)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt_dir} is not usable: {problem}; "
                              f"resume from another one (--resume latest skips it)")
    try:
        return _load(accelerator, model, optimizer, scheduler, ckpt_dir)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, DataError) as err:
        raise CheckpointError(f"checkpoint {ckpt_dir} could not be loaded ({first_line(err)}); "
                              f"resume with the same --model and settings as the run that "
                              f"wrote it, or from another checkpoint") from None


def _load(accelerator, model, optimizer, scheduler, ckpt_dir: Path) -> TrainState:
    if not (ckpt_dir / "optimizer.pt").is_file():  # the manifest has MLX's instead
        raise CheckpointError(f"checkpoint {ckpt_dir} was written by the MLX backend (its "
                              f"optimizer state is optimizer.safetensors): resume it with "
                              f"--backend mlx, or resume torch from a torch checkpoint")
    unwrapped = accelerator.unwrap_model(model)
    if _is_fsdp2(unwrapped):
        _load_sharded(accelerator, unwrapped, optimizer, ckpt_dir)
    else:
        if (ckpt_dir / ADAPTER_WEIGHTS).is_file() or hasattr(unwrapped, "peft_config"):
            load_adapter_weights(unwrapped, ckpt_dir)
        else:
            unwrapped.load_state_dict(_saved_weights(unwrapped, ckpt_dir))
        optimizer.load_state_dict(_load_tensors(ckpt_dir / "optimizer.pt"))
    scheduler.load_state_dict(_load_tensors(ckpt_dir / "scheduler.pt"))
    if accelerator.scaler is not None and (ckpt_dir / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(_load_tensors(ckpt_dir / "scaler.pt"))
    rank_file = ckpt_dir / f"rng_state_{accelerator.process_index}.pt"
    if rank_file.exists():  # absent for ranks the saving run did not have: they keep the seed
        _set_rng_state(_load_tensors(rank_file))
    return read_trainer_state(ckpt_dir)


def _saved_weights(unwrapped, ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under this model's parameter names.

    from_pretrained applies transformers' own key conversions (embed_out <-> lm_head);
    use_safetensors: a pickled pytorch_model.bin is never considered.
    """
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32,
                                                 use_safetensors=True)
    weights = saved.state_dict()
    expected = set(unwrapped.state_dict())
    if set(weights) != expected:
        odd = sorted(set(weights) ^ expected)
        raise CheckpointError(f"checkpoint {ckpt_dir} does not match the model ({len(odd)} "
                              f"mismatched names, e.g. {odd[0]}): resume with the same --model "
                              f"as the run that wrote it")
    return weights


def _load_sharded(accelerator, unwrapped, optimizer, ckpt_dir: Path) -> None:
    """FSDP2: the main process reads the full states and broadcasts; each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    main = accelerator.is_main_process
    set_model_state_dict(unwrapped, _saved_weights(unwrapped, ckpt_dir) if main else {},
                         options=options)
    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(unwrapped, inner,
                             _load_tensors(ckpt_dir / "optimizer.pt") if main else {},
                             options=options)

"""Checkpoints: Hugging Face weights + training state, counted only once complete.

Layout of ``checkpoint-epoch{E}-step{S}-files{F}/``::

    config.json, model.safetensors   -> GPTNeoXForCausalLM.from_pretrained(dir) loads it as is
    (LoRA stages: adapter_config.json, adapter_model.safetensors -> peft loads it onto its base)
    optimizer.pt, scheduler.pt       -> torch.load(weights_only=True): tensors and numbers only
                                        (FSDP2: the whole optimizer state, keyed by parameter name)
    scaler.pt (fp16 only)
    rng_state_{rank}.pt              -> every rank's python, numpy, torch and CUDA RNG states
                                        (gathered: only the main process writes, no shared disk)
    trainer_state.json               -> step, epoch, data position, tokens seen, config
    COMPLETE.json                    -> manifest (name, size, crc32c of every file), written LAST

A directory without a valid ``COMPLETE.json`` never counts: ``find_complete`` skips it, so a
crash at any moment leaves at worst an ignored directory. The same marker-last rule holds in
the bucket (see ``utils/uploader.py``), and resuming re-checks every checksum, so a checkpoint
corrupted after it was written is skipped rather than loaded.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.data_utils import DataError, DataPosition
from utils.storage import StorageError, Store, file_crc32c, sync_down

MARKER = "COMPLETE.json"
_NAME = re.compile(r"^checkpoint-epoch(\d+)-step(\d+)-files(\d+)$")
_TMP_PREFIX = ".tmp-"
# What a checkpoint must hold to be loadable: the training state, an optimizer state (torch's
# or MLX's, utils/mlx_model.py), and weights with their config: a model (one file or an index
# of shards) or LoRA adapters (utils/finetune.py).
REQUIRED = ("trainer_state.json",)
OPTIMIZERS = ("optimizer.pt", "optimizer.safetensors")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; str() names it and says what to do."""


@dataclass
class TrainState:
    """Everything besides tensors that a resume needs to continue exactly."""

    step: int = 0
    tokens_seen: int = 0
    num_files: int = 0
    train_windows: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    world_size: int = 1
    global_batch_windows: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["position"] = self.position.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        data = dict(data)
        data["position"] = DataPosition.from_dict(data["position"])
        return cls(**data)


def checkpoint_name(state: TrainState) -> str:
    return f"checkpoint-epoch{state.position.epoch}-step{state.step}-files{state.num_files}"


def step_of(name: str) -> int | None:
    match = _NAME.match(name)
    return int(match.group(2)) if match else None


def _by_step(name: str) -> tuple[int, str]:
    return step_of(name) or 0, name


# ---------------------------------------------------------------- manifest

def write_manifest(ckpt_dir: Path) -> None:
    """Hash and fsync every file, then write the marker atomically: the checkpoint now counts.

    Hidden files (a leftover ``.COMPLETE.json.tmp``, a sync cache) are not part of it: stores
    never list them, so a manifest naming one could never be verified remotely.
    """
    files = {}
    for path in sorted(ckpt_dir.rglob("*")):
        rel = path.relative_to(ckpt_dir).as_posix()
        if not path.is_file() or rel == MARKER or any(p.startswith(".") for p in rel.split("/")):
            continue
        with path.open("rb") as f:
            os.fsync(f.fileno())
        files[rel] = {"size": path.stat().st_size, "crc32c": file_crc32c(path)}
    tmp = ckpt_dir / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"files": files, "created": time.time()}, indent=1))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(ckpt_dir / MARKER)
    _fsync_dir(ckpt_dir)


def _manifest(ckpt_dir: Path) -> dict[str, dict[str, Any]] | str:
    """The marker's {name: {size, crc32c}}, or the reason there is no usable one."""
    try:
        files = json.loads((ckpt_dir / MARKER).read_text())["files"]
        checked = {str(name): {"size": int(info["size"]), "crc32c": str(info["crc32c"])}
                   for name, info in files.items()}
    except FileNotFoundError:
        return "no completion marker"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable marker ({err!r})"
    for name in checked:
        if name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")):
            return f"the marker names an unsafe path {name!r}"
    missing = [n for n in REQUIRED if n not in checked]
    if not any(o in checked for o in OPTIMIZERS):
        missing.append(OPTIMIZERS[0])
    if ADAPTER_WEIGHTS in checked:
        missing += [n for n in ("adapter_config.json",) if n not in checked]
    elif any(w in checked for w in WEIGHTS):
        missing += [n for n in ("config.json",) if n not in checked]
    else:
        missing.append(f"{WEIGHTS[0]} (or {ADAPTER_WEIGHTS})")
    if missing:
        return f"the marker lacks {', '.join(missing)}"
    return checked


def read_manifest(ckpt_dir: Path) -> dict[str, dict[str, Any]]:
    """The marker's {name: {size, crc32c}}; CheckpointError if it is missing or malformed."""
    files = _manifest(ckpt_dir)
    if isinstance(files, str):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {files}; it does not count")
    return files


def verify(ckpt_dir: Path, hashes: bool = False) -> str | None:
    """None if the checkpoint is complete, else the reason it is not.

    Sizes alone catch every crash (files are final before the marker exists); ``hashes``
    also catches later corruption and is what resuming uses.
    """
    files = _manifest(ckpt_dir)
    if isinstance(files, str):
        return files
    for name, info in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != info["size"]:
            return f"{name} has {size} bytes, the marker says {info['size']} (truncated?)"
        if hashes and file_crc32c(path) != info["crc32c"]:
            return f"{name} fails its crc32c checksum (corrupted)"
    return None


def find_complete(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (sizes checked), oldest first (by step)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None
             and verify(p) is None]
    return sorted(found, key=lambda p: _by_step(p.name))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- save

def save_checkpoint(accelerator, model, optimizer, scheduler, state: TrainState,
                    config_dict: dict, root: Path) -> Path:
    """Write a checkpoint (collectively, every rank calls this) and return its final path.

    The directory is written under a temporary name and renamed into place; the
    marker is NOT written here but by ``write_manifest`` (in the background
    uploader, or inline), so the blocking cost is the local write alone.
    """
    name = checkpoint_name(state)
    final = root / name
    tmp = root / f"{_TMP_PREFIX}{name}"
    # Collectives first (every rank): RNG states and full (gathered) model/optimizer states.
    # Only the main process writes, so other machines need no shared disk.
    rng_states = _all_ranks(_rng_state(), accelerator.num_processes)
    state_dict, optim_state = _full_states(accelerator, model, optimizer)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}checkpoint-*"):  # writes cut short by a crash
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        for rank, rng in enumerate(rng_states):
            torch.save(rng, tmp / f"rng_state_{rank}.pt")
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        trainer_state = {"state": state.to_dict(), "epoch": state.position.epoch,
                         "config": config_dict}
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        if final.exists():  # an earlier attempt at this step (resumed from an older one)
            shutil.rmtree(final)
        tmp.replace(final)
        _fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


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
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refused to load {path}: it holds more than tensors ({first[:160]}); a checkpoint "
            f"file was replaced, so do not use it; resume from another checkpoint") from None


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
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"checkpoint {ckpt_dir} could not be loaded ({first[:200]}); "
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
            from utils.finetune import load_adapter_weights  # LoRA: adapters, safetensors

            load_adapter_weights(unwrapped, ckpt_dir)
        else:
            unwrapped.load_state_dict(_saved_weights(unwrapped, ckpt_dir))
        optimizer.load_state_dict(_load_tensors(ckpt_dir / "optimizer.pt"))
    scheduler.load_state_dict(_load_tensors(ckpt_dir / "scheduler.pt"))
    if accelerator.scaler is not None and (ckpt_dir / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(_load_tensors(ckpt_dir / "scaler.pt"))
    saved = json.loads((ckpt_dir / "trainer_state.json").read_text())
    rank_file = ckpt_dir / f"rng_state_{accelerator.process_index}.pt"
    if rank_file.exists():  # absent for ranks the saving run did not have: they keep the seed
        _set_rng_state(_load_tensors(rank_file))
    return TrainState.from_dict(saved["state"])


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


# ---------------------------------------------------------------- choosing what to resume

def remote_complete(store: Store, prefix: str) -> list[str]:
    """Checkpoint names under store/prefix whose marker is there, oldest first."""
    names = {o.name.split("/")[0] for o in store.child(prefix).list()
             if o.name.count("/") == 1 and o.name.endswith("/" + MARKER)}
    return sorted((n for n in names if step_of(n) is not None), key=_by_step)


def download(store: Store, dest: Path) -> Path:
    """Fetch a remote checkpoint into a hidden folder, check every hash, then rename it to dest.

    A download cut short is resumed by the next call (skip-existing sync into the same
    folder); dest never holds a half-copied checkpoint.
    """
    tmp = dest.parent / f"{_TMP_PREFIX}download-{dest.name}"
    result = sync_down(store, tmp)
    if result.failed:
        raise CheckpointError(f"{store.url}: {len(result.failed)} file(s) failed to download "
                              f"({result.failed[0]}); check the bucket and retry")
    problem = verify(tmp, hashes=True)
    if problem:
        raise CheckpointError(f"{store.url} downloaded but {problem}")
    if dest.exists():
        _set_aside(dest)
    tmp.replace(dest)
    _fsync_dir(dest.parent)
    return dest


def _set_aside(path: Path) -> Path:
    """Move a bad local copy out of the way (hidden, so nothing counts it) instead of deleting."""
    aside = path.parent / f".bad-{path.name}-{int(time.time())}"
    path.replace(aside)
    return aside


def choose_resume(wanted: str, root: Path, store: Store | None = None, remote_prefix: str = "",
                  log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from, downloaded if only the bucket has it; None if none exists.

    ``latest`` walks the complete checkpoints (local and remote) newest first and takes the
    first whose files pass their checksums, preferring the local copy: a corrupted or
    truncated checkpoint costs one checkpoint of progress, not the run. A named checkpoint
    must pass, or CheckpointError says why.
    """
    try:
        remote = set(remote_complete(store, remote_prefix)) if store is not None else set()
    except StorageError as err:
        if wanted != "latest":
            raise
        log(f"could not list {store.url}/{remote_prefix} ({err}); using local checkpoints only")
        remote = set()
    local = {p.name for p in find_complete(root)}
    if wanted == "latest":
        names = sorted(local | remote, key=_by_step, reverse=True)
    elif wanted in local or wanted in remote:
        names = [wanted]
    else:
        available = ", ".join(sorted(local | remote, key=_by_step)) or "none"
        raise CheckpointError(f"no complete checkpoint named {wanted!r} in {root}"
                              f"{f' or {store.url}/{remote_prefix}' if store else ''}; "
                              f"available: {available}")
    for name in names:
        problems = []
        if name in local:
            problem = verify(root / name, hashes=True)
            if problem is None:
                return root / name
            problems.append(f"local copy: {problem}")
        if name in remote:
            try:
                return download(store.child(f"{remote_prefix}/{name}"), root / name)
            except (CheckpointError, StorageError) as err:
                problems.append(f"bucket copy: {err}")
        reason = "; ".join(problems)
        if wanted != "latest":
            raise CheckpointError(f"checkpoint {name} is not usable ({reason}); resume from "
                                  f"another one (--resume latest skips bad ones)")
        log(f"skipping checkpoint {name}: {reason}")
    return None


def fetch(name: str, root: Path, store: Store | None = None, remote_prefix: str = "") -> Path:
    """Make sure this machine holds a verified copy of ``name`` (other nodes of a run)."""
    path = root / name
    if verify(path, hashes=True) is None:
        return path
    if store is None:
        raise CheckpointError(f"checkpoint {name} is not in {root} on this node and there is no "
                              f"bucket to fetch it from; use a shared --output-dir or a --bucket")
    return download(store.child(f"{remote_prefix}/{name}"), path)


# ---------------------------------------------------------------- retention

def prune(root: Path, keep: int, protected: set[str] = frozenset()) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep`` (never one still uploading)."""
    if keep <= 0:
        return []
    complete = find_complete(root)
    doomed = [p for p in complete[:-keep] if p.name not in protected]
    for path in doomed:
        (path / MARKER).unlink()  # first: a deletion cut short leaves no complete-looking copy
        shutil.rmtree(path)
    return doomed


def prune_remote(store: Store, prefix: str, keep: int,
                 protected: set[str] = frozenset()) -> list[str]:
    """Delete the oldest complete remote checkpoints beyond ``keep``, marker first.

    Removing the marker first means a deletion cut short leaves an incomplete (ignored)
    checkpoint, never a complete-looking one with files missing. Incomplete uploads older
    than every kept checkpoint (cut short by a crash) go too.
    """
    if keep <= 0:
        return []
    run = store.child(prefix)
    objects: dict[str, list[str]] = {}
    for obj in run.list():
        name, _, rest = obj.name.partition("/")
        if rest and step_of(name) is not None:
            objects.setdefault(name, []).append(rest)
    complete = sorted((n for n, files in objects.items() if MARKER in files), key=_by_step)
    kept = complete[-keep:]
    oldest_kept = _by_step(kept[0]) if kept else (0, "")
    doomed = [n for n in complete[:-keep] if n not in protected]
    doomed += [n for n, files in objects.items() if MARKER not in files
               and _by_step(n) < oldest_kept and n not in protected]
    for name in doomed:
        files = objects[name]
        if MARKER in files:
            run.delete(f"{name}/{MARKER}")
        for rest in files:
            if rest != MARKER:
                run.delete(f"{name}/{rest}")
    return sorted(doomed, key=_by_step)

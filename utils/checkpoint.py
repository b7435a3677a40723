"""Checkpoints: Hugging Face weights + training state, counted only once complete.

Layout of ``checkpoint-epoch{E}-step{S}-files{F}/``::

    config.json, model.safetensors   -> GPTNeoXForCausalLM.from_pretrained(dir) loads it as is
    optimizer.pt, scheduler.pt       -> torch.load(weights_only=True): tensors and numbers only
    scaler.pt (fp16 only)
    rng_state_{rank}.pt              -> every rank's torch RNG (python/numpy states are in JSON)
    trainer_state.json               -> step, data position, tokens seen, config, world size
    COMPLETE.json                    -> manifest (name, size, crc32c of every file), written LAST

A directory without a valid ``COMPLETE.json`` never counts: ``find_complete`` skips
it, so a crash at any moment leaves at worst an ignored directory.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils.data_utils import DataPosition

MARKER = "COMPLETE.json"
_NAME = re.compile(r"^checkpoint-epoch(\d+)-step(\d+)-files(\d+)$")


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


# ---------------------------------------------------------------- manifest

def write_manifest(ckpt_dir: Path) -> None:
    """Hash and fsync every file, then write the marker atomically: the checkpoint now counts."""
    from utils.storage import file_crc32c

    files = {}
    for path in sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MARKER):
        with path.open("rb") as f:
            os.fsync(f.fileno())
        files[path.relative_to(ckpt_dir).as_posix()] = {
            "size": path.stat().st_size, "crc32c": file_crc32c(path)}
    tmp = ckpt_dir / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"files": files, "created": time.time()}, indent=1))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(ckpt_dir / MARKER)
    _fsync_dir(ckpt_dir)


def verify(ckpt_dir: Path, hashes: bool = False) -> str | None:
    """None if the checkpoint is complete, else the reason it is not."""
    marker = ckpt_dir / MARKER
    if not marker.is_file():
        return "no completion marker"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable marker ({err})"
    for name, info in files.items():
        path = ckpt_dir / name
        if not path.is_file() or path.stat().st_size != info["size"]:
            return f"{name} is missing or has the wrong size"
        if hashes:
            from utils.storage import file_crc32c
            if file_crc32c(path) != info["crc32c"]:
                return f"{name} fails its checksum"
    return None


def find_complete(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (by step)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None
             and verify(p) is None]
    return sorted(found, key=lambda p: step_of(p.name))


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
    tmp = root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()

    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    state_dict = accelerator.get_state_dict(model)  # full state dict, gathered under FSDP
    optim_state = optimizer.state_dict()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        trainer_state = {"state": state.to_dict(), "config": config_dict,
                         "python_random": _py_random_state(), "numpy_random": _np_random_state()}
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # an earlier, incomplete attempt at the same step
            shutil.rmtree(final)
        tmp.replace(final)
        _fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _np_random_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


# ---------------------------------------------------------------- load

def load_checkpoint(accelerator, model, optimizer, scheduler, ckpt_dir: Path) -> TrainState:
    """Restore weights, optimizer, scheduler, scaler and RNG; return the saved TrainState.

    Nothing here unpickles code: safetensors for weights, ``weights_only=True`` for
    the rest, JSON for metadata.
    """
    problem = verify(ckpt_dir, hashes=True)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt_dir} is not usable: {problem}; "
                              f"resume from another one (--resume latest skips it)")
    unwrapped = accelerator.unwrap_model(model)
    # from_pretrained applies transformers' own key conversions (embed_out <-> lm_head).
    saved_model = type(unwrapped).from_pretrained(ckpt_dir, dtype=torch.float32)
    try:
        unwrapped.load_state_dict(saved_model.state_dict())
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {ckpt_dir} does not match the model "
                              f"({str(err).splitlines()[0]}): resume with the same --model "
                              f"as the run that wrote it") from None
    del saved_model
    optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (ckpt_dir / "scaler.pt").exists():
        accelerator.scaler.load_state_dict(torch.load(ckpt_dir / "scaler.pt", weights_only=True))
    saved = json.loads((ckpt_dir / "trainer_state.json").read_text())
    rank_file = ckpt_dir / f"rng_state_{accelerator.process_index}.pt"
    if rank_file.exists():
        rng = torch.load(rank_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    version, internal, gauss = saved["python_random"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy_random"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return TrainState.from_dict(saved["state"])


def prune(root: Path, keep: int, protected: set[str] = frozenset()) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``keep`` (never one still uploading)."""
    if keep <= 0:
        return []
    complete = find_complete(root)
    doomed = [p for p in complete[:-keep] if p.name not in protected]
    for path in doomed:
        shutil.rmtree(path)
    return doomed

"""The checkpoint format both backends write: names, training state, the manifest-last rule.

Layout of ``checkpoint-epoch{E}-step{S}-files{F}/``::

    config.json, model.safetensors   -> GPTNeoXForCausalLM.from_pretrained(dir) loads it as is
    (LoRA stages: adapter_config.json, adapter_model.safetensors -> peft loads it onto its base)
    torch: optimizer.pt, scheduler.pt, scaler.pt (fp16), rng_state_{rank}.pt
           -> torch.load(weights_only=True): tensors and numbers only (utils/torch_engine)
    MLX:   optimizer.safetensors (utils/mlx_engine)
    trainer_state.json               -> step, epoch, data position, tokens seen, config
    COMPLETE.json                    -> manifest (name, size, crc32c of every file), written LAST

A directory without a valid ``COMPLETE.json`` never counts: ``find_complete`` skips it, so a
crash at any moment leaves at worst an ignored directory. The same marker-last rule holds in
the bucket (see ``publisher.py``), and resuming re-checks every checksum, so a checkpoint
corrupted after it was written is skipped rather than loaded. This module is
framework-neutral: each engine writes its own files, then this format decides what counts.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from utils.data import DataPosition, MixturePosition, position_from_dict
from utils.errors import CheckpointError
from utils.fs import atomic_write, fsync_dir
from utils.storage import file_crc32c

MARKER = "COMPLETE.json"
_NAME = re.compile(r"^checkpoint-epoch(\d+)-step(\d+)-files(\d+)$")
# What a checkpoint must hold to be loadable: the training state, an optimizer state (torch's
# or MLX's, utils/mlx_engine), and weights with their config: a model (one file or an index
# of shards) or LoRA adapters.
REQUIRED = ("trainer_state.json",)
OPTIMIZERS = ("optimizer.pt", "optimizer.safetensors")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # LoRA stages: peft's own file names
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class TrainState:
    """Everything besides tensors that a resume needs to continue exactly."""

    step: int = 0
    tokens_seen: int = 0
    num_files: int = 0
    train_windows: int = 0
    position: DataPosition | MixturePosition = field(default_factory=DataPosition)
    world_size: int = 1
    global_batch_windows: int = 0
    seed: int | None = None  # the data order and the held-out split derive from it
    # Experiment trackers' run ids (e.g. {"wandb": "..."}): a resume continues the same run.
    run_ids: dict[str, str] = field(default_factory=dict)
    # This run's identity and line of training (utils/checkpoint/lineage.py): the id is made
    # at a start from scratch and kept by every resume; the lineage lists the checkpoints of
    # this line, oldest first, ending with the checkpoint that holds this state.
    run_id: str = ""
    lineage: list[str] = field(default_factory=list)
    # After a rollback with --rollback-lr-factor, the lower learning rate holds for the steps
    # before this one (utils.loop.schedule.Schedule); 0: no such stretch.
    lr_calm_until: int = 0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["position"] = self.position.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        data = dict(data)
        data["position"] = position_from_dict(data["position"])
        return cls(**data)


def write_trainer_state(folder: Path, state: TrainState, config_dict: dict,
                        backend: str) -> None:
    """trainer_state.json: the progress a resume continues from, the config, who wrote it."""
    record = {"state": state.to_dict(), "epoch": state.position.epoch, "config": config_dict,
              "backend": backend}
    (folder / "trainer_state.json").write_text(json.dumps(record, indent=1))


def read_trainer_state(folder: Path) -> TrainState:
    return TrainState.from_dict(json.loads((folder / "trainer_state.json").read_text())["state"])


def checkpoint_name(state: TrainState) -> str:
    return f"checkpoint-epoch{state.position.epoch}-step{state.step}-files{state.num_files}"


def step_of(name: str) -> int | None:
    match = _NAME.match(name)
    return int(match.group(2)) if match else None


def by_step(name: str) -> tuple[int, str]:
    return step_of(name) or 0, name


# ---------------------------------------------------------------- manifest

def write_manifest(ckpt_dir: Path) -> None:
    """Hash and fsync every file, then write the marker atomically: the checkpoint now counts.

    Hidden files (a leftover ``.COMPLETE.json.part-*``, a sync cache) are not part of it: stores
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
    record = {"files": files, "created": time.time(), "run_id": _run_id(ckpt_dir)}
    atomic_write(ckpt_dir / MARKER, json.dumps(record, indent=1))
    fsync_dir(ckpt_dir)


def _run_id(ckpt_dir: Path) -> str:
    """The run id the checkpoint's state records, for its marker ('' if none)."""
    try:
        return str(json.loads((ckpt_dir / "trainer_state.json").read_text())["state"]
                   .get("run_id") or "")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""


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
        missing += [n for n in (ADAPTER_CONFIG,) if n not in checked]
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
    return sorted(found, key=lambda p: by_step(p.name))

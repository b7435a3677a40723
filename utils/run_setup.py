"""What both training loops (train.py on torch, mlx_train.py on MLX) do around the step.

Data sync, the checkpoint bucket, choosing the checkpoint to resume from and checking it fits
this run, copying the tokenizer into checkpoints, and the per-step decisions (log, save, stop,
loss sanity): written once so the two backends cannot drift apart.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from configs.training_config import TrainingConfig
from utils import checkpoint
from utils.checkpoint import CheckpointError, TrainState
from utils.storage import StorageError

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model"}


class TrainingError(RuntimeError):
    """Stops the run with one readable line (NaN loss, bad resume target, ...)."""


class Processes(Protocol):
    """The part of accelerate's Accelerator these helpers use (MLX: utils.mlx_dist)."""

    is_main_process: bool
    is_local_main_process: bool

    def wait_for_everyone(self) -> None: ...


def sync_training_data(config: TrainingConfig, processes: Processes) -> None:
    """One process per node downloads (skip-existing); the others wait at the barrier."""
    if not config.sync_data:
        return
    if processes.is_local_main_process:
        from utils.storage import open_store, sync_down

        store = open_store(config.bucket, credentials=config.credentials or None)
        result = sync_down(store.child(config.data_prefix), Path(config.data_dir),
                           max_files=config.max_files or None)
        print(result.summary("downloaded"))
        if result.failed:
            raise TrainingError(f"{len(result.failed)} data files failed to sync from "
                                f"{store.url}/{config.data_prefix}: {result.failed[0]}")
    processes.wait_for_everyone()


def open_checkpoint_store(config: TrainingConfig, processes: Processes):
    """The bucket for checkpoints, checked for write access now rather than after hours."""
    if not config.bucket:
        return None
    from utils.storage import open_store

    store = open_store(config.bucket, credentials=config.credentials or None)
    if processes.is_main_process:
        store.check_access(write=True)  # also creates the embedded local bucket directory
    return store


def resolve_resume(config: TrainingConfig, processes: Processes, local_root: Path, store,
                   broadcast: Callable[[list], list] | None = None) -> Path | None:
    """The checkpoint to resume from: the newest good one (local or bucket) or a named one.

    The global main process chooses (checksums verified, downloaded if only the bucket has
    it) and tells the others (``broadcast``: torch.distributed's by default); every other
    node's local main then makes sure it holds a verified copy, so all ranks load the same
    checkpoint.
    """
    if not config.resume:
        return None
    prefix = f"checkpoints/{config.run_name}"
    choice: list[str | None] = [None, None]  # [checkpoint name, error]
    if processes.is_main_process:
        try:
            path = checkpoint.choose_resume(config.resume, local_root, store, prefix)
            choice[0] = path.name if path else None
        except (CheckpointError, StorageError) as err:
            choice[1] = str(err)
    name, error = (broadcast or _torch_broadcast)(choice)
    if error:
        raise TrainingError(error)
    if name and processes.is_local_main_process and not processes.is_main_process:
        checkpoint.fetch(name, local_root, store, prefix)
    processes.wait_for_everyone()
    return local_root / name if name else None


def _torch_broadcast(values: list) -> list:
    """The main process's ``values`` on every rank (as is when torch runs one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(values, src=0)
    return values


def continue_from(state: TrainState, saved: TrainState, source: Path, say) -> None:
    """Take over a loaded checkpoint's progress, refusing one whose data order differs."""
    if (saved.num_files, saved.train_windows) != (state.num_files, state.train_windows):
        raise TrainingError(
            f"{source.name} was trained on {saved.num_files} files / {saved.train_windows} "
            f"windows, this run has {state.num_files} / {state.train_windows}: resuming would "
            f"change the data order; use the same data, --max-files and --seq-len, or start a "
            f"new --run-name")
    if saved.global_batch_windows != state.global_batch_windows:
        say(f"note: global batch changed ({saved.global_batch_windows} -> "
            f"{state.global_batch_windows} windows); data order kept by window offset")
    state.step, state.tokens_seen, state.position = saved.step, saved.tokens_seen, saved.position
    say(f"resumed from {source} at step {state.step}")


def tokenizer_dir(meta: dict, data_dir: Path) -> Path | None:
    """The data's tokenizer folder (dataset.json names it relative to the cwd or the data)."""
    name = meta.get("tokenizer")
    if not name:
        return None
    for candidate in (Path(name), data_dir / name):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def copy_tokenizer(source: Path | None, checkpoint_dir: Path) -> None:
    """A checkpoint is a whole HF folder: model + tokenizer (before its marker is written)."""
    if source is None:
        return
    for file in source.iterdir():
        if file.name in TOKENIZER_FILES:
            shutil.copy2(file, checkpoint_dir / file.name)


def due(step: int, every: int, max_steps: int) -> bool:
    """Logging/saving cadence: every ``every`` steps and at the last step."""
    return step % every == 0 or step == max_steps


def check_loss(mean_loss: float, step: int, ckpt_root: Path) -> None:
    """A NaN/inf loss stops the run before anything is saved from it."""
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"loss became {mean_loss} at step {step}: stopping without saving (lower "
            f"--learning-rate, or check the data); the last complete checkpoint is still in "
            f"{ckpt_root}")


@contextmanager
def uploads_survive_an_abort(publisher, bar, config: TrainingConfig, say) -> Iterator[None]:
    """Around the loop: a crash or Ctrl-C still waits (bounded) for earlier checkpoints'
    uploads before it propagates; the progress bar is closed either way."""
    try:
        yield
    except BaseException:
        bar.close()
        say("run aborted: waiting for uploads of earlier checkpoints")
        publisher.close(timeout=config.upload_timeout_s)
        raise
    bar.close()


def finish_uploads(publisher, config: TrainingConfig, stopped_early: bool) -> bool:
    """Wait for the uploads: bounded after a preemption, up to an hour at a normal end."""
    return publisher.close(timeout=config.upload_timeout_s if stopped_early
                           else config.final_upload_timeout_s)


def flat_hparams(config: dict) -> dict:
    """TensorBoard's hparams take scalars and strings only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}

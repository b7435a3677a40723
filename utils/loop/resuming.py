"""Where a run continues from: the checkpoint bucket, the checkpoint chosen, its progress.

The main process chooses (and checks) and tells the others through the engine's broadcast,
so every rank loads the same checkpoint; taking over its progress refuses a checkpoint whose
data order differs from this run's.
"""

from __future__ import annotations

from pathlib import Path

from configs.training_config import TrainingConfig
from utils import checkpoint
from utils.checkpoint import TrainState
from utils.data import MixturePosition
from utils.errors import CheckpointError, StorageError, TrainingError
from utils.processes import Processes
from utils.storage import open_bucket


def open_checkpoint_store(config: TrainingConfig, processes: Processes):
    """The bucket for checkpoints, checked for write access now rather than after hours."""
    if not config.bucket:
        return None
    store = open_bucket(config.bucket_settings)
    if processes.is_main_process:
        store.check_access(write=True)  # also creates the embedded local bucket directory
    return store


def resolve_resume(config: TrainingConfig, engine: Processes, local_root: Path,
                   store) -> Path | None:
    """The checkpoint to resume from: the newest good one (local or bucket) or a named one.

    The global main process chooses (checksums verified, downloaded if only the bucket has
    it) and tells the others (the engine's broadcast); every other
    node's local main then makes sure it holds a verified copy, so all ranks load the same
    checkpoint.
    """
    if not config.resume:
        return None
    prefix = f"checkpoints/{config.run_name}"
    choice: list[str | None] = [None, None]  # [checkpoint name, error]
    if engine.is_main_process:
        try:
            path = checkpoint.choose_resume(config.resume, local_root, store, prefix)
            choice[0] = path.name if path else None
        except (CheckpointError, StorageError) as err:
            choice[1] = str(err)
    name, error = engine.broadcast_object(choice)
    if error:
        raise TrainingError(error)
    if name and engine.is_main_process:
        make_head(local_root / name, store, prefix)
    if name and engine.is_local_main_process and not engine.is_main_process:
        checkpoint.fetch(name, local_root, store, prefix)
    engine.wait_for_everyone()
    return local_root / name if name else None


def make_head(ckpt_dir: Path, store, prefix: str) -> None:
    """The resumed checkpoint becomes the run's head: an older one forks the line there, so
    ``--resume latest`` follows what this run trains next, not the abandoned higher steps."""
    head = checkpoint.lineage.head_of(ckpt_dir, start_line=True)
    checkpoint.lineage.move_local(ckpt_dir.parent, head, force=True)
    if store is not None:
        try:
            checkpoint.lineage.move_remote(store, prefix, head, force=True)
        except StorageError as err:
            raise TrainingError(f"could not record the resumed checkpoint {ckpt_dir.name} as "
                                f"the run's head in {store.url}/{prefix} ({err})") from None


def continue_from(state: TrainState, saved: TrainState, source: Path, say,
                  allow_seed_change: bool = False) -> None:
    """Take over a loaded checkpoint's progress, refusing one whose data order differs."""
    if saved.seed is not None and saved.seed != state.seed:
        if not allow_seed_change:
            raise TrainingError(
                f"{source.name} was trained with --seed {saved.seed}, this run has --seed "
                f"{state.seed}: the window order and the held-out split derive from the seed, "
                f"so part of the epoch would be trained twice and evaluation would use trained "
                f"windows; resume with --seed {saved.seed}, or pass --allow-seed-change")
        say(f"note: --seed changed ({saved.seed} -> {state.seed}) with --allow-seed-change: "
            f"the rest of the data order and the held-out split change")
    if type(saved.position) is not type(state.position):
        raise TrainingError(
            f"{source.name} was trained on a --data-mix and this run has none: pass the same "
            f"--data-mix to resume it, or start a new --run-name"
            if isinstance(saved.position, MixturePosition) else
            f"{source.name} was trained without --data-mix: drop --data-mix to resume it, or "
            f"start a new --run-name")
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
    state.run_ids = dict(saved.run_ids)  # trackers continue the same runs (W&B's id)
    state.run_id = saved.run_id or state.run_id  # the same run (checkpoints before run ids:
    state.lineage = list(saved.lineage) or [source.name]  # it gets one now)
    state.lr_calm_until = saved.lr_calm_until  # a rollback's lower rate goes on
    say(f"resumed from {source} at step {state.step}")

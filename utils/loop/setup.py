"""What the loop does around the steps: data sync, the bucket, resume, upload waits.

Written once for both engines; each step that involves several processes goes through the
engine's collectives (main process decides, the others follow).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from configs.training_config import TrainingConfig
from utils import checkpoint
from utils.checkpoint import TrainState
from utils.errors import CheckpointError, StorageError, TrainingError
from utils.processes import Processes
from utils.storage import open_store


class Collectives(Processes, Protocol):
    """Processes that can also send the main process's small values to every rank."""

    def broadcast_object(self, values: list) -> list: ...


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
    store = open_store(config.bucket, credentials=config.credentials or None)
    if processes.is_main_process:
        store.check_access(write=True)  # also creates the embedded local bucket directory
    return store


def resolve_resume(config: TrainingConfig, engine: Collectives, local_root: Path,
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
    if name and engine.is_local_main_process and not engine.is_main_process:
        checkpoint.fetch(name, local_root, store, prefix)
    engine.wait_for_everyone()
    return local_root / name if name else None


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

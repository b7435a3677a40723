"""What the loop does around the steps: data sync, the bucket, resume, upload waits.

Written once for both engines; each step that involves several processes goes through the
engine's collectives (main process decides, the others follow).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from configs.training_config import TrainingConfig
from utils import checkpoint
from utils.checkpoint import TrainState
from utils.data import MixturePosition, source_weights
from utils.errors import CheckpointError, StorageError, TrainingError, first_line
from utils.fs import atomic_write, remove_stale_tmp
from utils.processes import Processes
from utils.stages.streamed import fetch_shared_meta
from utils.storage import LocalStore, open_bucket


class Collectives(Processes, Protocol):
    """Processes that can also send the main process's small values to every rank."""

    def broadcast_object(self, values: list) -> list: ...


def sync_training_data(config: TrainingConfig, processes: Processes) -> None:
    """One process per node downloads (skip-existing); the others wait at the barrier.

    With ``--data-mix`` only the mixed sources' sub-folders are synced (a bucket may hold
    many more), plus the prefix's own ``dataset.json`` (the tokenizer facts they share).
    """
    if not config.sync_data or config.stream:  # streaming fetches shards as they are needed
        return
    if processes.is_local_main_process:
        from utils.storage import sync_down

        store = open_bucket(config).child(config.data_prefix)  # credentials, billing project
        for folder in source_weights(config.data_mix):
            result = sync_down(store.child(folder) if folder else store,
                               Path(config.data_dir) / folder,
                               max_files=config.max_files or None)
            print(result.summary("downloaded"))
            if result.failed:
                raise TrainingError(f"{len(result.failed)} data files failed to sync from "
                                    f"{store.url}/{folder}: {result.failed[0]}")
        if config.data_mix:
            fetch_shared_meta(store, Path(config.data_dir))
    processes.wait_for_everyone()


def open_checkpoint_store(config: TrainingConfig, processes: Processes):
    """The bucket for checkpoints, checked for write access now rather than after hours."""
    if not config.bucket:
        return None
    store = open_bucket(config)
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
    if name and engine.is_main_process:
        _make_head(local_root / name, store, prefix)
    if name and engine.is_local_main_process and not engine.is_main_process:
        checkpoint.fetch(name, local_root, store, prefix)
    engine.wait_for_everyone()
    return local_root / name if name else None


def _make_head(ckpt_dir: Path, store, prefix: str) -> None:
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


def finish_uploads(publisher, config: TrainingConfig, budget_left: Callable[[], float | None],
                   exit_s: float) -> bool:
    """At a normal end, wait up to --final-upload-timeout-s for the uploads. A SIGTERM cuts
    the wait to --upload-timeout-s and never past --preemption-budget-s less ``exit_s`` from
    the signal (a spot VM is gone 30 s after its notice): ``budget_left()`` is None until a
    signal, then the seconds its budget has left. True when every checkpoint reached the
    bucket. (A run stopped by a signal during training waits within its budget instead.)"""
    after_signal_s = max(0.0, min(config.upload_timeout_s, config.preemption_budget_s - exit_s))
    left = budget_left()
    if left is not None:  # the signal came before this wait, while the last save was written
        return publisher.close(timeout=min(left, after_signal_s))
    return publisher.close(timeout=config.final_upload_timeout_s,
                           interrupted=lambda: budget_left() is not None,
                           after_interrupt_s=after_signal_s)


def prepare_output_dir(output_dir: Path, processes: Processes) -> None:
    """Create --output-dir and prove it writable now; remove writes a crash cut short.

    Leftover ``.tmp-`` checkpoint folders (a crash or a full disk mid-save) go first, before
    anything else is written, so they never keep the disk full.
    """
    if not processes.is_local_main_process:
        return
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise TrainingError(f"--output-dir {output_dir} cannot be created or written "
                            f"({err.strerror or first_line(err)}); pass a writable folder "
                            f"with --output-dir") from None
    remove_stale_tmp(output_dir / "checkpoints")


OWNER = "RUN.json"  # in --output-dir: the one run whose checkpoints and logs it holds


class RunClaim:
    """The main process's hold on its run name: the leases (the output folder's, and the
    bucket's), renewed in the background and released at the end."""

    def __init__(self, leases: list[checkpoint.RunLease]) -> None:
        self.leases = leases

    def start(self) -> None:
        for lease in self.leases:
            lease.start_renewing()

    @property
    def lost(self) -> str:
        """Why this run no longer holds its name ('' while it does)."""
        return next((lease.lost for lease in self.leases if lease.lost), "")

    def release(self, timeout: float = 5.0) -> None:
        """Release every lease, bounded in time (a bucket that hangs must not hold the exit:
        an unreleased lease expires by itself)."""
        thread = threading.Thread(target=lambda: [lease.release() for lease in self.leases],
                                  name="lease-release", daemon=True)
        thread.start()
        thread.join(timeout)


def claim_run(config: TrainingConfig, engine: Collectives, local_root: Path, store,
              say: Callable[[str], None]) -> RunClaim | None:
    """Take the run name for this process (one writer per run), then refuse to start over a
    run that has checkpoints, unless resuming or --overwrite.

    The main process claims ``--output-dir`` for this run name (a folder holding another
    run's checkpoints is refused: their names would collide), takes the run's leases (a
    second live run of the same name is refused with one line naming it), and looks for
    checkpoints (locally and in the bucket); with --overwrite it deletes exactly this run's
    checkpoint folders. The others follow its verdict. Returns the claim (main process).
    """
    verdict: list[str | None] = [None, None]  # [what exists, error]
    claim = None
    if engine.is_main_process:
        try:
            claim = _take_run(config, local_root, store, say)
            if not config.resume:
                verdict[0] = _existing_checkpoints(config, local_root, store)
        except (CheckpointError, StorageError, TrainingError) as err:
            verdict[1] = str(err)
    found, error = engine.broadcast_object(verdict)
    if error:
        if claim is not None:
            claim.release()
        raise TrainingError(error)
    if found and not config.overwrite:
        if claim is not None:
            claim.release()
        raise TrainingError(
            f"run {config.run_name!r} already has checkpoints ({found}): pass --resume latest "
            f"to continue it, a new --run-name to start another run, or --overwrite to delete "
            f"them and start over")
    if found:
        say(f"--overwrite: starting run {config.run_name!r} over; deleting its checkpoint "
            f"folders ({found}) and nothing else")
        if engine.is_main_process:
            gone = checkpoint.delete_run(local_root, store, f"checkpoints/{config.run_name}")
            say(f"--overwrite deleted {len(gone)} checkpoint folder(s): {', '.join(gone)}")
    engine.wait_for_everyone()
    if claim is not None:
        claim.start()
    return claim


def _take_run(config: TrainingConfig, local_root: Path, store,
              say: Callable[[str], None]) -> RunClaim:
    """Claim the output folder and take the leases (local first, then the bucket's)."""
    output_dir = local_root.parent
    _claim_output_dir(output_dir, local_root, config.run_name)
    leases = [checkpoint.RunLease(LocalStore(output_dir), f"run {config.run_name!r} in "
                                  f"{output_dir}", log=say)]
    if store is not None:
        prefix = f"checkpoints/{config.run_name}"
        leases.append(checkpoint.RunLease(store.child(prefix), f"run {config.run_name!r} in "
                                          f"{store.url}/{prefix}", log=say))
    taken = []
    try:
        for lease in leases:
            lease.acquire()
            taken.append(lease)
    except BaseException:
        RunClaim(taken).release()
        raise
    return RunClaim(leases)


def _claim_output_dir(output_dir: Path, local_root: Path, run_name: str) -> None:
    """Record that ``output_dir`` holds ``run_name``; refuse one that holds another run.

    Checkpoint folder names carry the step, not the run, so two runs in one folder would
    resume, overwrite and delete each other's checkpoints."""
    owner_file = output_dir / OWNER
    try:
        owner = str(json.loads(owner_file.read_text())["run_name"])
    except (OSError, ValueError, KeyError, TypeError):
        owner = _run_of_checkpoints(local_root)
    if owner and owner != run_name:
        raise TrainingError(
            f"--output-dir {output_dir} holds run {owner!r}, not {run_name!r}: give run "
            f"{run_name!r} its own --output-dir (the default is outputs/{run_name}), or pass "
            f"--run-name {owner} to continue that run")
    if not owner_file.exists():
        atomic_write(owner_file, json.dumps({"run_name": run_name}))


def _run_of_checkpoints(local_root: Path) -> str:
    """The run name recorded in the folder's newest checkpoint ('' if none): folders from
    before RUN.json existed."""
    for path in reversed(checkpoint.find_complete(local_root)):
        try:
            return str(json.loads((path / "trainer_state.json").read_text())["config"]
                       ["run_name"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return ""


def _existing_checkpoints(config: TrainingConfig, local_root: Path, store) -> str:
    """'N in DIR, M in BUCKET' for the run's complete checkpoints, '' when there are none."""
    prefix = f"checkpoints/{config.run_name}"
    local = checkpoint.find_complete(local_root)
    remote = checkpoint.remote_complete(store, prefix) if store is not None else []
    places = [f"{len(local)} in {local_root}" if local else "",
              f"{len(remote)} in {store.url}/{prefix}" if remote else ""]
    return ", ".join(p for p in places if p)

"""One writer per run name, one run per output folder: claimed before anything is written.

The main process claims ``--output-dir`` (``RUN.json``), takes the run's leases (locally and
in the bucket), and refuses to start over a run that has checkpoints unless resuming or
``--overwrite`` (which deletes exactly this run's checkpoint folders). The other processes
follow its verdict.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from configs.training_config import TrainingConfig
from utils import checkpoint
from utils.errors import CheckpointError, StorageError, TrainingError, first_line
from utils.fs import atomic_write, remove_stale_tmp
from utils.processes import Processes
from utils.storage import LocalStore


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


def claim_run(config: TrainingConfig, engine: Processes, local_root: Path, store,
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

"""Checkpoints, framework-neutral: the format and manifest, resume choice, retention, uploads.

``format`` says what a complete checkpoint is, ``resume`` picks one to continue from,
``retention`` prunes old ones, ``publisher`` marks and uploads new ones in the background.
Each engine (``utils/torch_engine``, ``utils/mlx_engine``) writes and reads its own tensors.
"""

from utils.checkpoint import lineage
from utils.checkpoint.format import (
    MARKER,
    TrainState,
    by_step,
    checkpoint_name,
    find_complete,
    read_manifest,
    step_of,
    verify,
    write_manifest,
)
from utils.checkpoint.lease import RunLease
from utils.checkpoint.resume import choose_resume, download, fetch, remote_complete
from utils.checkpoint.retention import delete_run, permanent, prune, prune_remote
from utils.errors import CheckpointError

__all__ = [
    "MARKER", "CheckpointError", "RunLease", "TrainState", "by_step", "checkpoint_name",
    "choose_resume", "delete_run", "download", "fetch", "find_complete", "lineage",
    "permanent", "prune", "prune_remote", "read_manifest", "remote_complete", "step_of",
    "verify", "write_manifest",
]

"""What the shared loop asks of a backend: one small, typed surface per engine.

``utils/torch_engine`` (accelerate: one GPU, DDP, FSDP, multi-node) and ``utils/mlx_engine``
(MLX, ``mlx.launch`` ranks) implement it; ``utils/loop/trainer.py`` drives either one. The
loop never sees a tensor: batches go in as the stage's numpy arrays (or the engine's own
loader's output), numbers come back as Python floats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from configs.training_config import TrainingConfig
from utils.checkpoint import TrainState
from utils.data import BatchSampler
from utils.loop.schedule import Schedule
from utils.processes import Processes
from utils.stages.task import Batch, Task


class Snapshot(Protocol):
    """A checkpoint's contents held in host memory, ready to be written off the loop."""

    @property
    def nbytes(self) -> int:
        """Host memory it holds (weights and optimizer state)."""
        ...

    def write(self) -> Path:
        """Write the checkpoint folder (no marker: the publisher writes that); safe on another
        thread while training continues. Returns its path."""
        ...


@dataclass(frozen=True)
class ModelInfo:
    """What the banner, the FLOP count and MFU need to know about the model being trained."""

    total_params: int           # the base model's, before LoRA or quantization
    non_embedding_params: int
    trainable_params: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    peak_flops: float | None    # per device, dense bf16; None: MFU is not reported
    description: str            # engine, device, precision, compile: one banner fragment


class Engine(Processes, Protocol):
    """A backend: its processes and collectives, the model and optimizer, checkpoint I/O."""

    where: str  # the summary's "on what": device and process count
    accelerated: bool  # a GPU (CUDA, Apple) rather than the CPU
    schedule: Schedule  # made by setup(); the loop sets a rollback's calm on it

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all processes (the values themselves for one process)."""
        ...

    def all_sum_later(self, values: list[float]) -> Callable[[], list[float]]:
        """Start ``all_sum`` without waiting for it; the returned function gives the sums.

        The loop exchanges its per-step flags this way and reads them one step later, by
        which time they have arrived: no step waits on the host for a collective."""
        ...

    def setup(self, task: Task, config: TrainingConfig) -> ModelInfo:
        """Seed, build the stage's model and optimizer (LoRA on its base when fine-tuning).

        Called once per stage (a curriculum runs several on one engine) with that stage's
        config; the engine's own construction covers only what its processes share."""
        ...

    def batches(self, task: Task, sampler: BatchSampler) -> Iterator[Any]:
        """This rank's micro-batches in sampler order; ``sampler.position`` follows them."""
        ...

    def train_step(self, micro_batches: list[Any], step: int,
                   target_count: float | None = None) -> None:
        """One optimizer step (0-based ``step``) over one step's micro-batches, accumulated.

        ``target_count`` (SFT) goes into each batch as ``batch["target_count"]``, the divisor
        of its summed loss."""
        ...

    def read_interval(self) -> tuple[dict[str, float], float]:
        """(loss and stage metrics summed over the steps since ``reset_interval``, averaged over
        processes; the last step's gradient norm). Collective: every process calls it."""
        ...

    def reset_interval(self) -> None: ...

    def evaluating(self) -> AbstractContextManager[None]:
        """Eval mode (no dropout, no gradients) for the block."""
        ...

    def eval_loss(self, batch: Batch) -> float: ...

    def snapshot(self, state: TrainState, config_dict: dict, root: Path) -> Snapshot | None:
        """Copy everything a checkpoint holds into host memory: the only part of a save that
        blocks training. Collective; the main process gets the Snapshot (of a checkpoint to
        be written under ``root``), the others None."""
        ...

    def load(self, ckpt_dir: Path) -> TrainState:
        """Restore weights, optimizer and RNG states from a verified checkpoint."""
        ...

    def memory_gib(self) -> float: ...

    def merge(self, ckpt_dir: Path, out_dir: Path) -> Path:
        """A LoRA checkpoint merged onto its base as a plain Hugging Face folder."""
        ...

    def finish(self) -> None:
        """After the last stage of the run (torch: ends the process group)."""
        ...

    def explain(self, err: Exception) -> str | None:
        """One line for a backend error a user acts on rather than debugs (another process
        of the job lost), or None: the error stays a traceback."""
        ...

    def score(self, batch: dict[str, Any]) -> list[tuple[float, bool, int]]:
        """Downstream task rows (``utils.stages.downstream.pad_requests``), no gradient, inside
        ``evaluating()``: per row (summed log-prob of its continuation, whether every
        continuation token is the greedy argmax, continuation tokens)."""
        ...

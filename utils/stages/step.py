"""A training step's stage side, written once for both engines.

Which loss a stage trains with (:func:`stage_loss`), and GRPO's orchestration: sample the
completions of a micro-batch's prompts, score them with the rewards into a training batch,
take the log-probs that must stay fixed over ``--grpo-epochs`` passes once, make the passes,
and the held-out reward. The engines keep only what needs tensors, behind
:class:`StepEngine` (generate, the loss of a batch, an optimizer update) and
:class:`StageLosses` (the per-stage loss functions of their ``losses`` module), so the order
in which samples, dropout masks and updates happen is the same on both and cannot drift.

numpy and the standard library only (the import-linter contracts keep it so).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np

from utils.stages.task import Batch, Task

# An engine's batch on its device: a dict of its own tensors (torch or MLX).
DeviceBatch = TypeVar("DeviceBatch", bound=MutableMapping[str, Any])
LossFn = Callable[[Any, Any], tuple[Any, dict[str, Any]]]  # (model, batch) -> loss, metrics

# The loss each stage trains with: the name of the function every engine's losses module
# (``utils/torch_engine/losses.py``, ``utils/mlx_engine/losses.py``) defines for it.
STAGE_LOSSES: dict[str, str] = {"pretrain": "pretrain_loss", "sft": "sft_loss",
                                "dpo": "dpo_loss", "grpo": "grpo_loss"}


class StageLosses(Protocol):
    """An engine's losses module: one function per :data:`STAGE_LOSSES` entry, same math."""

    def pretrain_loss(self, model: Any, batch: Any) -> tuple[Any, dict[str, Any]]: ...

    def sft_loss(self, model: Any, batch: Any) -> tuple[Any, dict[str, Any]]: ...

    def dpo_loss(self, model: Any, batch: Any, beta: float) -> tuple[Any, dict[str, Any]]: ...

    def grpo_loss(self, model: Any, batch: Any, beta: float, epsilon: float,
                  temperature: float = 1.0) -> tuple[Any, dict[str, Any]]: ...


def stage_loss(losses: StageLosses, stage: str, dpo_beta: float, *,
               grpo_beta: float | None = None, grpo_epsilon: float | None = None,
               grpo_temperature: float = 1.0) -> LossFn:
    """(model, batch) -> (loss, extra metrics) for ``stage``, from an engine's ``losses``.

    The GRPO settings are keyword-only and have no defaults of their own for "grpo" (the
    config's are the only ones): a caller that forgets them fails here, not silently.
    """
    loss = getattr(losses, STAGE_LOSSES[stage])
    if stage == "dpo":
        return partial(loss, beta=dpo_beta)
    if stage == "grpo":
        if grpo_beta is None or grpo_epsilon is None:
            raise ValueError("stage_loss('grpo') needs grpo_beta and grpo_epsilon")
        return partial(loss, beta=grpo_beta, epsilon=grpo_epsilon,
                       temperature=grpo_temperature)
    return loss


class StepEngine(Protocol[DeviceBatch]):
    """What a stage's step asks of an engine: the tensor work, nothing about the order.

    ``utils/torch_engine/engine.py`` and ``utils/mlx_engine/engine.py`` implement it; the
    functions below decide when each method runs.
    """

    def evaluating(self) -> AbstractContextManager[None]:
        """Eval mode (no dropout, no gradients, the current weights) for the block."""
        ...

    def generate(self, prompts: Batch, sample: bool) -> np.ndarray:
        """New tokens for each prompt row (left-padded ``input_ids``/``attention_mask``),
        prompt-major: ``task.sampling.group_size`` samples per prompt, or one greedy
        completion when ``sample`` is False; right-padded with the pad id. Called inside
        ``evaluating()``."""
        ...

    def on_device(self, rows: Batch, target_count: float | None = None) -> DeviceBatch:
        """The batch as the engine's tensors; ``target_count`` (SFT's divisor) joins it."""
        ...

    def fixed_logps(self, batch: DeviceBatch) -> Mapping[str, Any]:
        """GRPO's ``old_logps`` (and ``ref_logps`` when beta != 0) of a rollout batch, with
        no gradient. Called inside ``evaluating()``, with the weights that sampled it."""
        ...

    def add_stats(self, stats: Mapping[str, float], divisor: int) -> None:
        """Add ``value / divisor`` of each statistic to the interval's sums."""
        ...

    def accumulate(self, batch: DeviceBatch, divisor: int) -> None:
        """Forward and backward of one micro-batch, gradients summed into the step's; its
        loss and metrics join the interval's sums divided by ``divisor``."""
        ...

    def update(self) -> None:
        """One optimizer update from the summed gradients (averaged over processes,
        clipped); the next ``accumulate`` starts a fresh sum."""
        ...

    def batch_loss(self, rows: Batch) -> float:
        """The stage's loss of one held-out batch. Called inside ``evaluating()``."""
        ...


def as_numpy(rows: Mapping[str, Any]) -> Batch:
    """A micro-batch as numpy arrays: the torch loader hands over (CPU) tensors, which numpy
    views without copying; the rewards and the rollout batch are built from numpy."""
    return {key: np.asarray(value) for key, value in rows.items()}


def prepare(engine: StepEngine[DeviceBatch], task: Task, rows: Mapping[str, Any],
            accum: int, target_count: float | None) -> DeviceBatch:
    """A micro-batch on the device, ready for every pass of the step.

    GRPO: its prompts are sampled first (eval mode, the current weights) and scored into the
    training batch; the rollout's statistics join the interval's sums, each micro-batch
    counting 1/``accum`` of the step. When several passes train on one rollout, the
    log-probs that must stay fixed (the sampling policy's and the reference's) are taken
    here, once, before the first update moves the weights.
    """
    if task.rollout is not None:
        prompts = as_numpy(rows)
        with engine.evaluating():
            generated = engine.generate(prompts, sample=True)
        rows, stats = task.rollout(prompts, generated)
        engine.add_stats(stats, accum)
    batch = engine.on_device(rows, target_count)
    if task.passes > 1:
        with engine.evaluating():
            batch.update(engine.fixed_logps(batch))
    return batch


def train_passes(engine: StepEngine[DeviceBatch], task: Task, micro_batches: Sequence[Any],
                 target_count: float | None,
                 before: Callable[[int, int], None] | None = None) -> None:
    """One loop step: ``task.passes`` optimizer updates over the step's micro-batches (GRPO
    with ``--grpo-epochs E``: E passes over one rollout; otherwise one).

    A micro-batch is prepared (GRPO: sampled) just before its first use, in the first pass;
    the later passes reuse it. ``before(micro, rerun)`` runs ahead of each micro-batch of
    each pass, its sampling included: the MLX engine seeds its RNG there, so a resumed run
    draws the same samples and dropout masks. The metrics of every pass count alike.
    """
    accum, passes = len(micro_batches), task.passes
    prepared: list[DeviceBatch] = []
    for rerun in range(passes):
        for micro, rows in enumerate(micro_batches):
            if before is not None:
                before(micro, rerun)
            if rerun == 0:
                prepared.append(prepare(engine, task, rows, accum, target_count))
            engine.accumulate(prepared[micro], accum * passes)
        engine.update()


def eval_value(engine: StepEngine[Any], task: Task, rows: Batch) -> float:
    """A held-out batch's number, inside ``evaluating()``: the stage's loss, or for GRPO the
    mean reward of greedy completions (one per prompt), what the run sets out to raise."""
    if task.rollout is None:
        return engine.batch_loss(rows)
    prompts = as_numpy(rows)
    return task.rollout(prompts, engine.generate(prompts, sample=False))[1]["reward_mean"]

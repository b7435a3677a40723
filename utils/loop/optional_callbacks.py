"""The loop's callbacks that flags turn on; the trainer adds them after ``Evaluation()``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from utils.loop.callbacks import Callback
from utils.loop.downstream import DownstreamEval

if TYPE_CHECKING:
    from utils.loop.trainer import Trainer


def configured_callbacks(trainer: Trainer) -> list[Callback]:
    """``[DownstreamEval]`` with ``--eval-tasks``, else none. Built at the trainer's start, so
    a missing or malformed task file stops the run before its first step."""
    return [DownstreamEval(trainer)] if trainer.config.eval_tasks else []

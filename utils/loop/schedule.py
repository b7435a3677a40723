"""Linear warmup then cosine decay to a floor, and a calmer stretch after a rollback;
framework-neutral so both loops share it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from configs.training_config import TrainingConfig


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based).

    Warmup starts at 1/warmup (not 0) so the first step already learns.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Schedule:
    """The learning rate of every optimizer step, one object both engines and the log read.

    After a rollback (``--rollback-lr-factor`` below 1) the rate is multiplied by
    ``calm_factor`` for the steps before ``calm_until``: the updates that just failed came
    from weights and a rate that together diverged, and going back to the same weights with
    the same rate can diverge again. ``calm_until`` is saved with each checkpoint
    (``TrainState.lr_calm_until``) so a resume inside that stretch keeps the lower rate.
    """

    peak: float
    warmup_steps: int
    max_steps: int
    min_ratio: float
    calm_factor: float = 1.0
    calm_until: int = 0

    @classmethod
    def of(cls, config: TrainingConfig) -> Schedule:
        return cls(config.learning_rate, config.warmup_steps, config.max_steps,
                   config.min_lr_ratio, config.rollback_lr_factor)

    def factor(self, step: int) -> float:
        """Multiplier of the peak LR for optimizer step ``step`` (0-based)."""
        calm = self.calm_factor if step < self.calm_until else 1.0
        return lr_factor(step, self.warmup_steps, self.max_steps, self.min_ratio) * calm

    def lr(self, step: int) -> float:
        return self.peak * self.factor(step)

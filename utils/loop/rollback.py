"""Rolling back in-process when updates keep failing: the last good checkpoint, newer data.

More than ``--max-skipped-steps`` updates in a row with a non-finite loss or gradient norm (the
engines skip each of them) mean the run is not recovering by itself — a poisoned stretch of
data, or weights that drifted into a bad region. The loop then loads the newest complete
checkpoint of its own line (its lineage: never another run's, never an abandoned line's), keeps
the data position where it is (the windows consumed since that checkpoint are skipped, not
retrained: the position saved with the next checkpoint is past them, so a resume stays exact),
makes that checkpoint the head (the line forks there, as a resume from it would) and trains on,
with ``--rollback-lr-factor`` below 1 at a lower learning rate for ``--rollback-lr-steps``.
``--max-rollbacks`` bounds it; then the run stops with one line naming the steps and windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from utils import checkpoint
from utils.checkpoint import TrainState
from utils.errors import TrainingError
from utils.loop.engine import Engine
from utils.loop.resuming import make_head


@dataclass(frozen=True)
class Rollback:
    """One rollback: from which step to which checkpoint, and the windows it skipped."""

    from_step: int
    to_step: int
    checkpoint: str
    windows_skipped: int
    lr_factor: float = 1.0  # the learning rate's multiplier from here ...
    lr_calm_until: int = 0  # ... up to this step

    def record(self) -> dict:
        """Its line in metrics.jsonl."""
        return {"event": "rollback", "step": self.to_step, "from_step": self.from_step,
                "checkpoint": self.checkpoint, "windows_skipped": self.windows_skipped,
                "lr_factor": self.lr_factor, "lr_calm_until": self.lr_calm_until}

    def line(self) -> str:
        calm = (f"; learning rate x{self.lr_factor:g} until step {self.lr_calm_until}"
                if self.lr_factor < 1 and self.lr_calm_until > self.to_step else "")
        return (f"rolled back from step {self.from_step} to {self.checkpoint} (step "
                f"{self.to_step}); skipping the {self.windows_skipped} windows read since{calm}")


def newest_of_line(root: Path, state: TrainState) -> Path | None:
    """The newest complete local checkpoint on this run's line (its lineage)."""
    line = set(state.lineage)
    own = [path for path in checkpoint.find_complete(root) if path.name in line]
    return own[-1] if own else None


def roll_back(engine: Engine, state: TrainState, root: Path, store, prefix: str,
              run: int, windows_per_step: int, calm_steps: int) -> Rollback:
    """Load the newest checkpoint of the line into ``engine`` and wind ``state`` back to it,
    keeping its data position, the learning rate lowered for ``calm_steps`` (by
    ``engine.schedule``'s factor); every process does the same (the main process chooses)."""
    choice = [None]
    if engine.is_main_process:
        found = newest_of_line(root, state)
        choice[0] = found.name if found else None
    (name,) = engine.broadcast_object(choice)
    if name is None:
        raise TrainingError(
            f"{run} updates in a row up to step {state.step} had a non-finite loss or gradient "
            f"norm and no checkpoint of this run is complete to roll back to: stopping (lower "
            f"--learning-rate, or check the data; save earlier with --save-steps)")
    if engine.is_local_main_process and not engine.is_main_process:
        checkpoint.fetch(name, root, store, prefix)  # another machine: from the bucket
    engine.wait_for_everyone()
    saved = engine.load(root / name)
    if engine.is_main_process:
        make_head(root / name, store, prefix)
    schedule = engine.schedule
    calm_until = max(saved.lr_calm_until,
                     saved.step + calm_steps if schedule.calm_factor < 1 else 0)
    event = Rollback(state.step, saved.step, name,
                     (state.step - saved.step) * windows_per_step, schedule.calm_factor,
                     calm_until)
    state.step, state.tokens_seen = saved.step, saved.tokens_seen
    state.lineage = list(saved.lineage)  # the position stays: those windows are skipped
    state.lr_calm_until = schedule.calm_until = calm_until
    return event

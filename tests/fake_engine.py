"""An in-process engine with numbers for tensors, so the loop itself is tested in milliseconds.

``FakeEngine`` implements ``utils.loop.engine.Engine`` for one process: a "step" adds the
loss ``loss_at(step)`` to the interval and moves a one-number "weight"; a snapshot writes a
real checkpoint folder (real ``trainer_state.json``, small stand-ins for the weight files)
that the real publisher marks and the real resume choice verifies. Everything around the
engine (the ``Trainer``, the data, the sampler, saving, retention, signals) is the product's
own code, so what these tests pin down is the loop's cadence, its stop and save decisions and
its exactness on resume, without a model.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from configs.training_config import PRESETS, TrainingConfig
from utils.checkpoint import TrainState, checkpoint_name
from utils.checkpoint.format import read_trainer_state, write_trainer_state
from utils.data import BatchSampler
from utils.loop.engine import ModelInfo
from utils.loop.schedule import Schedule
from utils.stages.task import Task


def fake_config(data_dir: Path, out: Path, **overrides) -> TrainingConfig:
    """The smoke preset on local data, no bucket, no trackers: what the loop tests vary."""
    settings = {"data_dir": str(data_dir), "output_dir": str(out), "bucket": "",
                "report_to": "none", "seq_len": 64, "per_device_train_batch_size": 2,
                "eval_windows": 4, "eval_steps": 1000, "logging_steps": 1}
    return replace(PRESETS["smoke"], **{**settings, **overrides})


@dataclass
class FakeSnapshot:
    """A checkpoint in memory: the state and the weight, written as a real folder."""

    root: Path
    state: TrainState
    config_dict: dict
    weight: float
    nbytes: int = 64
    write_s: float = 0.0  # how long the background write takes (a slow disk, a loaded host)

    def write(self) -> Path:
        time.sleep(self.write_s)
        final = self.root / checkpoint_name(self.state)
        tmp = self.root / f".tmp-{final.name}"
        tmp.mkdir(parents=True)
        write_trainer_state(tmp, self.state, self.config_dict, "fake")
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_text(json.dumps({"weight": self.weight}))
        (tmp / "optimizer.pt").write_bytes(b"fake")
        if final.exists():  # the same step again on a new line of training
            final.rename(self.root / f".old-{final.name}")
        tmp.rename(final)
        return final


class FakeEngine:
    """One process, no tensors: the Engine protocol as plain Python numbers."""

    where = "fake engine"
    accelerated = False
    process_index, num_processes = 0, 1
    is_main_process = is_local_main_process = True

    def __init__(self, loss_at: Callable[[int], float] = lambda step: 10.0 / (step + 1),
                 on_step: Callable[[int], None] = lambda step: None,
                 poisoned: frozenset[int] = frozenset(), write_s: float = 0.0) -> None:
        self.loss_at, self.on_step, self.write_s = loss_at, on_step, write_s
        self.poisoned = poisoned  # window indices whose steps' loss is NaN (bad data)
        self.weight = 0.0
        self.run = 0
        self.reset_interval()
        self.seen: list[list[int]] = []  # the window indices of every step, in order
        self.lrs: list[float] = []  # the learning rate each step applied, in order

    # collectives of one process
    def wait_for_everyone(self) -> None:
        pass

    def broadcast_object(self, values: list) -> list:
        return values

    def all_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def all_sum_later(self, values: list[float]) -> Callable[[], list[float]]:
        return lambda: list(values)

    # the model
    def setup(self, task: Task, config: TrainingConfig) -> ModelInfo:
        self.schedule = Schedule.of(config)
        return ModelInfo(total_params=100, non_embedding_params=80, trainable_params=100,
                         num_layers=2, hidden_size=8, vocab_size=task.vocab_size or 2048,
                         peak_flops=None, description="fake engine")

    def batches(self, task: Task, sampler: BatchSampler) -> Iterator[dict]:
        for indices in sampler:
            yield {"input_ids": list(indices)}

    def train_step(self, micro_batches: list[dict], step: int,
                   target_count: float | None = None) -> None:
        self.seen.append([i for batch in micro_batches for i in batch["input_ids"]])
        self.lrs.append(self.schedule.lr(step))  # as the engines: the step's rate
        loss = math.nan if self.poisoned & set(self.seen[-1]) else self.loss_at(step)
        if math.isfinite(loss):  # as the engines do: a non-finite update is skipped
            self.interval += loss
            self.weight += 1.0
            self.run = 0
        else:
            self.skipped, self.run = self.skipped + 1, self.run + 1
            self.longest = max(self.longest, self.run)
        self.on_step(step)

    def read_interval(self) -> tuple[dict[str, float], float]:
        return {"loss": self.interval, "skipped_steps": self.skipped,
                "skip_run": self.longest}, 0.5

    def reset_interval(self) -> None:
        self.interval, self.skipped = 0.0, 0
        self.longest = self.run  # a run of skips carries over into the next interval

    def evaluating(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def eval_loss(self, batch: dict) -> float:
        return 2.0

    # checkpoints
    def snapshot(self, state: TrainState, config_dict: dict, root: Path) -> FakeSnapshot:
        copy = TrainState.from_dict(state.to_dict())
        return FakeSnapshot(root, copy, config_dict, self.weight, write_s=self.write_s)

    def load(self, ckpt_dir: Path) -> TrainState:
        self.run = 0  # as the engines: a rollback starts a fresh run of skips
        self.weight = json.loads((ckpt_dir / "model.safetensors").read_text())["weight"]
        return read_trainer_state(ckpt_dir)

    def memory_gib(self) -> float:
        return 0.0

    def merge(self, ckpt_dir: Path, out_dir: Path) -> Path:
        raise AssertionError("pretraining never merges")

    def finish(self) -> None:
        pass

"""What hangs off the loop: events a callback answers, and the loop's own callbacks.

The :class:`~utils.loop.trainer.Trainer` holds the step; everything else that happens around
it (evaluation, the progress bar, the metrics file, TensorBoard and W&B, the logs' copy in the
bucket, and whatever a user adds with ``--callbacks``) is a :class:`Callback`, called in a
fixed order at each event:

=========================  =========================================================  =======
event                      when                                                       numbers
=========================  =========================================================  =======
``pre_train``              set-up done (resumed, data ready), before the first step   —
``pre_step``/``post_step`` around every optimizer step (``trainer.state.step`` moved)  none
``log_metrics``            every log step (and the baseline before training):         Python
                           ``record`` may be extended by a callback for the later
                           ones (writers come last)
``post_checkpoint_saved``  a checkpoint was taken (written in the background,         —
                           counted once complete)
``post_train``             the steps are over (the last one, or a stop request)       —
``on_error``               the run failed; the error propagates after                 —
``close``                  once, at the end whatever happened; bounded by             —
                           ``trainer.budget_left()`` after a signal
=========================  =========================================================  =======

``post_step`` gets no loss: reading a device number every step would make the host wait for
the device (a sync per step). Numbers arrive in ``log_metrics``, where the loop reads them
anyway. Callbacks run on every process; work for one process checks ``trainer.main``.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from utils.errors import ConfigError, first_line
from utils.loop.log_mirror import start_log_mirror
from utils.loop.metrics import MetricsWriter, format_eta
from utils.loop.tracker import open_trackers

if TYPE_CHECKING:
    from utils.loop.engine import Engine
    from utils.loop.trainer import Trainer
    from utils.stages.task import Task

EVENTS = ("pre_train", "pre_step", "post_step", "log_metrics", "post_checkpoint_saved",
          "post_train", "on_error", "close")


class Callback:
    """Override the events you need; each is a no-op here. See the module docstring."""

    def pre_train(self, trainer: Trainer) -> None:
        """Set-up is done; the first step comes next."""

    def pre_step(self, trainer: Trainer) -> None:
        """An optimizer step starts (``trainer.state.step`` steps done so far)."""

    def post_step(self, trainer: Trainer) -> None:
        """An optimizer step finished (``trainer.state.step`` counts it)."""

    def log_metrics(self, trainer: Trainer, record: dict) -> None:
        """A log step's record (Python numbers); add keys to it for the writers after you."""

    def post_checkpoint_saved(self, trainer: Trainer, path: Path) -> None:
        """A checkpoint of ``trainer.state`` was taken into ``path``."""

    def post_train(self, trainer: Trainer) -> None:
        """No step follows (the run reached --max-steps or was asked to stop)."""

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        """The run failed with ``error``."""

    def close(self, trainer: Trainer) -> None:
        """The end, whatever happened: release what the callback holds, within
        ``trainer.budget_left()`` (None: no deadline) when the run was signalled."""


class Evaluation(Callback):
    """The held-out metric (loss; GRPO: reward) on eval steps, and once before training when
    the task asks for a baseline (GRPO: the base model's reward)."""

    def pre_train(self, trainer: Trainer) -> None:
        if trainer.task.eval_before_training and trainer.state.step == 0:
            record = {"step": 0, trainer.task.eval_metric: self._value(trainer)}
            trainer.say(f"{trainer.task.eval_metric} before training: "
                        f"{record[trainer.task.eval_metric]:.4f}")
            trainer.log_metrics(record)

    def log_metrics(self, trainer: Trainer, record: dict) -> None:
        config, key = trainer.config, trainer.task.eval_metric
        if key not in record and trainer.due(config.eval_steps):
            record[key] = self._value(trainer)

    @staticmethod
    def _value(trainer: Trainer) -> float:
        return evaluate(trainer.engine, trainer.task, trainer.config.per_device_train_batch_size)


def evaluate(engine: Engine, task: Task, batch_size: int) -> float:
    """Mean loss (GRPO: reward) over the held-out examples, each process scoring its share."""
    mine = task.eval_idx[engine.process_index::engine.num_processes]
    total = count = 0.0
    with engine.evaluating():
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            loss = engine.eval_loss(task.collate([task.examples[i] for i in chunk]))
            total += loss * len(chunk)
            count += len(chunk)
    total, count = engine.all_sum([total, count])
    return total / max(count, 1.0)


class SpikeWatch(Callback):
    """A logged loss or gradient norm far above its recent values is an event: one line, a
    ``"event": "spike"`` record in metrics.jsonl and a ``spikes`` count in TensorBoard.

    The z-score is taken against the last ``window`` logged values of the same metric (at
    least ``MIN_HISTORY`` of them), on log steps only: the loop reads these numbers there
    anyway, so watching costs no host sync. It only reports: a spike that makes updates
    non-finite is handled by the step guard and rollback."""

    MIN_HISTORY = 8

    def __init__(self, zscore: float, window: int = 20) -> None:
        self.zscore, self.window = zscore, window
        self.history: dict[str, list[float]] = {"loss": [], "grad_norm": []}
        self.count = 0

    def log_metrics(self, trainer: Trainer, record: dict) -> None:
        for key, past in self.history.items():
            value = record.get(key)
            if value is None or not math.isfinite(value):
                continue
            if len(past) >= self.MIN_HISTORY:
                z = zscore(value, past)
                if z > self.zscore:
                    self._report(trainer, record["step"], key, value, z)
            past[:] = [*past, value][-self.window:]

    def _report(self, trainer: Trainer, step: int, key: str, value: float, z: float) -> None:
        self.count += 1
        trainer.say(f"{key} spike at step {step}: {value:.4g}, {z:.1f} standard deviations "
                    f"above its last {self.window} logged values (--spike-zscore "
                    f"{self.zscore:g})")
        if trainer.main:
            trainer.metrics_file.writer.write({"event": "spike", "step": step, "metric": key,
                                               "value": value, "zscore": z})
            trainer.trackers.log(trainer, {"step": step, "spikes": self.count})


def zscore(value: float, past: list[float]) -> float:
    """How many standard deviations ``value`` lies above the mean of ``past``."""
    mean = sum(past) / len(past)
    std = math.sqrt(sum((x - mean) ** 2 for x in past) / len(past))
    return (value - mean) / std if std > 0 else (math.inf if value > mean else 0.0)


class ProgressBar(Callback):
    """tqdm over the steps on the main process: loss, tokens/s and ETA at each log step."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def pre_train(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=trainer.config.max_steps, initial=trainer.state.step,
                        desc="training", unit="step", disable=not trainer.main,
                        dynamic_ncols=True)

    def post_step(self, trainer: Trainer) -> None:
        self.bar.update(1)

    def log_metrics(self, trainer: Trainer, record: dict) -> None:
        if "loss" in record and self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}",
                                 tok_s=f"{record['tokens_per_s']:.0f}",
                                 eta=format_eta(record["eta_s"]))

    def post_train(self, trainer: Trainer) -> None:
        self.close(trainer)  # before the end's waits print their lines

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self.close(trainer)

    def close(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsFile(Callback):
    """``metrics.jsonl`` in the output folder: one line per log step (main process)."""

    def __init__(self, path: Path, start_step: int) -> None:
        self.writer = MetricsWriter(path, start_step=start_step)

    def log_metrics(self, trainer: Trainer, record: dict) -> None:
        self.writer.write(record)


class Trackers(Callback):
    """TensorBoard and W&B (``--report-to``), closed within what the exit has left."""

    def __init__(self, trainer: Trainer) -> None:
        self.trackers = open_trackers(trainer.config, trainer.state, trainer.engine,
                                      trainer.output_dir / "logs" / trainer.config.run_name,
                                      trainer.output_dir)

    def log_metrics(self, trainer: Trainer, record: dict) -> None:
        self.log(trainer, record)

    def log(self, trainer: Trainer, record: dict) -> None:
        """``record`` (flat or nested numbers) at its step, main process only."""
        if trainer.main:
            self.trackers.log(record, record["step"])

    def flush(self) -> None:
        if self.trackers is not None:
            self.trackers.flush()

    def close(self, trainer: Trainer) -> None:
        if trainer.main:
            self.trackers.close(timeout=trainer.budget_left())


class LogMirror(Callback):
    """The logs copied to the bucket (or Vertex's log folder) in the background; never waited
    on during training, given what the exit has left at the end."""

    def __init__(self, trainer: Trainer, flush) -> None:
        self.mirror = start_log_mirror(trainer.config, trainer.store, trainer.output_dir, flush,
                                       trainer.say, resumed=trainer.state.step > 0,
                                       stopping=lambda: trainer.preemption.requested)

    @property
    def copied_to(self) -> str:
        return self.mirror.copied_to if self.mirror is not None else ""

    def close(self, trainer: Trainer) -> None:
        if self.mirror is not None:
            bound = math.inf if trainer.stopped_early else trainer.config.upload_timeout_s
            left = trainer.budget_left()
            self.mirror.close(bound if left is None else min(bound, left))


def load_callbacks(spec: str) -> list[Callback]:
    """The ``--callbacks`` classes (``path.py:Name``, comma-separated), each made with no
    arguments. They are trusted code: the file runs as this process, like a train.py edit."""
    callbacks = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        path, _, name = item.rpartition(":")
        if not path or not name:
            raise ConfigError(f"--callbacks {item!r}: give FILE.py:ClassName, e.g. "
                              f"my_callbacks.py:Heartbeat")
        callbacks.append(_load_class(Path(path), name, item)())
    return callbacks


def _load_class(path: Path, name: str, item: str) -> type:
    if not path.is_file():
        raise ConfigError(f"--callbacks {item!r}: no file {path}; give the path of a .py file")
    module_name = f"harness_callbacks_{path.stem}_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        raise ConfigError(f"--callbacks {item!r}: {path} failed to import "
                          f"({type(err).__name__}: {first_line(err)}); fix the file") from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        own = sorted(key for key, value in vars(module).items()
                     if isinstance(value, type) and value.__module__ == module_name)
        raise ConfigError(f"--callbacks {item!r}: {path} has no class {name}; classes there: "
                          f"{', '.join(own) or 'none'}")
    if not any(callable(getattr(cls, event, None)) for event in EVENTS):
        raise ConfigError(f"--callbacks {item!r}: {name} answers none of the loop's events "
                          f"({', '.join(EVENTS)}); subclass utils.loop.callbacks.Callback")
    return cls


class CallbackList:
    """The loop's callbacks in their order; ``emit`` calls an event on each that has it."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = callbacks
        self.seconds: dict[str, float] = {}  # per callback class: what it cost the run

    def emit(self, event: str, trainer: Trainer, *args) -> None:
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is None:
                continue
            started = time.perf_counter()
            method(trainer, *args)
            name = type(callback).__name__
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

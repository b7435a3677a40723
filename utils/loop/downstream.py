"""Downstream tasks on eval steps (``--eval-tasks``): accuracy the way lm-eval scores it.

The tasks, their token requests and the metrics are framework-neutral
(``utils/stages/downstream.py``); the engine runs the forward passes (``Engine.score``).
Each process scores whole examples of its own (round-robin) and the sums are added with
``engine.all_sum``, so 1 and N processes report the same numbers. The metrics go into the
log step's record as ``eval/<task>/acc``, ``eval/<task>/acc_norm`` (multiple choice) and
``eval/<task>/ppl`` (cloze), hence into metrics.jsonl, TensorBoard, W&B and
``trainer.latest`` (the end-of-run summary's last values).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from utils.errors import ConfigError
from utils.loop.callbacks import Callback
from utils.stages.downstream import (
    build_requests,
    cost_line,
    evaluate_task,
    load_task,
    task_files,
)
from utils.stages.tokenizers import load_tokenizer, tokenizer_dir

if TYPE_CHECKING:
    from utils.loop.trainer import Trainer


class DownstreamEval(Callback):
    """``--eval-tasks`` scored on eval steps (and once before the first step of a fresh run,
    the baseline a rising accuracy is read against)."""

    def __init__(self, trainer: Trainer) -> None:
        config = trainer.config
        self.tasks = [load_task(path, config.eval_task_examples)
                      for path in task_files(config.eval_tasks)]
        folder = tokenizer_dir(trainer.task.meta, Path(config.data_dir))
        if folder is None:
            raise ConfigError("--eval-tasks needs the data's tokenizer to encode the tasks, "
                              "but the data's dataset.json names none; prepare the data with "
                              "data/prepare.py (it records its tokenizer)")
        tokenizer = load_tokenizer(folder)
        prefix = (tokenizer.bos_token_id if tokenizer.bos_token_id is not None
                  else tokenizer.eos_token_id)  # an empty context, as lm-eval
        self.pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                       else tokenizer.eos_token_id)

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        self.requests = [build_requests(task, encode, prefix, config.seq_len)
                         for task in self.tasks]
        # A batch pads to at most the tokens of a training micro-batch (no activations kept).
        self.token_budget = config.per_device_train_batch_size * config.seq_len
        self.done_at: int | None = None
        trainer.say(f"downstream eval: {cost_line(self.tasks, self.requests)}; every "
                    f"{config.eval_steps} steps, at the last and before the first")

    def pre_train(self, trainer: Trainer) -> None:
        if trainer.state.step == 0 and self.done_at != 0:
            trainer.log_metrics({"step": 0, **self.evaluate(trainer)})

    def log_metrics(self, trainer: Trainer, record: dict) -> None:
        if trainer.due(trainer.config.eval_steps) and self.done_at != record["step"]:
            record.update(self.evaluate(trainer))

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Every task's metrics (collective: every process calls it at the same step)."""
        engine, started, metrics = trainer.engine, time.perf_counter(), {}
        with engine.evaluating():
            for task, requests in zip(self.tasks, self.requests, strict=True):
                metrics.update(evaluate_task(task, requests, engine.score, engine.all_sum,
                                             self.pad_id, engine.process_index,
                                             engine.num_processes, self.token_budget))
        self.done_at = trainer.state.step
        shown = ", ".join(f"{key[5:]} {value:.3f}" for key, value in metrics.items())
        trainer.say(f"downstream eval at step {trainer.state.step}: {shown} "
                    f"({time.perf_counter() - started:.1f} s)")
        return metrics

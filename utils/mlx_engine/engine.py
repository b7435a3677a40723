"""The MLX engine: mlx-lm's GPT-NeoX (or LoRA on it), fp32 master weights, compiled steps.

The same configs, data, schedule and checkpoint folders as the torch engine; data parallel
over ``mlx.launch`` ranks on one machine (``dist.py``). Trainable parameters are an explicit
fp32 tree: the model runs on a cast of them (bf16 compute), so rounding never reaches the
weights the optimizer updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from configs.model_config import (
    count_parameters,
    generation_config_for,
    hf_config_for,
    tokenizer_vocab,
)
from configs.training_config import TrainingConfig
from utils.checkpoint import TrainState
from utils.data import BatchSampler
from utils.errors import TrainingError
from utils.loop.engine import ModelInfo
from utils.loop.schedule import Schedule
from utils.mlx_engine import checkpoint_io, lora, losses
from utils.mlx_engine.dist import MlxProcesses
from utils.mlx_engine.losses import rollout_logps, to_mx
from utils.mlx_engine.model import build_model, build_optimizer, load_full_weights, save_pretrained
from utils.mlx_engine.scoring import score_batch
from utils.stages.step import eval_value, stage_loss, train_passes
from utils.stages.task import Batch, Task

DTYPES = {"no": mx.float32, "bf16": mx.bfloat16}


def compute_dtype(config: TrainingConfig) -> mx.Dtype:
    """fp32, or bf16 compute over fp32 master weights; fp16 would need a loss scaler."""
    if config.mixed_precision not in DTYPES:
        raise TrainingError(f"--mixed-precision {config.mixed_precision} is not supported by "
                            "the MLX backend (no loss scaler); use bf16 or no")
    return DTYPES[config.mixed_precision]


def cast(params: dict, dtype: mx.Dtype) -> dict:
    return params if dtype == mx.float32 else tree_map(lambda p: p.astype(dtype), params)


def keep_if(condition: mx.array, tree: dict | list, before: dict | list) -> None:
    """Where ``condition`` is false, put ``before``'s arrays back into ``tree`` (in place:
    ``mx.compile`` follows the optimizer's own state container)."""
    for key in (range(len(tree)) if isinstance(tree, list) else list(tree)):
        value = tree[key]
        if isinstance(value, dict | list):
            keep_if(condition, value, before[key])
        elif isinstance(value, mx.array):
            tree[key] = mx.where(condition, value, before[key])


@dataclass
class _Built:
    """A stage's model and how its checkpoint weights are written and read."""

    model: nn.Module
    hf_config: dict
    write_weights: Callable[[dict, Path], None]  # (trainable fp32 params, checkpoint folder)
    read_weights: Callable[[Path], None]         # a checkpoint's weights into the model


def _pretrain_model(config: TrainingConfig, task: Task) -> _Built:
    hf_config = hf_config_for(config.model, task.meta)
    model = build_model(hf_config.to_dict(), config.seed)
    generation = generation_config_for(hf_config, tokenizer_vocab(config.model, task.meta))

    def write(params: dict, folder: Path) -> None:
        save_pretrained(params, hf_config, folder)
        generation.save_pretrained(folder)  # as torch's save_pretrained writes it

    return _Built(model, hf_config.to_dict(), write, partial(load_full_weights, model))


def _lora_model(config: TrainingConfig, task: Task, dtype: mx.Dtype) -> _Built:
    """A frozen (optionally 4/8-bit) base with LoRA adapters, as peft does on torch."""
    model, hf_config = lora.load_base(task.base_path)
    task.check_vocab(model.args.vocab_size)
    if dtype != mx.float32:
        model.set_dtype(dtype)  # the frozen base computes in dtype; adapters stay fp32
    if config.quantize_bits:
        lora.quantize_base(model, config.quantize_bits)
    mx.random.seed(config.seed)  # the adapters' initialisation
    lora.apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout,
                    config.lora_targets)
    return _Built(model, hf_config,
                  partial(lora.save_adapter, r=config.lora_r, alpha=config.lora_alpha,
                          dropout=config.lora_dropout, targets=config.lora_targets,
                          base=task.base_path),
                  partial(lora.load_adapter, model))


class MlxEngine(MlxProcesses):
    """``utils.loop.engine.Engine`` over MLX (the ranks come from ``MlxProcesses``);
    ``utils.stages.step.StepEngine`` for the stage's side of a step."""

    def __init__(self, config: TrainingConfig) -> None:
        super().__init__()
        self.config = config
        self.dtype = compute_dtype(config)
        self.where = f"mlx on {mx.default_device()} x {self.num_processes} process(es)"
        self.accelerated = mx.default_device() == mx.gpu

    def setup(self, task: Task, config: TrainingConfig) -> ModelInfo:
        self.config = config
        np.random.seed(config.seed)
        built = (_pretrain_model(config, task) if task.base_path is None
                 else _lora_model(config, task, self.dtype))
        self.model, self.built = built.model, built
        self.model.train()
        self.params = self.model.trainable_parameters()
        self.optimizer = build_optimizer(config.learning_rate, config.weight_decay,
                                         (config.adam_beta1, config.adam_beta2),
                                         config.adam_epsilon)
        self.optimizer.init(self.params)  # the LR is set by hand each step
        self.schedule = Schedule.of(config)
        self.task = task
        self.loss = stage_loss(losses, task.stage, config.dpo_beta, grpo_beta=config.grpo_beta,
                               grpo_epsilon=config.grpo_epsilon,
                               grpo_temperature=config.grpo_temperature)
        self._step_fns: tuple[Callable, Callable] | None = None  # after a resume: see _fns
        self._grads: dict | None = None  # summed over a pass's micro-batches
        self.reset_interval()
        total, non_embedding = count_parameters(built.hf_config)
        args = self.model.args
        bits = f", {config.quantize_bits}-bit base" if config.quantize_bits else ""
        return ModelInfo(
            total, non_embedding, sum(p.size for _, p in tree_flatten(self.params)),
            args.num_hidden_layers, args.hidden_size, args.vocab_size,
            config.peak_tflops * 1e12 or None,
            f"mlx on {mx.default_device()}, mixed precision {config.mixed_precision}, "
            f"compile {config.compile}{bits}")

    def batches(self, task: Task, sampler: BatchSampler) -> Iterator[Batch]:
        for indices in sampler:
            yield task.collate([task.examples[i] for i in indices])

    # ------------------------------------------------------------------ steps

    def _fns(self) -> tuple[Callable, Callable]:
        """(loss_and_grads(params, batch), update(params, summed_grads) -> (params, norm)).

        Built at the first step, after a resume restored the optimizer state: ``mx.compile``
        captures that state (moments, step, LR) and the random state (LoRA dropout) as
        implicit inputs and outputs, so both can still be set from Python.
        """
        if self._step_fns is None:
            config, model, optimizer = self.config, self.model, self.optimizer

            def loss_of(params: dict, batch: dict) -> tuple[mx.array, dict]:
                model.update(cast(params, self.dtype))
                return self.loss(model, batch)

            def update(params: dict, grads: dict) -> tuple[dict, mx.array]:
                """A non-finite gradient norm keeps the weights and the optimizer state as
                they were (``mx.where`` on every array: no branch, no host read)."""
                grads = tree_map(lambda g: g / config.gradient_accumulation_steps, grads)
                grads, grad_norm = optim.clip_grad_norm(grads, config.max_grad_norm)
                finite = mx.isfinite(grad_norm)
                before = tree_map(lambda x: x, optimizer.state)
                updated = optimizer.apply_gradients(grads, params)
                keep_if(finite, optimizer.state, before)
                return tree_map(lambda new, old: mx.where(finite, new, old), updated,
                                params), grad_norm

            loss_and_grads = mx.value_and_grad(loss_of)
            self._step_fns = (loss_and_grads, update)
            if config.compile:
                state = optimizer.state
                self._step_fns = (
                    mx.compile(loss_and_grads, inputs=[mx.random.state],
                               outputs=[mx.random.state]),
                    mx.compile(update, inputs=state, outputs=state))
        return self._step_fns

    def train_step(self, micro_batches: list[Batch], step: int,
                   target_count: float | None = None) -> None:
        """Accumulate, average over processes, clip, update; GRPO with ``--grpo-epochs E``:
        E such updates over one rollout (the learning rate is the step's for all of them)."""
        self.optimizer.learning_rate = self.schedule.lr(step)
        train_passes(self, self.task, micro_batches, target_count,
                     before=partial(self._seed, step, len(micro_batches)))

    def _seed(self, step: int, accum: int, micro: int, rerun: int) -> None:
        """Dropout masks (and GRPO's samples) are a function of (seed, step, micro-batch,
        pass): resume repeats them."""
        mx.random.seed(self.config.seed + self.process_index + 100_003 * (
            step * accum + micro + 1) + 7_919 * rerun)

    def read_interval(self) -> tuple[dict[str, float], float]:
        keys = list(self._sums)
        sums = self.all_sum([self._sums[k] for k in keys])
        means = {k: v / self.num_processes for k, v in zip(keys, sums, strict=True)}
        means["skipped_steps"], means["skip_run"] = float(self._skipped), float(self._longest)
        return means, float(self._grad_norm.item())

    def reset_interval(self) -> None:
        self._sums: dict[str, float] = {"loss": 0.0}
        self._pending: dict[str, float] = {}  # this update's, until it is kept
        self._grad_norm = mx.array(0.0)
        self._skipped = 0
        self._run = getattr(self, "_run", 0)  # consecutive skipped updates, across intervals
        self._longest = self._run

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Dropout off, the current weights in the compute dtype."""
        self.model.update(cast(self.params, self.dtype))
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    def eval_loss(self, batch: Batch) -> float:
        return eval_value(self, self.task, batch)

    # ------------------------------------------------------------------ StepEngine

    def on_device(self, rows: Batch, target_count: float | None = None) -> dict[str, mx.array]:
        batch = to_mx(rows)
        if target_count is not None:
            batch["target_count"] = mx.array(target_count, mx.float32)
        return batch

    def accumulate(self, batch: dict[str, mx.array], divisor: int) -> None:
        loss_and_grads, _ = self._fns()
        (loss, extras), grads = loss_and_grads(self.params, batch)
        self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
        mx.eval(loss, extras, self._grads)  # one micro-batch's activations alive at a time
        for key, value in {"loss": loss, **extras}.items():
            self._pending[key] = self._pending.get(key, 0.0) + value.item() / divisor

    def update(self) -> None:
        """One update, skipped inside ``update`` when the gradient norm is not finite; the
        norm is read here only because MLX has just evaluated it (no extra wait)."""
        _, update = self._fns()
        grads, self._grads = self._grads, None
        self.params, self._grad_norm = update(self.params, self.average_gradients(grads))
        mx.eval(self.params, self._grad_norm, self.optimizer.state)
        skipped = not math.isfinite(self._grad_norm.item())
        if not skipped:  # a skipped update's loss is not averaged in
            for key, value in self._pending.items():
                self._sums[key] = self._sums.get(key, 0.0) + value
        self._pending = {}
        self._skipped += skipped
        self._run = self._run + 1 if skipped else 0
        self._longest = max(self._longest, self._run)

    def batch_loss(self, rows: Batch) -> float:
        loss, _ = self.loss(self.model, self.on_device(rows))
        return loss.item()

    def add_stats(self, stats: dict[str, float], divisor: int) -> None:
        for key, value in stats.items():
            self._sums[key] = self._sums.get(key, 0.0) + value / divisor

    def fixed_logps(self, batch: dict[str, mx.array]) -> dict[str, mx.array]:
        return rollout_logps(self.model, batch, self.config.grpo_beta,
                             self.config.grpo_temperature)

    def generate(self, prompts: Batch, sample: bool) -> np.ndarray:
        """mlx-lm's ``generate_step``, prompt by prompt (its unpadded tokens), each completion
        stopping at its first EOS."""
        spec = self.task.sampling
        sampler = make_sampler(spec.temperature if sample else 0.0)
        rows: list[list[int]] = []
        for ids, mask in zip(prompts["input_ids"], prompts["attention_mask"], strict=True):
            prompt = mx.array(ids[mask.astype(bool)])
            for _ in range(spec.group_size if sample else 1):
                tokens: list[int] = []
                for token, _ in generate_step(prompt, self.model,
                                              max_tokens=spec.max_new_tokens, sampler=sampler):
                    tokens.append(token)
                    if token == spec.eos_id:
                        break
                rows.append(tokens)
        out = np.full((len(rows), max(1, max(len(r) for r in rows))), spec.pad_id, np.int64)
        for row, tokens in zip(out, rows, strict=True):
            row[:len(tokens)] = tokens
        return out

    # ------------------------------------------------------------------ checkpoints

    def snapshot(self, state: TrainState, config_dict: dict,
                 root: Path) -> checkpoint_io.WrittenSnapshot | None:
        """MLX writes the files here, before training continues: its evaluation is not
        thread-safe (ml-explore/mlx#2133; ``save_safetensors`` evaluates internally), so a
        background thread must not touch MLX arrays. Hashing and uploading stay in the
        background. Rank 0 writes the weights every rank holds."""
        if not self.is_main_process:
            return None
        return checkpoint_io.WrittenSnapshot(checkpoint_io.save_checkpoint(
            lambda folder: self.built.write_weights(self.params, folder), self.optimizer,
            state, config_dict, root))

    def load(self, ckpt_dir: Path) -> TrainState:
        """The checkpoint's weights and optimizer state; a run of skipped updates ends here
        (a rollback's new start)."""
        self._run = 0
        self.params, saved = checkpoint_io.load_checkpoint(
            self.model, self.optimizer, ckpt_dir, self.built.read_weights)
        return saved

    def memory_gib(self) -> float:
        return mx.get_peak_memory() / 2**30

    def merge(self, ckpt_dir: Path, out_dir: Path) -> Path:
        return lora.merge_adapter(ckpt_dir, out_dir)

    def finish(self) -> None:
        return None

    def explain(self, err: Exception) -> str | None:
        return None  # MLX's ring backend has no error of its own for a lost peer to name

    # ------------------------------------------------------------------ downstream tasks

    def score(self, batch: dict[str, np.ndarray]) -> list[tuple[float, bool, int]]:
        """Log-likelihood rows of downstream tasks (``utils.stages.downstream``), inside
        ``evaluating()`` (the current weights, cast); this process's rows only."""
        return score_batch(self.model, batch)

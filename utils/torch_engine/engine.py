"""The torch engine: accelerate's processes, a GPT-NeoX (or LoRA on one), AdamW, checkpoints.

One GPU, DDP, FSDP and several machines all come from accelerate (``accelerate launch``,
``./start_training.sh``); ``torch.compile`` wraps the model after ``accelerator.prepare()``.
Loss and stage metrics stay on the device between log steps, so the loop adds no host sync
to a training step.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    InitProcessGroupKwargs,
    extract_model_from_parallel,
    set_seed,
)

from configs.model_config import count_parameters, hf_config_for
from configs.training_config import TrainingConfig
from utils.checkpoint import TrainState
from utils.data import BatchSampler
from utils.errors import ConfigError, TrainingError
from utils.loop.engine import ModelInfo
from utils.loop.schedule import Schedule
from utils.stages.step import eval_value, stage_loss, train_passes
from utils.stages.task import Batch, Task
from utils.torch_engine import checkpoint_io, lora, losses
from utils.torch_engine.compiling import compile_model
from utils.torch_engine.fp8 import fp8_unavailable, to_float8
from utils.torch_engine.loader import make_torch_loader
from utils.torch_engine.losses import rollout_logps
from utils.torch_engine.micro_batch import BUDGET, Dims, MicroBatch, by_estimate, probe, regroup
from utils.torch_engine.model import (
    build_model,
    compile_unavailable,
    device_memory_gib,
    device_peak_flops,
    memory_gib,
)
from utils.torch_engine.optim import build_adamw
from utils.torch_engine.peers import lost_peer
from utils.torch_engine.scoring import score_batch, scoring_model


def _cpu_processes() -> bool:
    """True for a multi-process launch on a machine without CUDA.

    ``accelerate launch --multi_gpu`` and ``torchrun`` start N processes, but with no GPU
    accelerate leaves each one alone (world size 1, every rank "main", all writing the same
    files) unless told to use the CPU; then it joins them with gloo.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


class TorchEngine:
    """``utils.loop.engine.Engine`` over accelerate; ``utils.stages.step.StepEngine`` for the
    stage's side of a step (what to sample, score and train on, in which order)."""

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config
        self.accelerator = Accelerator(
            cpu=_cpu_processes(), mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            step_scheduler_with_optimizer=False,  # stepped by hand, once per optimizer step
            kwargs_handlers=[InitProcessGroupKwargs(
                timeout=timedelta(minutes=config.collective_timeout_minutes))])
        acc = self.accelerator
        if (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
                and acc.distributed_type != DistributedType.FSDP):
            raise TrainingError(
                f"FSDP was requested (--fsdp / fsdp.yaml) but accelerate set up "
                f"{acc.distributed_type.value} on {acc.device.type}: it runs FSDP on GPUs only "
                f"and would train unsharded; drop --fsdp here, or launch on GPUs")
        self.device = acc.device
        self.process_index, self.num_processes = acc.process_index, acc.num_processes
        self.is_main_process = acc.is_main_process
        self.is_local_main_process = acc.is_local_main_process
        self.where = f"{self.num_processes} process(es)"
        if self.num_processes > 1:  # each rank says where it runs (job logs show every rank)
            print(f"process {self.process_index} of {self.num_processes} on "
                  f"{socket.gethostname()}: {self.device}", flush=True)
        self.accelerated = self.device.type != "cpu"
        reason = fp8_unavailable(self.device) if config.fp8 else None
        if reason:  # before any data is read or synced
            raise ConfigError(f"--fp8 cannot run here: {reason}; drop --fp8")
        self._compiling = False  # compiled, first step not yet run: its time is reported
        self._probe_s = 0.0  # the micro-batch probe's time (it compiles the layers first)
        self.split: MicroBatch | None = None  # --per-device-train-batch-size auto's choice

    # ------------------------------------------------------------------ processes

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_sum(self, values: list[float]) -> list[float]:
        if self.num_processes == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(total, reduction="sum").tolist()

    def all_sum_later(self, values: list[float]) -> Callable[[], list[float]]:
        """An async all-reduce; on CUDA its result is copied to pinned host memory behind an
        event, so neither starting nor (a step later) reading it stalls the GPU's queue."""
        if self.num_processes == 1:
            return lambda: values
        cuda = self.device.type == "cuda"
        total = torch.tensor(values, dtype=torch.float64, pin_memory=cuda).to(
            self.device, non_blocking=True)
        work = dist.all_reduce(total, async_op=True)
        if not cuda:  # gloo: the work completes on its own threads
            return lambda: (work.wait(), total.tolist())[1]
        work.wait()  # on CUDA this only orders the current stream after the all-reduce
        host = torch.empty_like(total, device="cpu", pin_memory=True)
        host.copy_(total, non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record()
        return lambda: (arrived.synchronize(), host.tolist())[1]

    def broadcast_object(self, values: list) -> list:
        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list(values, src=0)
        return values

    # ------------------------------------------------------------------ model

    def setup(self, task: Task, config: TrainingConfig) -> ModelInfo:
        """Model, AdamW and schedule for the stage; prepare() first, then compile."""
        self.config, acc = config, self.accelerator
        if config.fp8 and task.base_path is not None:
            raise ConfigError("--fp8 trains the base model's linear layers, not LoRA adapters; "
                              "drop --fp8 for this stage")
        acc.free_memory()  # a previous curriculum stage's model and optimizer
        set_seed(config.seed)
        if task.base_path is None:
            hf_config = hf_config_for(config.model, task.meta)
            model = build_model(config, task.meta)
            if config.fp8:  # before the optimizer and prepare(), as torchao asks
                self.accelerator.print(f"fp8: {to_float8(model)} linear layers train in float8")
        else:
            base = lora.load_base(task.base_path)
            task.check_vocab(base.config.vocab_size)
            hf_config = base.config
            model = lora.build_lora_model(base, config, task.base_path)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        optimizer = build_adamw(model.to(self.device), config.learning_rate,
                                config.weight_decay, (config.adam_beta1, config.adam_beta2),
                                config.adam_epsilon)
        self.schedule = Schedule.of(config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(  # kept: checkpoints hold its state
            optimizer, lambda step: self.schedule.factor(step))
        model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.model, compiled = self._compiled(model) if config.compile else (model, "off")
        self.model.train()
        self.task = task
        self.loss = stage_loss(losses, task.stage, config.dpo_beta, grpo_beta=config.grpo_beta,
                               grpo_epsilon=config.grpo_epsilon,
                               grpo_temperature=config.grpo_temperature)
        self.staging = checkpoint_io.HostStaging()  # this stage's model: its own buffers
        self.reset_interval()
        self.split = self._micro_batch(task, config, Dims(
            trainable, hf_config.num_hidden_layers, hf_config.hidden_size, hf_config.vocab_size))
        total, non_embedding = count_parameters(hf_config)
        return ModelInfo(
            total, non_embedding, trainable, hf_config.num_hidden_layers, hf_config.hidden_size,
            hf_config.vocab_size, device_peak_flops(self.device, config.peak_tflops),
            f"torch on {self.device}, mixed precision {config.mixed_precision}, "
            f"compile {compiled}" + (f"; micro-batch {self.split.size} x "
                                     f"{self.split.accumulation} accumulation (auto: "
                                     f"{self.split.how})" if self.split else ""))

    def _micro_batch(self, task: Task, config: TrainingConfig, dims: Dims) -> MicroBatch | None:
        """``--per-device-train-batch-size auto`` (pretraining): the split each step runs,
        the step's sequences unchanged (``utils.torch_engine.micro_batch``). A CUDA device
        is probed from the estimate's choice down (FSDP, whose forward gathers weights
        collectively, and other devices take the estimate)."""
        if not config.auto_micro_batch or task.stage != "pretrain" or task.base_path:
            return None
        sequences = config.per_device_train_batch_size * config.gradient_accumulation_steps
        memory = device_memory_gib(self.device)
        chosen = by_estimate(dims, sequences, config.seq_len, config.mixed_precision != "no",
                             config.loss_chunk_tokens, memory)
        if (self.device.type == "cuda"
                and self.accelerator.distributed_type != DistributedType.FSDP):
            first, started = chosen.size, time.perf_counter()
            chosen = probe(partial(self._fits, config.seq_len, sequences, dims.params, memory),
                           sequences, first, self.accelerator.print, memory)
            if chosen.size != first:  # layers compiled for a size tried and given up
                torch._dynamo.reset()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._probe_s = time.perf_counter() - started
        self.accelerator.gradient_accumulation_steps = chosen.accumulation
        return chosen

    def _fits(self, seq_len: int, sequences: int, params: int, memory: float,
              size: int) -> bool:
        """Whether a micro-batch of ``size`` trains within the budget on every process: its
        forward and backward (twice where the step accumulates, so gradients are alive as in
        the later micro-batches) beside room for AdamW's moments; no RNG drawn, no weight
        changed, the gradients dropped after."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        held: list[torch.Tensor] = []
        try:
            held.append(torch.empty(8 * params, dtype=torch.uint8, device=self.device))
            ids = torch.zeros((size, seq_len + 1), dtype=torch.long, device=self.device)
            with self.accelerator.no_sync(self.model):
                for _ in range(1 if size == sequences else 2):
                    self.loss(self.model, {"input_ids": ids})[0].backward()
            ok = torch.cuda.max_memory_allocated(self.device) <= BUDGET * memory * 2**30
        except torch.cuda.OutOfMemoryError:
            ok = False
        held.clear()
        self.model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return self.all_sum([0.0 if ok else 1.0])[0] == 0

    def _compiled(self, model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
        reason = compile_unavailable(self.device)
        if reason:
            self.accelerator.print(f"torch.compile unavailable ({reason}); running eager")
            return model, "off"
        self._compiling = True  # compiling happens in the first step (or the probe)
        return compile_model(model, self.config.compile_scope)

    def batches(self, task: Task, sampler: BatchSampler) -> Iterator[Batch]:
        loader = make_torch_loader(task.examples, sampler, task.collate, self.config.num_workers,
                                   self.config.prefetch_factor,
                                   pin_memory=self.device.type == "cuda")
        return iter(loader)

    # ------------------------------------------------------------------ steps

    def train_step(self, micro_batches: list[dict], step: int,
                   target_count: float | None = None) -> None:
        """Accumulate over the micro-batches (DDP syncs on the last), clip, step; GRPO with
        ``--grpo-epochs E`` makes E such updates over one rollout (``train_passes``), the
        schedule still counts loop steps. ``step`` sets the step's learning rate (the
        scheduler would set the same, but not a rollback's calm on its first step: the
        optimizer state loaded with the checkpoint holds the rate from before); the RNG
        states carry the rest."""
        started = time.perf_counter()
        for group in self.optimizer.param_groups:  # the step's rate, a rollback's calm included
            group["lr"] = group["initial_lr"] * self.schedule.factor(step)
        if self.split is not None:  # auto: the step's rows in the micro-batches that fit
            micro_batches = regroup(micro_batches, self.split.accumulation)
        train_passes(self, self.task, micro_batches, target_count)
        self.scheduler.step()
        if self._compiling:
            self._report_compile_time(started)

    def _report_compile_time(self, step_started: float) -> None:
        """Once: the first step's time, nearly all of it compiling (synchronised to be true),
        and the start-up probe's, which compiles first where it runs."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        probed = f", the micro-batch probe before it {self._probe_s:.1f} s" if self._probe_s else ""
        self.accelerator.print(f"torch.compile: the first step took "
                               f"{time.perf_counter() - step_started:.1f} s"
                               f"{probed} (compiling included)")
        self._compiling = False

    def read_interval(self) -> tuple[dict[str, float], float]:
        means = {k: self.accelerator.reduce(v, reduction="mean").item()
                 for k, v in self._sums.items()}
        means["skipped_steps"] = float(self._skipped)  # the same on every process
        means["skip_run"] = float(self._longest_run)
        return means, float(self._grad_norm)

    def reset_interval(self) -> None:
        zero = partial(torch.zeros, (), device=self.device)
        self._sums: dict[str, torch.Tensor] = {"loss": zero()}
        self._pending: dict[str, torch.Tensor] = {}  # this update's, until it is kept
        self._grad_norm = zero()
        self._skipped = zero(dtype=torch.int64)
        # Consecutive skipped updates: the current run carries over from the last interval.
        self._run = getattr(self, "_run", zero(dtype=torch.int64))
        self._longest_run = self._run.clone()

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train()

    def eval_loss(self, batch: Batch) -> float:
        return eval_value(self, self.task, batch)

    # ------------------------------------------------------------------ StepEngine

    def on_device(self, rows: dict, target_count: float | None = None) -> dict[str, torch.Tensor]:
        batch = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v).to(
            self.device, non_blocking=True) for k, v in rows.items()}
        if target_count is not None:
            batch["target_count"] = torch.tensor(target_count, device=self.device)
        return batch

    def accumulate(self, batch: dict[str, torch.Tensor], divisor: int) -> None:
        """Loss and metrics stay on the device (summed there): no host sync per step."""
        with self.accelerator.accumulate(self.model):
            loss, extras = self.loss(self.model, batch)
            self.accelerator.backward(loss)
        for key, value in {"loss": loss, **extras}.items():
            self._pending[key] = self._pending.get(key, 0.0) + value.detach() / divisor

    def update(self) -> None:
        """Clip and step, unless the gradient norm is not finite: then the fused AdamW kernel
        skips the update on the device (``found_inf``, as a GradScaler sets it: weights,
        moments and step count untouched). The norm is global (gradients are averaged over
        processes first), so every process decides alike, and nothing is read on the host."""
        self._grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(),
                                                           self.config.max_grad_norm)
        bad = ~torch.isfinite(self._grad_norm)
        self.optimizer.optimizer.found_inf = bad.float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for key, value in self._pending.items():  # a skipped update's loss is not averaged in
            self._sums[key] = self._sums.get(key, 0.0) + torch.where(bad, 0.0, value)
        self._pending = {}
        self._skipped += bad
        self._run = torch.where(bad, self._run + 1, 0)
        self._longest_run = torch.maximum(self._longest_run, self._run)

    def batch_loss(self, rows: Batch) -> float:
        loss, _ = self.loss(self.model, self.on_device(rows))
        return loss.item()

    def add_stats(self, stats: dict[str, float], divisor: int) -> None:
        """On the device, like the loss, so reading the interval reduces them together."""
        for key, value in stats.items():
            self._sums[key] = self._sums.get(key, 0.0) + torch.tensor(
                value / divisor, dtype=torch.float32, device=self.device)

    def fixed_logps(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rollout_logps(self.model, batch, self.config.grpo_beta,
                             self.config.grpo_temperature)

    def generate(self, prompts: Batch, sample: bool) -> np.ndarray:
        """transformers' ``generate`` on the unwrapped model (eval mode and no_grad come
        from ``evaluating()``), the torch RNG (restored on resume) drawing."""
        spec = self.task.sampling
        model = extract_model_from_parallel(self.model, keep_torch_compile=False)
        ids = torch.from_numpy(prompts["input_ids"]).to(self.device)
        options = dict(do_sample=True, temperature=spec.temperature, top_k=0, top_p=1.0,
                       num_return_sequences=spec.group_size) if sample else dict(
            do_sample=False, num_return_sequences=1)
        out = model.generate(
            input_ids=ids, attention_mask=torch.from_numpy(prompts["attention_mask"]).to(
                self.device), max_new_tokens=spec.max_new_tokens, pad_token_id=spec.pad_id,
            eos_token_id=spec.eos_id, **options)
        return out[:, ids.shape[1]:].cpu().numpy()

    # ------------------------------------------------------------------ checkpoints

    def snapshot(self, state: TrainState, config_dict: dict,
                 root: Path) -> checkpoint_io.Snapshot | None:
        return checkpoint_io.take_snapshot(self.accelerator, self.model, self.optimizer,
                                           self.scheduler, state, config_dict, root,
                                           self.staging)

    def load(self, ckpt_dir: Path) -> TrainState:
        """The checkpoint's weights, optimizer, schedule and RNG; a run of skipped updates
        ends here (a rollback's new start)."""
        self._run = torch.zeros((), dtype=torch.int64, device=self.device)
        return checkpoint_io.load_checkpoint(self.accelerator, self.model, self.optimizer,
                                             self.scheduler, ckpt_dir)

    def memory_gib(self) -> float:
        return memory_gib(self.device)

    def merge(self, ckpt_dir: Path, out_dir: Path) -> Path:
        return lora.merge_adapter(ckpt_dir, out_dir)

    def finish(self) -> None:
        self.accelerator.end_training()

    def explain(self, err: Exception) -> str | None:
        return lost_peer(err) if self.num_processes > 1 else None

    # ------------------------------------------------------------------ downstream tasks

    def score(self, batch: dict[str, np.ndarray]) -> list[tuple[float, bool, int]]:
        """Log-likelihood rows of downstream tasks (``utils.stages.downstream``), inside
        ``evaluating()``; this process's rows only."""
        return score_batch(scoring_model(self.model, self.accelerator.distributed_type), batch,
                           self.device)

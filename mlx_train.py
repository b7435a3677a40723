"""Pretrain GPT-NeoX with MLX: train.py's loop step for step, on mlx-lm's gpt_neox model.

    python mlx_train.py --config smoke                   # same flags as train.py
    python train.py --backend mlx --config smoke         # the same run through train.py

Everything that is not framework-specific is train.py's own: presets and flags, data shards,
windows and sampler, LR schedule, metrics, checkpoint layout and marker, background upload,
resume target resolution, preemption. Checkpoints load in either backend (``utils/mlx_model``).
One process: MLX's distributed training is not wired in yet.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from tqdm.auto import tqdm

from configs.cli import parse_args
from configs.model_config import MODEL_SIZES, to_hf_config
from configs.training_config import TrainingConfig
from train import (
    TrainingError,
    _flat,
    _tokenizer_dir,
    open_checkpoint_store,
    resolve_resume,
    sync_training_data,
)
from utils.checkpoint import CheckpointError, TrainState
from utils.data_utils import (
    DataError,
    TokenWindows,
    WindowBatchSampler,
    find_shards,
    read_dataset_meta,
    train_eval_split,
)
from utils.lr_schedule import lr_factor
from utils.metrics import (
    MetricsWriter,
    ThroughputMeter,
    flops_per_token,
    format_eta,
    run_summary,
)
from utils.mlx_model import (
    DTYPES,
    build_model,
    build_optimizer,
    load_checkpoint,
    reexec_with_openblas,
    save_checkpoint,
)
from utils.signals import PreemptionHandler
from utils.storage import StorageError
from utils.uploader import CheckpointPublisher


class _OneProcess:
    """The part of an Accelerator that train.py's data-sync and resume helpers use."""

    is_main_process = is_local_main_process = True

    def wait_for_everyone(self) -> None:
        """One process: nobody to wait for."""


# ------------------------------------------------------------------ building blocks

def compute_dtype(config: TrainingConfig) -> mx.Dtype:
    """fp32, or bf16 compute over fp32 master weights; fp16 would need a loss scaler."""
    if config.mixed_precision not in DTYPES:
        raise TrainingError(f"--mixed-precision {config.mixed_precision} is not supported by "
                            "the MLX backend (no loss scaler); use bf16 or no")
    return DTYPES[config.mixed_precision]


def causal_lm_loss(model: nn.Module, batch: mx.array) -> mx.array:
    """Next-token cross-entropy over a window of seq_len+1 tokens (fp32 logits for stability)."""
    logits = model(batch[:, :-1]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, batch[:, 1:], reduction="mean")


def cast(params: dict, dtype: mx.Dtype) -> dict:
    return params if dtype == mx.float32 else tree_map(lambda p: p.astype(dtype), params)


def make_step_fns(model: nn.Module, optimizer: optim.Optimizer, config: TrainingConfig,
                  dtype: mx.Dtype) -> tuple[Callable, Callable]:
    """(loss_and_grads(params, batch), update(params, summed_grads) -> (params, grad_norm)).

    Parameters are passed explicitly (fp32 master copy; the model only runs on a cast of
    them) so bf16 compute never rounds the weights the optimizer updates. Compiled when
    ``config.compile``; the optimizer state (moments, step, learning rate) is the compiled
    update's implicit input and output, so the LR can be set from Python every step.
    """
    def loss_of(params: dict, batch: mx.array) -> mx.array:
        model.update(cast(params, dtype))
        return causal_lm_loss(model, batch)

    def update(params: dict, grads: dict) -> tuple[dict, mx.array]:
        grads = tree_map(lambda g: g / config.gradient_accumulation_steps, grads)
        grads, grad_norm = optim.clip_grad_norm(grads, config.max_grad_norm)
        return optimizer.apply_gradients(grads, params), grad_norm

    loss_and_grads = mx.value_and_grad(loss_of)
    if config.compile:
        state = optimizer.state
        return mx.compile(loss_and_grads), mx.compile(update, inputs=state, outputs=state)
    return loss_and_grads, update


def to_batch(windows: TokenWindows, indices: list[int]) -> mx.array:
    return mx.array(np.stack([windows[i] for i in indices]).astype(np.int32))


def evaluate(model: nn.Module, params: dict, windows: TokenWindows, indices: np.ndarray,
             batch_size: int, dtype: mx.Dtype) -> float:
    """Mean loss over the held-out windows."""
    model.update(cast(params, dtype))
    total = count = 0.0
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size].tolist()
        total += causal_lm_loss(model, to_batch(windows, chunk)).item() * len(chunk)
        count += len(chunk)
    return total / max(count, 1)


# ------------------------------------------------------------------ the run

def train(config: TrainingConfig) -> dict:
    output_dir = Path(config.effective_output_dir)
    if config.stage != "pretrain":
        raise TrainingError(f"the MLX backend pretrains only; run --stage {config.stage} with "
                            "--backend torch")
    dtype = compute_dtype(config)
    process = _OneProcess()
    say = print
    np.random.seed(config.seed)

    # Data: sync from the bucket (skip-existing), then fixed windows.
    sync_training_data(config, process)
    shards = find_shards(Path(config.data_dir), max_files=config.max_files or None)
    windows = TokenWindows(shards, config.seq_len, root=Path(config.data_dir))
    train_idx, eval_idx = train_eval_split(len(windows), config.eval_windows, config.seed)
    meta = read_dataset_meta(Path(config.data_dir)) or {}

    # Model (torch's config.json, mlx-lm's module), optimizer; the LR is set by hand each step.
    hf_config = to_hf_config(
        MODEL_SIZES[config.model], vocab_size=meta.get("vocab_size"),
        bos_token_id=meta.get("bos_token_id", 0), eos_token_id=meta.get("eos_token_id", 0),
        pad_token_id=meta.get("pad_token_id"))
    model = build_model(hf_config.to_dict(), config.seed)
    params = model.parameters()
    optimizer = build_optimizer(config.learning_rate, config.weight_decay,
                                (config.adam_beta1, config.adam_beta2), config.adam_epsilon)
    optimizer.init(params)

    # Checkpoints: local folder, bucket, resume; then compile (it captures the restored state).
    ckpt_root = output_dir / "checkpoints"
    store = open_checkpoint_store(config, process)
    resume_from = resolve_resume(config, process, ckpt_root, store)
    state = TrainState(num_files=len(shards), train_windows=len(train_idx), world_size=1,
                       global_batch_windows=config.per_device_train_batch_size)
    if resume_from is not None:
        params, saved = load_checkpoint(model, optimizer, resume_from)
        if (saved.num_files, saved.train_windows) != (state.num_files, state.train_windows):
            raise TrainingError(
                f"{resume_from.name} was trained on {saved.num_files} files / "
                f"{saved.train_windows} windows, this run has {state.num_files} / "
                f"{state.train_windows}: "
                f"resuming would change the data order; use the same data, --max-files and "
                f"--seq-len, or start a new --run-name")
        if saved.global_batch_windows != state.global_batch_windows:
            say(f"note: global batch changed ({saved.global_batch_windows} -> "
                f"{state.global_batch_windows} windows); data order kept by window offset")
        state.step, state.tokens_seen = saved.step, saved.tokens_seen
        state.position = saved.position
        say(f"resumed from {resume_from} at step {state.step}")
    elif config.resume:
        say("no complete checkpoint found: starting from scratch")
    loss_and_grads, update = make_step_fns(model, optimizer, config, dtype)

    sampler = WindowBatchSampler(train_idx, config.per_device_train_batch_size, 0, 1,
                                 config.seed, state.position)
    batches = iter(sampler)

    tokens_per_step = (config.per_device_train_batch_size * config.gradient_accumulation_steps
                       * config.seq_len)
    args = model.args
    total_params = sum(p.size for _, p in tree_flatten(params))
    non_embedding = total_params - 2 * args.vocab_size * args.hidden_size  # untied in and out
    meter = ThroughputMeter(
        flops_per_token(non_embedding, args.num_hidden_layers, args.hidden_size, config.seq_len,
                        output_embedding_params=args.vocab_size * args.hidden_size),
        config.peak_tflops * 1e12 or None, 1)
    say(f"model {config.model} (mlx on {mx.default_device()}, mixed precision "
        f"{config.mixed_precision}, compile {config.compile}): {total_params:,} parameters "
        f"({non_embedding:,} without embeddings), vocab {args.vocab_size}")
    say(f"batch: {config.per_device_train_batch_size} x {config.gradient_accumulation_steps} "
        f"accumulation = {config.per_device_train_batch_size * config.gradient_accumulation_steps}"
        f" sequences ({tokens_per_step:,} tokens) per optimizer step; {len(shards)} files, "
        f"{len(train_idx):,} training windows, {len(eval_idx)} held out")

    metrics = MetricsWriter(output_dir / "metrics.jsonl", start_step=state.step)
    tensorboard = _tensorboard(output_dir / "logs" / config.run_name, config)
    publisher = CheckpointPublisher(store, f"checkpoints/{config.run_name}",
                                    background=config.background_upload,
                                    keep_local=config.save_total_limit, log=say)
    preemption = PreemptionHandler()

    tokenizer_dir = _tokenizer_dir(meta, Path(config.data_dir))

    def save() -> Path:
        path = save_checkpoint(params, optimizer, hf_config, state, asdict(config), ckpt_root)
        if tokenizer_dir:  # a checkpoint is a whole HF folder: model + tokenizer
            for file in tokenizer_dir.iterdir():
                if file.is_file():
                    shutil.copy2(file, path / file.name)
        publisher.submit(path)  # the marker is written after this, covering the copies
        return path

    start_step, start_tokens, started = state.step, state.tokens_seen, time.perf_counter()
    last_loss = eval_loss = float("nan")
    interval_loss = 0.0
    interval_steps = 0
    saved_paths: list[Path] = []
    stopped_early = False
    bar = tqdm(total=config.max_steps, initial=state.step, desc="training (mlx)", unit="step",
               dynamic_ncols=True)
    meter.reset()
    try:
        while state.step < config.max_steps:
            grads = None
            for _ in range(config.gradient_accumulation_steps):
                loss, micro_grads = loss_and_grads(params, to_batch(windows, next(batches)))
                grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
                mx.eval(loss, grads)  # one micro-batch's activations alive at a time
                interval_loss += loss.item() / config.gradient_accumulation_steps
            optimizer.learning_rate = config.learning_rate * lr_factor(
                state.step, config.warmup_steps, config.max_steps, config.min_lr_ratio)
            params, grad_norm = update(params, grads)
            mx.eval(params, grad_norm, optimizer.state)
            state.step += 1
            interval_steps += 1
            state.tokens_seen += tokens_per_step
            state.position = sampler.position
            meter.add(tokens_per_step)
            bar.update(1)

            log_now = state.step % config.logging_steps == 0 or state.step == config.max_steps
            save_now = state.step % config.save_steps == 0 or state.step == config.max_steps
            stop_now = preemption.requested
            if log_now or save_now or stop_now:
                mean_loss = interval_loss / interval_steps
                if not math.isfinite(mean_loss):
                    raise TrainingError(
                        f"loss became {mean_loss} at step {state.step}: stopping without saving "
                        f"(lower --learning-rate, or check the data); the last complete "
                        f"checkpoint is still in {ckpt_root}")
            if log_now:
                last_loss = mean_loss
                # The LR of the next step, as torch's scheduler.get_last_lr() reports it.
                lr = config.learning_rate * lr_factor(state.step, config.warmup_steps,
                                                      config.max_steps, config.min_lr_ratio)
                record = {"step": state.step, "loss": mean_loss, "lr": lr,
                          "grad_norm": grad_norm.item(), "epoch": state.position.epoch,
                          "tokens_seen": state.tokens_seen, **meter.read(),
                          "memory_gib": mx.get_peak_memory() / 2**30}
                record["step_time_s"] /= interval_steps
                record["eta_s"] = record["step_time_s"] * (config.max_steps - state.step)
                if state.step % config.eval_steps == 0 or state.step == config.max_steps:
                    eval_loss = record["eval_loss"] = evaluate(
                        model, params, windows, eval_idx, config.per_device_train_batch_size,
                        dtype)
                metrics.write(record)
                for key, value in record.items():
                    if key != "step":
                        tensorboard.add_scalar(key, value, state.step)
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                eta=format_eta(record["eta_s"]))
                interval_loss = 0.0
                interval_steps = 0
                meter.reset()  # eval time is not training throughput
            if save_now or stop_now:
                saved_paths.append(save())
                meter.reset()
            if stop_now:
                stopped_early = True
                say(f"stopping at step {state.step} on request; checkpoint {saved_paths[-1].name}")
                break
    except BaseException:
        bar.close()
        say("run aborted: waiting for uploads of earlier checkpoints")
        publisher.close(timeout=config.upload_timeout_s)
        raise
    bar.close()

    elapsed = time.perf_counter() - started
    uploads_done = publisher.close(timeout=config.upload_timeout_s if stopped_early
                                   else config.final_upload_timeout_s)
    tensorboard.close()
    summary, table = run_summary(
        config=config, state=state, start_step=start_step, start_tokens=start_tokens,
        elapsed=elapsed, last_loss=last_loss, eval_loss=eval_loss, saved=saved_paths,
        uploads_done=uploads_done, stopped_early=stopped_early,
        where=f"mlx on {mx.default_device()}", ckpt_root=ckpt_root, store=store)
    say(table)
    return summary


def _tensorboard(log_dir: Path, config: TrainingConfig):
    """torch's SummaryWriter (torch is installed for the shared modules anyway)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    writer.add_text("config", str(_flat(asdict(config))))
    return writer


def run(config: TrainingConfig) -> int:
    """train() with the CLI's error contract: one line on stderr and exit status 1."""
    try:
        train(config)
    except (DataError, CheckpointError, TrainingError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv, prog="mlx_train.py")
    if args.validate:
        from utils.preflight import run_preflight

        return run_preflight(config)
    return run(config)


if __name__ == "__main__":
    reexec_with_openblas()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

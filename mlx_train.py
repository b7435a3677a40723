"""Train GPT-NeoX with MLX: train.py's loop step for step, on mlx-lm's gpt_neox model.

    python mlx_train.py --config smoke                   # same flags and presets as train.py
    python train.py --backend mlx --config smoke         # the same run through train.py
    python train.py --backend mlx --config sft           # LoRA SFT (then dpo) on a checkpoint

Everything that is not framework-specific is shared with train.py: presets and flags, data
shards, windows and sampler, the SFT/DPO data and masks, LR schedule, metrics, checkpoint
layout and marker, background upload, resume target resolution, preemption
(``utils/run_setup.py``). The stages plug in through ``utils/mlx_tasks.py`` as torch's do
through ``utils/tasks.py``; checkpoints and adapters load in either backend. Data parallel
over ``mlx.launch`` ranks on one machine (``utils/mlx_dist.py``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map
from tqdm.auto import tqdm

from configs.cli import parse_args
from configs.training_config import TrainingConfig
from utils.checkpoint import CheckpointError, TrainState, checkpoint_name
from utils.data_utils import DataError, WindowBatchSampler
from utils.lr_schedule import lr_factor
from utils.metrics import MetricsWriter, ThroughputMeter, flops_per_token, format_eta, run_summary
from utils.mlx_dist import MlxProcesses
from utils.mlx_model import (
    DTYPES,
    build_optimizer,
    load_checkpoint,
    reexec_with_openblas,
    save_checkpoint,
)
from utils.mlx_tasks import MlxTask, build_mlx_task, to_mx
from utils.run_setup import (
    TrainingError,
    check_loss,
    continue_from,
    copy_tokenizer,
    due,
    finish_uploads,
    flat_hparams,
    open_checkpoint_store,
    resolve_resume,
    sync_training_data,
    tokenizer_dir,
    uploads_survive_an_abort,
)
from utils.signals import PreemptionHandler
from utils.storage import StorageError
from utils.uploader import CheckpointPublisher

# ------------------------------------------------------------------ building blocks

def compute_dtype(config: TrainingConfig) -> mx.Dtype:
    """fp32, or bf16 compute over fp32 master weights; fp16 would need a loss scaler."""
    if config.mixed_precision not in DTYPES:
        raise TrainingError(f"--mixed-precision {config.mixed_precision} is not supported by "
                            "the MLX backend (no loss scaler); use bf16 or no")
    return DTYPES[config.mixed_precision]


def cast(params: dict, dtype: mx.Dtype) -> dict:
    return params if dtype == mx.float32 else tree_map(lambda p: p.astype(dtype), params)


def make_step_fns(task: MlxTask, optimizer: optim.Optimizer, config: TrainingConfig,
                  dtype: mx.Dtype) -> tuple[Callable, Callable]:
    """(loss_and_grads(params, batch), update(params, summed_grads) -> (params, grad_norm)).

    ``params`` are the trainable parameters (all of them when pretraining, the adapters for
    LoRA), passed explicitly as an fp32 master copy: the model only runs on a cast of them, so
    bf16 compute never rounds the weights the optimizer updates. Compiled when
    ``config.compile``; the optimizer state (moments, step, learning rate) and the random
    state (LoRA dropout) are implicit inputs and outputs, so both can be set from Python.
    """
    model = task.model

    def loss_of(params: dict, batch: dict) -> tuple[mx.array, dict]:
        model.update(cast(params, dtype))
        return task.loss(model, batch)

    def update(params: dict, grads: dict) -> tuple[dict, mx.array]:
        grads = tree_map(lambda g: g / config.gradient_accumulation_steps, grads)
        grads, grad_norm = optim.clip_grad_norm(grads, config.max_grad_norm)
        return optimizer.apply_gradients(grads, params), grad_norm

    loss_and_grads = mx.value_and_grad(loss_of)
    if config.compile:
        state = optimizer.state
        return (mx.compile(loss_and_grads, inputs=[mx.random.state], outputs=[mx.random.state]),
                mx.compile(update, inputs=state, outputs=state))
    return loss_and_grads, update


def evaluate(task: MlxTask, params: dict, batch_size: int, dtype: mx.Dtype,
             processes: MlxProcesses) -> float:
    """Mean loss over the held-out examples (dropout off), each rank scoring its share."""
    model = task.model
    model.update(cast(params, dtype))
    model.eval()
    mine = task.eval_idx[processes.process_index::processes.num_processes]
    total = count = 0.0
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size].tolist()
        loss, _ = task.loss(model, to_mx(task.collate([task.examples[i] for i in chunk])))
        total += loss.item() * len(chunk)
        count += len(chunk)
    model.train()
    return processes.mean(total) / max(processes.mean(count), 1e-9)


# ------------------------------------------------------------------ the run

def train(config: TrainingConfig) -> dict:
    output_dir = Path(config.effective_output_dir)
    dtype = compute_dtype(config)
    processes = MlxProcesses()
    main, rank, world = processes.is_main_process, processes.process_index, processes.num_processes
    say = print if main else (lambda *_, **__: None)
    np.random.seed(config.seed)

    # Data and model for this stage (pretraining windows, or SFT/DPO examples on a LoRA model),
    # after syncing the data from the bucket (skip-existing).
    sync_training_data(config, processes)
    task = build_mlx_task(config, dtype)
    model = task.model
    model.train()
    params = model.trainable_parameters()
    trainable = sum(p.size for _, p in tree_flatten(params))
    optimizer = build_optimizer(config.learning_rate, config.weight_decay,
                                (config.adam_beta1, config.adam_beta2), config.adam_epsilon)
    optimizer.init(params)  # the LR is set by hand each step

    # Checkpoints: local folder, bucket, resume; then compile (it captures the restored state).
    ckpt_root = output_dir / "checkpoints"
    store = open_checkpoint_store(config, processes)
    resume_from = resolve_resume(config, processes, ckpt_root, store,
                                 processes.broadcast_object)
    state = TrainState(num_files=task.num_files, train_windows=len(task.train_idx),
                       world_size=world,
                       global_batch_windows=config.per_device_train_batch_size * world)
    if resume_from is not None:
        params, saved = load_checkpoint(model, optimizer, resume_from, task.read_weights)
        continue_from(state, saved, resume_from, say)
    elif config.resume:
        say("no complete checkpoint found: starting from scratch")
    loss_and_grads, update = make_step_fns(task, optimizer, config, dtype)

    sampler = WindowBatchSampler(task.train_idx, config.per_device_train_batch_size, rank, world,
                                 config.seed, state.position, task.lengths)
    batches = iter(sampler)

    tokens_per_step = (state.global_batch_windows * config.gradient_accumulation_steps
                       * config.seq_len)  # at most
    args = model.args
    meter = ThroughputMeter(
        flops_per_token(task.non_embedding_params, args.num_hidden_layers, args.hidden_size,
                        config.seq_len, output_embedding_params=args.vocab_size * args.hidden_size),
        config.peak_tflops * 1e12 or None, world)
    say(f"model {config.model} (mlx on {mx.default_device()}, mixed precision "
        f"{config.mixed_precision}, compile {config.compile}"
        f"{f', {config.quantize_bits}-bit base' if config.quantize_bits else ''}): "
        f"{task.total_params:,} parameters ({task.non_embedding_params:,} without embeddings, "
        f"{trainable:,} trainable), vocab {args.vocab_size}, stage {config.stage}")
    say(f"batch: {config.per_device_train_batch_size} per process x "
        f"{config.gradient_accumulation_steps} accumulation x {world} processes = "
        f"{state.global_batch_windows * config.gradient_accumulation_steps} sequences "
        f"({tokens_per_step:,} tokens) per optimizer step; {task.num_files} files, "
        f"{len(task.train_idx):,} training examples, {len(task.eval_idx)} held out")

    # Logging, checkpoints and uploads happen on rank 0 (every rank holds the same weights).
    metrics = MetricsWriter(output_dir / "metrics.jsonl", start_step=state.step) if main else None
    tensorboard = _tensorboard(output_dir / "logs" / config.run_name, config) if main else None
    publisher = CheckpointPublisher(store if main else None, f"checkpoints/{config.run_name}",
                                    background=config.background_upload and main,
                                    keep_local=config.save_total_limit,
                                    remote_keep=config.remote_keep,
                                    exit_timeout_s=config.upload_timeout_s, log=say)
    if main:
        publisher.catch_up(ckpt_root)  # a kill may have cut the last upload short
    preemption = PreemptionHandler()
    tokenizer = tokenizer_dir(task.meta, Path(config.data_dir))

    def save() -> Path:
        if not main:  # rank 0 writes the weights every rank holds
            return ckpt_root / checkpoint_name(state)
        path = save_checkpoint(lambda folder: task.write_weights(params, folder), optimizer,
                               state, asdict(config), ckpt_root)
        copy_tokenizer(tokenizer, path)
        publisher.submit(path)  # the marker is written after this, covering the copies
        return path

    start_step, start_tokens, started = state.step, state.tokens_seen, time.perf_counter()
    last_loss = eval_loss = float("nan")
    interval_loss = 0.0
    interval_steps = 0
    interval_extras: dict[str, float] = {}
    saved_paths: list[Path] = []
    stopped_early = False
    bar = tqdm(total=config.max_steps, initial=state.step, desc="training (mlx)", unit="step",
               dynamic_ncols=True, disable=not main)
    meter.reset()
    with uploads_survive_an_abort(publisher, bar, config, say):
        while state.step < config.max_steps:
            grads = None
            step_tokens = 0
            for micro in range(config.gradient_accumulation_steps):
                rows = task.collate([task.examples[i] for i in next(batches)])
                step_tokens += task.count_tokens(rows)
                # Dropout masks are a function of (seed, step, micro-batch): resume repeats them.
                mx.random.seed(config.seed + rank + 100_003 * (
                    state.step * config.gradient_accumulation_steps + micro + 1))
                (loss, extras), micro_grads = loss_and_grads(params, to_mx(rows))
                grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
                mx.eval(loss, extras, grads)  # one micro-batch's activations alive at a time
                interval_loss += loss.item() / config.gradient_accumulation_steps
                for key, value in extras.items():
                    interval_extras[key] = interval_extras.get(key, 0.0) + (
                        value.item() / config.gradient_accumulation_steps)
            optimizer.learning_rate = config.learning_rate * lr_factor(
                state.step, config.warmup_steps, config.max_steps, config.min_lr_ratio)
            params, grad_norm = update(params, processes.average_gradients(grads))
            mx.eval(params, grad_norm, optimizer.state)
            state.step += 1
            interval_steps += 1
            state.tokens_seen += step_tokens * world
            state.position = sampler.position
            meter.add(step_tokens * world)
            bar.update(1)

            log_now = due(state.step, config.logging_steps, config.max_steps)
            save_now = due(state.step, config.save_steps, config.max_steps)
            stop_now = processes.any(preemption.requested)
            if log_now or save_now or stop_now:
                mean_loss = processes.mean(interval_loss) / interval_steps
                check_loss(mean_loss, state.step, ckpt_root)
            if log_now:
                last_loss = mean_loss
                # The LR of the next step, as torch's scheduler.get_last_lr() reports it.
                lr = config.learning_rate * lr_factor(state.step, config.warmup_steps,
                                                      config.max_steps, config.min_lr_ratio)
                record = {"step": state.step, "loss": mean_loss, "lr": lr,
                          "grad_norm": grad_norm.item(), "epoch": state.position.epoch,
                          "tokens_seen": state.tokens_seen, **meter.read(),
                          "memory_gib": mx.get_peak_memory() / 2**30,
                          **{k: processes.mean(v) / interval_steps
                             for k, v in interval_extras.items()}}
                record["step_time_s"] /= interval_steps
                record["eta_s"] = record["step_time_s"] * (config.max_steps - state.step)
                if due(state.step, config.eval_steps, config.max_steps):
                    eval_loss = record["eval_loss"] = evaluate(
                        task, params, config.per_device_train_batch_size, dtype, processes)
                if main:
                    metrics.write(record)
                    for key, value in record.items():
                        if key != "step":
                            tensorboard.add_scalar(key, value, state.step)
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                eta=format_eta(record["eta_s"]))
                interval_loss = 0.0
                interval_extras.clear()
                interval_steps = 0
                meter.reset()  # eval time is not training throughput
            if save_now or stop_now:
                saved_paths.append(save())
                meter.reset()
            if stop_now:
                stopped_early = True
                say(f"stopping at step {state.step} on request; checkpoint {saved_paths[-1].name}")
                break
    elapsed = time.perf_counter() - started
    uploads_done = finish_uploads(publisher, config, stopped_early)
    if main:
        tensorboard.close()
    if main and config.merge and config.stage != "pretrain" and not stopped_early:
        from utils.checkpoint import find_complete
        from utils.mlx_lora import merge_adapter

        merged = merge_adapter(find_complete(ckpt_root)[-1], output_dir / "merged")
        say(f"merged model (base + adapters) written to {merged}")
    summary, table = run_summary(
        config=config, state=state, start_step=start_step, start_tokens=start_tokens,
        elapsed=elapsed, last_loss=last_loss, eval_loss=eval_loss, saved=saved_paths,
        uploads_done=uploads_done, stopped_early=stopped_early,
        where=f"mlx on {mx.default_device()} x {world} process(es)", ckpt_root=ckpt_root,
        store=store)
    say(table)
    return summary


def _tensorboard(log_dir: Path, config: TrainingConfig):
    """torch's SummaryWriter (torch is installed for the shared modules anyway)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    writer.add_text("config", str(flat_hparams(asdict(config))))
    return writer


def run(config: TrainingConfig) -> int:
    """train() with the CLI's error contract: one line on stderr and exit status 1."""
    try:
        if config.topics:
            from utils.curriculum import run_curriculum

            run_curriculum(config, train)
        else:
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

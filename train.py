"""Pretrain GPT-NeoX with accelerate: parse -> build -> sync data -> loop -> save/upload -> summary.

    python train.py --config smoke                       # debug, one process
    accelerate launch train.py --config production ...   # DDP / FSDP / multi-node
    ./start_training.sh --config production --gpus 8     # the same, set up for you
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from configs.cli import parse_args
from configs.model_config import count_parameters
from configs.training_config import TrainingConfig
from utils import checkpoint
from utils.checkpoint import CheckpointError, TrainState
from utils.data_utils import (
    DataError,
    WindowBatchSampler,
    make_torch_loader,
)
from utils.lr_schedule import lr_factor
from utils.metrics import (
    MetricsWriter,
    ThroughputMeter,
    device_peak_flops,
    flops_per_token,
    format_eta,
    memory_gib,
    run_summary,
)
from utils.modeling import compile_unavailable
from utils.optim import build_adamw
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
from utils.tasks import Task, build_task
from utils.uploader import CheckpointPublisher


@torch.no_grad()
def evaluate(model, task: Task, batch_size: int, accelerator: Accelerator) -> float:
    """Mean loss over this rank's share of the held-out examples, averaged over all ranks."""
    model.eval()
    mine = task.eval_idx[accelerator.process_index::accelerator.num_processes]
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        batch = task.collate([task.examples[i] for i in chunk])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss, _ = task.loss(model, batch)
        total[0] += loss.double() * len(chunk)
        total[1] += len(chunk)
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


# ------------------------------------------------------------------ the run

def train(config: TrainingConfig) -> dict:
    output_dir = Path(config.effective_output_dir)
    accelerator = Accelerator(
        cpu=_cpu_processes(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard", project_dir=str(output_dir / "logs"),
        step_scheduler_with_optimizer=False,  # stepped by hand, once per optimizer step
    )
    say = accelerator.print
    if (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            and accelerator.distributed_type != DistributedType.FSDP):
        raise TrainingError(
            f"FSDP was requested (--fsdp / fsdp.yaml) but accelerate set up "
            f"{accelerator.distributed_type.value} on {accelerator.device.type}: it runs FSDP on "
            f"GPUs only and would train unsharded; drop --fsdp here, or launch on GPUs")
    set_seed(config.seed)

    # Data and model for this stage (pretraining windows, or SFT/DPO examples on a LoRA model),
    # after syncing the data from the bucket (skip-existing).
    sync_training_data(config, accelerator)
    task = build_task(config)
    model = task.model
    total_params, non_embedding = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # Optimizer and schedule; prepare() first, then compile.
    optimizer = build_adamw(model.to(accelerator.device), config.learning_rate,
                            config.weight_decay, (config.adam_beta1, config.adam_beta2),
                            config.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
        min_ratio=config.min_lr_ratio))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if config.compile:
        reason = compile_unavailable(accelerator.device)
        if reason:
            say(f"torch.compile unavailable ({reason}); running eager")
        else:
            model = torch.compile(model)

    # Checkpoints: local folder, bucket, resume.
    ckpt_root = output_dir / "checkpoints"
    store = open_checkpoint_store(config, accelerator)
    resume_from = resolve_resume(config, accelerator, ckpt_root, store)
    world = accelerator.num_processes
    state = TrainState(num_files=task.num_files, train_windows=len(task.train_idx),
                       world_size=world,
                       global_batch_windows=config.per_device_train_batch_size * world)
    if resume_from is not None:
        saved = checkpoint.load_checkpoint(accelerator, model, optimizer, scheduler, resume_from)
        continue_from(state, saved, resume_from, say)
    elif config.resume:
        say("no complete checkpoint found: starting from scratch")

    sampler = WindowBatchSampler(task.train_idx, config.per_device_train_batch_size,
                                 accelerator.process_index, world, config.seed, state.position,
                                 task.lengths)
    loader = make_torch_loader(task.examples, sampler, config.num_workers, config.prefetch_factor,
                               pin_memory=accelerator.device.type == "cuda",
                               collate_fn=task.collate)
    batches = iter(loader)

    tokens_per_step = (config.per_device_train_batch_size * world
                       * config.gradient_accumulation_steps * config.seq_len)  # at most
    hf_config = accelerator.unwrap_model(model).config
    meter = ThroughputMeter(
        flops_per_token(non_embedding, hf_config.num_hidden_layers, hf_config.hidden_size,
                        config.seq_len, output_embedding_params=hf_config.vocab_size
                        * hf_config.hidden_size),
        device_peak_flops(accelerator.device, config.peak_tflops), world)
    say(f"model {config.model}: {total_params:,} parameters "
        f"({non_embedding:,} without embeddings, {trainable:,} trainable), "
        f"vocab {hf_config.vocab_size}, stage {config.stage}")
    say(f"batch: {config.per_device_train_batch_size} per device x "
        f"{config.gradient_accumulation_steps} accumulation x {world} processes = "
        f"{state.global_batch_windows * config.gradient_accumulation_steps} sequences "
        f"({tokens_per_step:,} tokens) per optimizer step; {task.num_files} files, "
        f"{len(task.train_idx):,} training examples, {len(task.eval_idx)} held out")

    # Logging and uploads happen on the global main process only.
    metrics = None
    if accelerator.is_main_process:
        accelerator.init_trackers(config.run_name, config=flat_hparams(asdict(config)))
        metrics = MetricsWriter(output_dir / "metrics.jsonl", start_step=state.step)
    publisher = CheckpointPublisher(
        store if accelerator.is_main_process else None, f"checkpoints/{config.run_name}",
        background=config.background_upload and accelerator.is_main_process,
        keep_local=config.save_total_limit, remote_keep=config.remote_keep,
        exit_timeout_s=config.upload_timeout_s, log=say)
    if accelerator.is_main_process:
        publisher.catch_up(ckpt_root)  # a kill may have cut the last upload short
    preemption = PreemptionHandler()

    tokenizer = tokenizer_dir(task.meta, Path(config.data_dir))

    def save() -> Path:
        path = checkpoint.save_checkpoint(accelerator, model, optimizer, scheduler, state,
                                          asdict(config), ckpt_root)
        if accelerator.is_main_process:
            copy_tokenizer(tokenizer, path)
            publisher.submit(path)  # the marker is written after this, covering the copies
        return path

    model.train()
    start_step, start_tokens, started = state.step, state.tokens_seen, time.perf_counter()
    last_loss = eval_loss = float("nan")
    interval_loss = torch.zeros((), device=accelerator.device)
    interval_steps = 0
    interval_extras: dict[str, torch.Tensor] = {}
    grad_norm = torch.zeros((), device=accelerator.device)
    saved_paths: list[Path] = []
    stopped_early = False
    bar = tqdm(total=config.max_steps, initial=state.step, desc="training", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True)
    meter.reset()
    with uploads_survive_an_abort(publisher, bar, config, say):
        while state.step < config.max_steps:
            step_tokens = 0
            for _ in range(config.gradient_accumulation_steps):
                batch = next(batches)
                step_tokens += task.count_tokens(batch) * world
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                with accelerator.accumulate(model):
                    loss, extras = task.loss(model, batch)
                    accelerator.backward(loss)
                interval_loss += loss.detach() / config.gradient_accumulation_steps
                for key, value in extras.items():
                    interval_extras[key] = interval_extras.get(key, 0.0) + (
                        value.detach() / config.gradient_accumulation_steps)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            interval_steps += 1
            state.tokens_seen += step_tokens
            state.position = sampler.position
            meter.add(step_tokens)
            bar.update(1)

            log_now = due(state.step, config.logging_steps, config.max_steps)
            save_now = due(state.step, config.save_steps, config.max_steps)
            stop_now = _any_process(accelerator, preemption.requested)
            if log_now or save_now or stop_now:
                mean_loss = accelerator.reduce(interval_loss, reduction="mean").item()
                mean_loss /= interval_steps
                check_loss(mean_loss, state.step, ckpt_root)
            if log_now:
                last_loss = mean_loss
                record = {"step": state.step, "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                          "grad_norm": float(grad_norm), "epoch": state.position.epoch,
                          "tokens_seen": state.tokens_seen, **meter.read(),
                          "memory_gib": memory_gib(accelerator.device),
                          **{k: accelerator.reduce(v, reduction="mean").item() / interval_steps
                             for k, v in interval_extras.items()}}
                record["step_time_s"] /= interval_steps
                record["eta_s"] = record["step_time_s"] * (config.max_steps - state.step)
                if due(state.step, config.eval_steps, config.max_steps):
                    eval_loss = record["eval_loss"] = evaluate(
                        model, task, config.per_device_train_batch_size, accelerator)
                if metrics:
                    metrics.write(record)
                    accelerator.log({k: v for k, v in record.items() if k != "step"},
                                    step=state.step)
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                eta=format_eta(record["eta_s"]))
                interval_loss.zero_()
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
    if config.merge and config.stage != "pretrain" and not stopped_early:
        if accelerator.is_main_process:  # from the final checkpoint, complete by now
            from utils.finetune import merge_adapter

            merged = merge_adapter(checkpoint.find_complete(ckpt_root)[-1], output_dir / "merged")
            say(f"merged model (base + adapters) written to {merged}")
        accelerator.wait_for_everyone()
    accelerator.end_training()
    summary, table = run_summary(
        config=config, state=state, start_step=start_step, start_tokens=start_tokens,
        elapsed=elapsed, last_loss=last_loss, eval_loss=eval_loss, saved=saved_paths,
        uploads_done=uploads_done, stopped_early=stopped_early,
        where=f"{world} process(es)", ckpt_root=ckpt_root, store=store)
    say(table)
    return summary


def _cpu_processes() -> bool:
    """True for a multi-process launch on a machine without CUDA.

    ``accelerate launch --multi_gpu`` and ``torchrun`` start N processes, but with no GPU
    accelerate leaves each one alone (world size 1, every rank "main", all writing the same
    files) unless told to use the CPU; then it joins them with gloo.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process if any process was asked to stop (signals may reach only one)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return accelerator.reduce(value, reduction="sum").item() > 0


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    if args.validate:
        from utils.preflight import run_preflight

        return run_preflight(config)
    if config.backend == "mlx":
        from mlx_train import run as mlx_run
        from utils.mlx_model import reexec_with_openblas

        reexec_with_openblas()  # MLX's Linux wheel ships a slow BLAS; no-op elsewhere
        return mlx_run(config)
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


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

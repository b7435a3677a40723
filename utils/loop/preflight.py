"""``--validate``: one line per check, pass/fail and why, before spending GPU hours.

The checks run what the real run will use: the stage's data (shards, or SFT/DPO JSONL and
its base model), the chosen backend's engine, its model, forward pass, training step and
checkpoint round trip.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from configs.model_config import count_parameters, hf_config_for
from configs.training_config import TrainingConfig
from utils.checkpoint import TrainState, write_manifest
from utils.data import read_dataset_meta, source_weights
from utils.loop.engine import Engine
from utils.stages.task import build_task
from utils.storage import open_bucket

# On the CPU, skip the forward/step checks for models this large (they would take minutes).
CPU_STEP_LIMIT_PARAMS = 300_000_000


class Skip(Exception):
    """A check that does not apply to this config (printed as 'skip', not a failure)."""


def run_preflight(config: TrainingConfig, engine: Engine) -> int:
    """Run every check, print a line each, return 0 when none failed."""
    ctx: dict = {"config": config, "engine": engine}
    checks: list[tuple[str, Callable[[dict], str]]] = [
        ("config valid", lambda c: f"stage {config.stage}, model {config.model}, seq_len "
                                   f"{config.seq_len}, backend {config.backend}"),
        ("bucket reachable and writable", _check_bucket),
        ("data present and readable", _check_data),
        ("model builds", _check_model),
        ("forward pass", _check_forward),
        ("one training step", _check_step),
        ("checkpoint save/load round trip", _check_checkpoint),
        ("preemption budget", _check_budget),
        ("log directory writable", _check_logdir),
    ]
    failed = 0
    for name, check in checks:
        start = time.perf_counter()
        try:
            detail, status = check(ctx), "PASS"
        except Skip as skip:
            detail, status = str(skip), "skip"
        except Exception as err:  # noqa: BLE001 - every failure is reported, none is fatal here
            detail, status = f"{type(err).__name__}: {err}".splitlines()[0], "FAIL"
            failed += 1
        print(f"[{status}] {name:<34} {detail} ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"preflight: {len(checks) - failed} of {len(checks)} checks passed" if not failed
          else f"preflight: {failed} check(s) FAILED")
    return 1 if failed else 0


def _check_bucket(ctx: dict) -> str:
    config = ctx["config"]
    if not config.bucket:
        raise Skip("no bucket configured: checkpoints stay local")
    store = open_bucket(config.bucket_settings)
    store.check_access(write=True)
    ctx["store"] = store
    return f"{store.url} is readable and writable"


def _check_data(ctx: dict) -> str:
    config = ctx["config"]
    if (config.stage == "pretrain" and config.sync_data and not config.stream
            and not Path(config.data_dir).is_dir()):
        if "store" not in ctx:
            raise Skip("the bucket is not reachable")
        counts = []
        for folder in source_weights(config.data_mix):
            prefix = f"{config.data_prefix}/{folder}".rstrip("/")
            counts.append(len(ctx["store"].child(prefix).list()))
            if not counts[-1]:
                raise RuntimeError(f"no data under {config.bucket}/{prefix}")
        return f"{sum(counts)} files in the bucket (not synced yet)"
    task = ctx["task"] = build_task(config, ctx["engine"])
    if task.feed is not None:
        return _check_stream(ctx, task)
    task.examples[int(task.train_idx[-1])]  # reads a late example: catches truncation
    if task.base_path is not None:
        return (f"{task.num_files} file(s), {len(task.train_idx):,} training examples, "
                f"{len(task.eval_idx)} held out; base {task.base_path}")
    windows = task.examples
    mix = ""
    if task.sources is not None:  # every source: its headers were read, now one window
        for source in task.sources:
            windows[int(source.indices[0])]
        mix = "; mix " + ", ".join(f"{s.name} {s.weight:.0%} ({len(s.indices):,} windows)"
                                   for s in task.sources)
    return (f"{task.num_files} shards, {windows.num_tokens:,} tokens, {len(windows):,} "
            f"windows{mix}")


def _check_stream(ctx: dict, task) -> str:
    """--stream: every source was listed (and its .npy headers read) by ``build_task``; start
    the caches and read each source's first window, which downloads and verifies a shard."""
    config, engine = ctx["config"], ctx["engine"]
    task.feed.start(task.start_position(), engine, config.per_device_train_batch_size,
                    lambda line: None)
    for order in task.orders:
        task.examples[int(order(0)[0])]
    return (f"{task.num_files} shards listed in {len(task.orders)} source(s), "
            f"{len(task.examples):,} windows; the first shard of each downloaded and read")


def _check_model(ctx: dict) -> str:
    config, engine = ctx["config"], ctx["engine"]
    if config.stage == "pretrain":
        total, _ = count_parameters(hf_config_for(config.model,
                                                  read_dataset_meta(Path(config.data_dir))))
        if total > CPU_STEP_LIMIT_PARAMS and not engine.accelerated:
            raise Skip(f"{total / 1e9:.1f}B parameters on the CPU: run on a GPU")
    if "task" not in ctx:
        raise Skip("needs local data")
    info = ctx["info"] = engine.setup(ctx["task"], config)
    return (f"{info.total_params:,} parameters ({info.non_embedding_params:,} without "
            f"embeddings, {info.trainable_params:,} trainable); {info.description}")


def _batch(ctx: dict) -> dict:
    if "info" not in ctx:
        raise Skip("needs the model")
    task = ctx["task"]
    sampler = task.sampler(2, 0, 1, ctx["config"].seed, task.start_position())
    return task.collate([task.examples[i] for i in next(iter(sampler))])  # what trains first


def _eval_loss(ctx: dict) -> float:
    engine = ctx["engine"]
    with engine.evaluating():
        loss = engine.eval_loss(_batch(ctx))
    if not math.isfinite(loss):
        raise RuntimeError(f"loss is {loss}")
    return loss


def _check_forward(ctx: dict) -> str:
    return f"loss {_eval_loss(ctx):.3f} ({ctx['engine'].where})"


def _check_step(ctx: dict) -> str:
    engine = ctx["engine"]
    engine.train_step([_batch(ctx)], 0)
    sums, grad_norm = engine.read_interval()
    if not math.isfinite(sums["loss"]):
        raise RuntimeError(f"loss is {sums['loss']}")
    ctx["stepped"] = True
    return f"loss {sums['loss']:.3f}, gradient norm {grad_norm:.3f}, finite"


def _check_checkpoint(ctx: dict) -> str:
    """Save, take one more step (the weights move), load: the loss must be the saved one's."""
    engine = ctx["engine"]
    if "stepped" not in ctx:
        raise Skip("needs the training step")
    before = _eval_loss(ctx)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        snapshot = engine.snapshot(TrainState(step=1), {}, Path(tmp))
        blocking = time.perf_counter() - started
        path = snapshot.write() if snapshot else Path(tmp)
        engine.wait_for_everyone()
        ctx["save_s"] = (blocking, time.perf_counter() - started)
        write_manifest(path)
        ctx["size"] = sum(f.stat().st_size for f in path.iterdir())
        ctx["upload_s"] = _timed_upload(ctx.get("store"), path)
        if ctx.get("store") is not None and ctx["config"].upload_streams > 1:
            single = open_bucket(replace(ctx["config"].bucket_settings, upload_streams=1))
            ctx["single_upload_s"] = _timed_upload(single, path)
        engine.train_step([_batch(ctx)], 1)
        moved = _eval_loss(ctx)
        engine.load(path)
        after = _eval_loss(ctx)
        size = ctx["size"] / 2**20
    if after != before:
        raise RuntimeError(f"loss {after} after reloading, {before} when saved")
    return (f"{size:.1f} MiB written (training blocked {blocking:.2f} s, "
            f"{ctx['save_s'][1]:.2f} s in all); loss {before:.4f} at save, {moved:.4f} a step "
            f"later, {after:.4f} after reload")


def _timed_upload(store, path: Path) -> float | None:
    """Seconds to upload the checkpoint to a scratch prefix of the bucket (then deleted)."""
    if store is None:
        return None
    scratch = store.child(f"preflight/{path.name}-{time.time_ns()}")
    started = time.perf_counter()
    try:
        for file in path.iterdir():
            scratch.upload_file(file, file.name)
        return time.perf_counter() - started
    finally:
        for obj in scratch.list():
            scratch.delete(obj.name)


def _check_budget(ctx: dict) -> str:
    """Whether a signal's emergency save (and upload) fits --preemption-budget-s, with the
    upload measured at --upload-streams and at one stream, side by side."""
    if "save_s" not in ctx:
        raise Skip("needs the checkpoint round trip")
    config = ctx["config"]
    budget, (_, save_s), upload_s = config.preemption_budget_s, ctx["save_s"], ctx["upload_s"]
    total = save_s + (upload_s or 0.0)
    if save_s > budget:
        raise RuntimeError(f"saving takes {save_s:.1f} s, more than --preemption-budget-s "
                           f"{budget:.0f}: a preemption would lose the checkpoint; save more "
                           f"often (--save-interval-minutes) or use a faster local disk")
    fits = (f"fits the {budget:.0f} s budget" if total <= budget else
            f"does not fit the {budget:.0f} s budget (the rest uploads at the next start)")
    size = ctx["size"]
    head = f"{config.model} checkpoint {size / 1e9:.2f} GB: save {save_s:.1f} s"
    if upload_s is None:
        return f"{head}, no bucket: {fits}"
    upload = (f"upload {upload_s:.1f} s at {config.upload_streams} stream(s) "
              f"({size / max(upload_s, 1e-9) / 1e9:.2f} GB/s measured)")
    single = ctx.get("single_upload_s")
    if single is not None:
        upload += (f"; 1 stream {single:.1f} s ({size / max(single, 1e-9) / 1e9:.2f} GB/s): "
                   f"{single / max(upload_s, 1e-9):.1f}x from parallel streams")
    return f"{head} + {upload} = {total:.1f} s: {fits}"


def _check_logdir(ctx: dict) -> str:
    logs = Path(ctx["config"].effective_output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    probe = logs / ".preflight"
    probe.write_text("ok")
    probe.unlink()
    return f"{logs}"

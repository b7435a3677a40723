"""``train.py --validate``: one line per check, pass/fail and why, before spending GPU hours."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from configs.training_config import TrainingConfig

# On the CPU, skip the forward/step checks for models this large (they would take minutes).
CPU_STEP_LIMIT_PARAMS = 300_000_000


class Skip(Exception):
    """A check that does not apply to this config (printed as 'skip', not a failure)."""


def run_preflight(config: TrainingConfig) -> int:
    """Run every check, print a line each, return 0 when none failed."""
    ctx: dict = {"config": config}
    checks: list[tuple[str, Callable[[dict], str]]] = [
        ("config valid", lambda c: f"preset ok, model {config.model}, seq_len {config.seq_len}"),
        ("bucket reachable and writable", _check_bucket),
        ("data present and readable", _check_data),
        ("model builds", _check_model),
        ("forward pass", _check_forward),
        ("one training step", _check_step),
        ("checkpoint save/load round trip", _check_checkpoint),
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
    from utils.storage import open_store

    store = open_store(config.bucket, credentials=config.credentials or None)
    store.check_access(write=True)
    ctx["store"] = store
    return f"{store.url} is readable and writable"


def _check_data(ctx: dict) -> str:
    from utils.data_utils import TokenWindows, find_shards, read_dataset_meta

    config = ctx["config"]
    root = Path(config.data_dir)
    if config.sync_data and not root.is_dir():
        listing = ctx["store"].child(config.data_prefix).list() if "store" in ctx else []
        if not listing:
            raise RuntimeError(f"no data under {config.bucket}/{config.data_prefix}")
        ctx["meta"] = None
        return f"{len(listing)} files in the bucket (not synced yet)"
    shards = find_shards(root, max_files=config.max_files or None)
    windows = TokenWindows(shards, config.seq_len, root=root)
    windows[len(windows) - 1]  # reads the last window: catches truncation
    ctx["meta"] = read_dataset_meta(root)
    ctx["windows"] = windows
    return f"{len(shards)} shards, {windows.num_tokens:,} tokens, {len(windows):,} windows"


def _check_model(ctx: dict) -> str:
    from configs.model_config import count_parameters
    from utils.modeling import build_model

    config = ctx["config"]
    with torch.device("meta"):
        total, non_embedding = count_parameters(build_model(config, ctx.get("meta")))
    ctx["params"] = total
    return f"{total:,} parameters ({non_embedding:,} without embeddings)"


def _model_on_device(ctx: dict):
    if "model" not in ctx:
        from utils.modeling import build_model

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and ctx.get("params", 0) > CPU_STEP_LIMIT_PARAMS:
            raise Skip(f"{ctx['params'] / 1e9:.1f}B parameters on the CPU: run on a GPU")
        if "windows" not in ctx:
            raise Skip("needs local data")
        ctx["device"] = device
        ctx["model"] = build_model(ctx["config"], ctx.get("meta")).to(device)
        batch = [ctx["windows"][i] for i in range(min(2, len(ctx["windows"])))]
        ctx["batch"] = torch.from_numpy(np.stack(batch)).to(device)
    return ctx["model"]


def _check_forward(ctx: dict) -> str:
    from utils.modeling import causal_lm_loss

    model = _model_on_device(ctx)
    with torch.no_grad():
        loss = causal_lm_loss(model, ctx["batch"]).item()
    if not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError(f"loss is {loss}")
    return f"loss {loss:.3f} on {ctx['device']}"


def _check_step(ctx: dict) -> str:
    from utils.modeling import causal_lm_loss
    from utils.optim import build_adamw

    config = ctx["config"]
    model = _model_on_device(ctx)
    optimizer = build_adamw(model, config.learning_rate, config.weight_decay,
                            (config.adam_beta1, config.adam_beta2), config.adam_epsilon)
    loss = causal_lm_loss(model, ctx["batch"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {loss.item()}")
    ctx["optimizer"] = optimizer
    return f"loss {loss.item():.3f}, finite"


def _check_checkpoint(ctx: dict) -> str:
    from accelerate import Accelerator

    from utils import checkpoint

    model, optimizer = _model_on_device(ctx), ctx.get("optimizer")
    if optimizer is None:
        raise Skip("needs the training step")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Accelerator(cpu=ctx["device"].type == "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save_checkpoint(accelerator, model, optimizer, scheduler,
                                          checkpoint.TrainState(step=1), {}, Path(tmp))
        checkpoint.write_manifest(path)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for p in model.parameters():
            p.data.zero_()
        checkpoint.load_checkpoint(accelerator, model, optimizer, scheduler, path)
        same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    if not same:
        raise RuntimeError("weights differ after the round trip")
    return f"{size:.1f} MiB written, weights identical after reload"


def _check_logdir(ctx: dict) -> str:
    logs = Path(ctx["config"].effective_output_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    probe = logs / ".preflight"
    probe.write_text("ok")
    probe.unlink()
    return f"{logs}"

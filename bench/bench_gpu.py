"""GPU throughput of the real training step, variant by variant, in one command (issue 13).

Each variant is a fresh process (clean GPU memory and compile caches; a crash or an OOM takes
only that variant down) that runs ``TorchEngine.setup`` and ``train_step`` exactly as
``train.py`` does (accelerate in one process, bf16), over real pretraining micro-batches from a
synthetic shard dataset written once (random ids of a 50,257-token tokenizer). Every variant
trains the same global batch per optimizer step (``--sequences-per-step``, production's 4 x 4
= 16 sequences): a larger micro-batch means less accumulation, as it would in production.
After ``--warmup`` steps (the first one compiles) ``--steps`` steps are timed between CUDA
synchronisations. The parent prints the table, the best variant's speed-up over today's
production settings measured in the same run, and the flags that select it; JSON and
markdown copies go to ``--out``.

Variants run most-informative first; once ``--budget-s`` (default 5.5 minutes, for one
H100/H200) is spent, the rest are listed as not run rather than overrunning (``--only`` runs
chosen ones). Compile time is the first step's time minus a steady step's, with a cold
compile cache per variant (what a fresh training machine pays).

    python bench/bench_gpu.py [--out outputs/bench_gpu] [--only baseline,regional,...]
    python bench/bench_gpu.py --smoke    # tiny model, seq 128, 2 steps, on the CPU: the plumbing

Needs only what the GPU image has (torch, transformers, accelerate, numpy): nothing here
imports google-cloud-storage, which that image lacks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from configs.training_config import TrainingConfig  # noqa: E402  (plain dataclasses: no torch)

TOKENIZER_VOCAB = 50257  # the GPT-NeoX/GPT-2 tokenizer size the 1.2B config names
SMOKE_VOCAB = 512  # --smoke: a 50K-row LM head would dominate a tiny model's CPU time
DEFAULT_CHUNK = TrainingConfig().loss_chunk_tokens or 8192
MICRO_BATCHES = (4, 8, 16)
# Environment a launcher may leave behind that would make accelerate expect other processes
# or override the precision the config asks for.
_LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@dataclass(frozen=True)
class Variant:
    """One set of speed settings (the TrainingConfig fields issue 13 added, and the batch)."""

    name: str
    what: str
    compile: bool = True
    compile_scope: str = "layers"
    attention: str = "causal"
    loss_chunk_tokens: int = DEFAULT_CHUNK
    micro_batch: int = 4
    fp8: bool = False

    def accumulation(self, sequences_per_step: int) -> int:
        return max(1, sequences_per_step // self.micro_batch)

    def settings(self) -> str:
        comp = f"compile {self.compile_scope}" if self.compile else "eager"
        loss = f"loss chunk {self.loss_chunk_tokens}" if self.loss_chunk_tokens else "fp32 logits"
        return f"{comp}, {self.attention}, {loss}" + (", fp8" if self.fp8 else "")

    def flags(self, sequences_per_step: int) -> str:
        parts = ["--compile" if self.compile else "--no-compile"]
        if self.compile:
            parts.append(f"--compile-scope {self.compile_scope}")
        parts += [f"--attention {self.attention}", f"--loss-chunk-tokens {self.loss_chunk_tokens}",
                  f"--per-device-train-batch-size {self.micro_batch}",
                  f"--gradient-accumulation-steps {self.accumulation(sequences_per_step)}",
                  "--fp8" if self.fp8 else "--no-fp8"]
        return " ".join(parts)


BASELINE = Variant("baseline", "production today", compile=True, compile_scope="model",
                   attention="sdpa", loss_chunk_tokens=0, micro_batch=4)
REGIONAL = Variant("regional", "regional compile, causal attention, chunked loss")
EAGER = Variant("eager", "no compile (vs regional)", compile=False)
MODEL_SCOPE = Variant("model-scope", "whole-model compile (vs regional)", compile_scope="model")
OLD_ATTENTION = Variant("old-attention", "transformers' sdpa (vs regional)", attention="sdpa")
OLD_LOSS = Variant("old-loss", "whole fp32-logits loss (vs regional)", loss_chunk_tokens=0)
ALL_NAMES = ("baseline", "regional", "eager", "mb8", "mb16", "fp8", "model-scope",
             "old-attention", "old-loss")


# ---------------------------------------------------------------------------- data


def write_dataset(root: Path, num_tokens: int, vocab: int, seed: int = 0) -> Path:
    """A shard of random token ids and its dataset.json, as ``data/prepare.py`` lays them out
    (the model's vocabulary is then ``hf_config_for``'s padding of ``vocab``)."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(seed).integers(0, vocab, num_tokens, dtype=np.uint16)
    np.save(root / "shard_00000.npy", tokens)
    meta = {"vocab_size": vocab, "eos_token_id": 0, "bos_token_id": 0,
            "pad_token_id": None, "dtype": "uint16", "num_tokens": num_tokens, "num_shards": 1,
            "source": ["bench_gpu synthetic"]}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")  # last, as prepare
    return root


# ---------------------------------------------------------------------------- worker


def _force_compile_backend(backend: str) -> None:
    """Smoke runs on a CPU: a cheap dynamo backend instead of inductor's C++ builds (tens of
    seconds per variant there); dynamo's tracing, fullgraph checks included, stays real.
    ``nn.Module.compile`` calls ``torch.compile`` too, so both compile scopes get it."""
    import functools

    import torch

    real = torch.compile

    @functools.wraps(real)
    def compile_with_backend(*args: Any, **kwargs: Any) -> Any:
        kwargs["backend"] = backend
        return real(*args, **kwargs)

    torch.compile = compile_with_backend


def _is_oom(exc: BaseException) -> bool:
    """An OOM, also when compilation wraps it in another exception."""
    import torch

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.cuda.OutOfMemoryError) or "out of memory" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Set up the engine for one variant and time its steps (in this process)."""
    import gc

    import torch

    if spec["compile_backend"] != "inductor":
        _force_compile_backend(spec["compile_backend"])
    from configs.training_config import preset
    from utils.data import DataPosition, WindowBatchSampler
    from utils.loop.metrics import flops_per_token
    from utils.stages.task import build_task
    from utils.torch_engine.engine import TorchEngine

    variant = Variant(**spec["variant"])
    accum = variant.accumulation(spec["sequences_per_step"])
    config = preset(
        "production", run_name="bench_gpu", model=spec["model"], seq_len=spec["seq_len"],
        data_dir=spec["data_dir"], bucket="", sync_data=False, max_files=0,
        output_dir=spec["output_dir"], eval_windows=8, max_steps=10000,
        per_device_train_batch_size=variant.micro_batch, gradient_accumulation_steps=accum,
        auto_micro_batch=False,  # each variant's micro-batch as given
        mixed_precision="bf16", compile=variant.compile, compile_scope=variant.compile_scope,
        attention=variant.attention, loss_chunk_tokens=variant.loss_chunk_tokens,
        fp8=variant.fp8, num_workers=spec["num_workers"])
    engine = TorchEngine(config)
    device = engine.device
    result: dict[str, Any] = {"device": str(device), "micro_batch": variant.micro_batch,
                              "accumulation": accum}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    try:
        start = time.perf_counter()
        task = build_task(config, engine)
        info = engine.setup(task, config)
        _sync(device)
        result["setup_s"] = time.perf_counter() - start
        sampler = WindowBatchSampler(task.train_idx, variant.micro_batch, 0, 1, config.seed,
                                     DataPosition())
        batches = engine.batches(task, sampler)

        def step(index: int) -> None:
            engine.train_step([next(batches) for _ in range(accum)], index)

        start = time.perf_counter()
        step(0)
        _sync(device)
        result["first_step_s"] = time.perf_counter() - start
        for index in range(1, spec["warmup"]):
            step(index)
        engine.reset_interval()
        _sync(device)
        start = time.perf_counter()
        for index in range(spec["steps"]):
            step(spec["warmup"] + index)
        _sync(device)
        elapsed = time.perf_counter() - start
        means, _ = engine.read_interval()
    except Exception as exc:
        if not _is_oom(exc):
            raise
        oom = True
    else:
        oom = False
    if oom:  # outside the except block: its traceback, which holds tensors, is gone
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {**result, "status": "OOM", "note": "out of memory"}
    steps, tokens = spec["steps"], spec["steps"] * accum * variant.micro_batch * spec["seq_len"]
    flops = flops_per_token(info.non_embedding_params, info.num_layers, info.hidden_size,
                            spec["seq_len"],
                            output_embedding_params=info.vocab_size * info.hidden_size)
    tokens_per_s = tokens / elapsed
    step_s = elapsed / steps
    loss = means["loss"] / steps
    result.update(
        status="ok" if math.isfinite(loss) else "error",
        note="" if math.isfinite(loss) else f"loss is {loss}",
        tokens_per_s=tokens_per_s, step_s=step_s, loss=loss, flops_per_token=flops,
        mfu=tokens_per_s * flops / info.peak_flops if info.peak_flops else None,
        peak_gib=engine.memory_gib(), description=info.description,
        compile_s=max(0.0, result["first_step_s"] - step_s) if variant.compile else None)
    if device.type == "cuda":
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return result


def probe() -> dict[str, Any]:
    """The machine as the workers will see it, and whether float8 can run there."""
    from importlib import metadata

    import torch

    from utils.torch_engine.fp8 import fp8_unavailable

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "device": device.type, "fp8_unavailable": fp8_unavailable(device)}
    for package in ("transformers", "accelerate", "torchao"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return info


def worker_main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("probe"):
        result = probe()
    else:
        result = run_variant(spec)
    Path(result_path).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------- parent


@dataclass
class Row:
    variant: Variant
    status: str  # ok, OOM, error, timeout, skipped
    note: str = ""
    result: dict[str, Any] | None = None


class Bench:
    """Runs the variants one subprocess at a time under one time budget."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.out = Path(args.out)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.rows: list[Row] = []
        self.data_dir = tmp / "data"

    def remaining(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.start)

    def _env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in _LAUNCHER_ENV and not k.startswith("ACCELERATE_")}
        cache = self.tmp / "compile-cache" / ("shared" if self.args.shared_compile_cache
                                              else name)
        env.update(TMPDIR=str(self.tmp), TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
                   TRITON_CACHE_DIR=str(cache / "triton"), TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1")
        return env

    def _spawn(self, name: str, spec: dict[str, Any], timeout: float) -> tuple[str, dict | str]:
        """("ok", result) or (status, note) from one worker process."""
        spec_path, result_path = self.tmp / f"{name}.spec.json", self.tmp / f"{name}.result.json"
        spec_path.write_text(json.dumps(spec))
        log_path = self.out / "logs" / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path),
                 str(result_path)], cwd=REPO, env=self._env(name), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # its loader and compile workers too
                proc.wait()
                return "timeout", f"stopped after {timeout:.0f} s (time budget)"
        if code == 0 and result_path.exists():
            return "ok", json.loads(result_path.read_text())
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines()
                 if line.strip()]
        return "error", f"exit {code}: {(lines[-1] if lines else 'no output')[:200]}"

    def probe(self) -> dict[str, Any]:
        status, found = self._spawn("probe", {"probe": True}, min(120.0, self.remaining()))
        if status != "ok" or not isinstance(found, dict):
            raise SystemExit(f"bench_gpu: the probe process failed ({found}); see "
                             f"{self.out / 'logs' / 'probe.log'}")
        return found

    def run(self, variant: Variant) -> Row:
        args = self.args
        left = self.remaining()
        if left < args.min_variant_s:
            row = Row(variant, "skipped", f"not run: {args.budget_s:.0f} s budget spent "
                                          f"(run it alone: --only {variant.name})")
        else:
            spec = {"variant": asdict(variant), "model": args.model, "seq_len": args.seq_len,
                    "sequences_per_step": args.sequences_per_step, "warmup": args.warmup,
                    "steps": args.steps, "data_dir": str(self.data_dir),
                    "output_dir": str(self.tmp / "runs" / variant.name),
                    "num_workers": args.num_workers, "compile_backend": args.compile_backend}
            print(f"[bench_gpu] {variant.name}: {variant.settings()}, micro-batch "
                  f"{variant.micro_batch} ({left:.0f} s of budget left)", flush=True)
            began = time.monotonic()
            status, found = self._spawn(variant.name, spec, min(left, args.variant_cap_s))
            if status == "ok" and isinstance(found, dict):
                row = Row(variant, found["status"], found.get("note", ""), found)
            else:
                row = Row(variant, status, str(found))
            figures = (f"{row.result['tokens_per_s']:,.0f} tokens/s, peak "
                       f"{row.result['peak_gib']:.1f} GiB" if row.status == "ok" and row.result
                       else f"{row.status}: {row.note}")
            print(f"[bench_gpu]   -> {figures} ({time.monotonic() - began:.0f} s)", flush=True)
        self.rows.append(row)
        return row

    def skip(self, variant: Variant, note: str) -> None:
        self.rows.append(Row(variant, "skipped", note))


def plan_and_run(bench: Bench, fp8_reason: str | None, only: set[str]) -> None:
    """The variants in order of what they tell; the micro-batch ramp stops at the first OOM."""

    def wanted(name: str) -> bool:
        return not only or name in only

    for variant in (BASELINE, REGIONAL, EAGER):
        if wanted(variant.name):
            bench.run(variant)
    ramp_ok = {r.variant.micro_batch: r for r in bench.rows
               if r.variant.name == "regional" and r.status == "ok"}
    last_status = next((r.status for r in bench.rows if r.variant.name == "regional"), "ok")
    for micro_batch in MICRO_BATCHES[1:]:
        variant = replace(REGIONAL, name=f"mb{micro_batch}", what=f"regional, micro-batch "
                          f"{micro_batch}", micro_batch=micro_batch)
        if not wanted(variant.name):
            continue
        if last_status == "OOM":
            bench.skip(variant, "not run: a smaller micro-batch ran out of memory")
            continue
        row = bench.run(variant)
        last_status = row.status
        if row.status == "ok":
            ramp_ok[micro_batch] = row
    if wanted("fp8"):
        best = max(ramp_ok.values(), key=lambda r: r.result["tokens_per_s"], default=None)
        micro_batch = best.variant.micro_batch if best else 4
        fp8 = replace(REGIONAL, name="fp8", what=f"float8 linears (vs mb{micro_batch} bf16)",
                      micro_batch=micro_batch, fp8=True)
        if fp8_reason:
            bench.skip(fp8, f"skipped: {fp8_reason}")
        else:
            bench.run(fp8)
    for variant in (MODEL_SCOPE, OLD_ATTENTION, OLD_LOSS):
        if wanted(variant.name):
            bench.run(variant)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[Row], sequences_per_step: int) -> str:
    """The markdown table: one row per variant, figures or why there are none."""
    head = ("| variant | settings | micro-batch x accum | tokens/s | MFU | peak GiB | "
            "compile s | note |")
    lines = [head, "|" + "---|" * 8]
    for row in rows:
        r, v = row.result or {}, row.variant
        ok = row.status == "ok"
        lines.append(
            f"| {v.name} | {v.settings()} | {v.micro_batch} x "
            f"{v.accumulation(sequences_per_step)} | "
            f"{_num(r.get('tokens_per_s'), ',.0f') if ok else row.status} | "
            f"{_num(r.get('mfu') * 100 if ok and r.get('mfu') else None, '.1f')}"
            f"{'%' if ok and r.get('mfu') else ''} | "
            f"{_num(r.get('peak_gib') if ok else None, '.1f')} | "
            f"{_num(r.get('compile_s') if ok else None, '.1f')} | "
            f"{row.note or v.what} |")
    return "\n".join(lines)


def summary(rows: list[Row], sequences_per_step: int) -> tuple[str, dict[str, Any]]:
    """The best variant, its speed-up over the baseline of the same run, and its flags."""
    done = [r for r in rows if r.status == "ok"]
    if not done:
        return "no variant finished: nothing to compare (see the logs)", {}
    best = max(done, key=lambda r: r.result["tokens_per_s"])
    base = next((r for r in done if r.variant.name == "baseline"), None)
    flags = best.variant.flags(sequences_per_step)
    found: dict[str, Any] = {"best": best.variant.name, "best_tokens_per_s":
                             best.result["tokens_per_s"], "flags": flags}
    lines = [f"best: {best.variant.name} ({best.variant.settings()}, micro-batch "
             f"{best.variant.micro_batch}): {best.result['tokens_per_s']:,.0f} tokens/s"]
    if base is not None:
        speedup = best.result["tokens_per_s"] / base.result["tokens_per_s"]
        found["speedup_over_baseline"] = speedup
        lines.append(f"speed-up over the baseline (production today, same run): {speedup:.2f}x")
    else:
        lines.append("speed-up over the baseline: the baseline did not finish in this run")
    lines.append(f"flags: {flags}  (the same {sequences_per_step} sequences per optimizer step "
                 f"per device as production's 4 x 4)")
    return "\n".join(lines), found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, seq 128, 2 timed steps, CPU-friendly (tests)")
    parser.add_argument("--out", default="outputs/bench_gpu", help="where the table goes")
    parser.add_argument("--only", default="",
                        help=f"comma-separated variants to run, of: {', '.join(ALL_NAMES)}")
    parser.add_argument("--model", default=None, help="model size (default neox-1.2b)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None,
                        help=f"tokenizer size of the synthetic data (default {TOKENIZER_VOCAB})")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (>= 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps")
    parser.add_argument("--sequences-per-step", type=int, default=16,
                        help="sequences per optimizer step (production: 4 x 4)")
    parser.add_argument("--budget-s", type=float, default=None, help="total wall-clock budget")
    parser.add_argument("--variant-cap-s", type=float, default=None,
                        help="the most one variant may take")
    parser.add_argument("--min-variant-s", type=float, default=None,
                        help="do not start a variant with less budget than this left")
    parser.add_argument("--num-workers", type=int, default=None, help="data loader workers")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; --smoke: eager)")
    parser.add_argument("--shared-compile-cache", action="store_true",
                        help="one inductor/triton cache for all variants (faster, warm)")
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    smoke = args.smoke
    defaults = {"model": "tiny" if smoke else "neox-1.2b", "seq_len": 128 if smoke else 2048,
                "vocab": SMOKE_VOCAB if smoke else TOKENIZER_VOCAB,
                "warmup": 1 if smoke else 2, "steps": 1 if smoke else 5,
                "budget_s": 900.0 if smoke else 330.0, "variant_cap_s": 300.0 if smoke else 150.0,
                "min_variant_s": 0.0 if smoke else 35.0, "num_workers": 0 if smoke else 4,
                "compile_backend": "eager" if smoke else "inductor"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = {n for n in args.only.split(",") if n} - set(ALL_NAMES)
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(ALL_NAMES)}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step compiles)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp_name:
        bench = Bench(args, Path(tmp_name))
        steps = args.warmup + args.steps
        windows = steps * args.sequences_per_step * 2 + 64  # two epochs' worth, eval included
        write_dataset(bench.data_dir, windows * args.seq_len + 1, args.vocab)
        machine = bench.probe()
        print(f"[bench_gpu] {args.model}, seq {args.seq_len}, vocab {args.vocab}, bf16, "
              f"{args.warmup} warm-up + {args.steps} timed steps of "
              f"{args.sequences_per_step} sequences; "
              f"{machine.get('gpu') or machine['device']}, torch {machine['torch']}, "
              f"transformers {machine['transformers']}, accelerate {machine['accelerate']}",
              flush=True)
        plan_and_run(bench, machine["fp8_unavailable"], {n for n in args.only.split(",") if n})
    rows = bench.rows
    text = table(rows, args.sequences_per_step)
    verdict, best = summary(rows, args.sequences_per_step)
    elapsed = time.monotonic() - bench.start
    print(f"\n{text}\n\n{verdict}\n(total {elapsed:.0f} s; logs in {bench.out / 'logs'})")
    record = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "worker"},
              "rows": [{"variant": asdict(r.variant), "status": r.status, "note": r.note,
                        "result": r.result} for r in rows],
              "summary": best, "elapsed_s": elapsed}
    (bench.out / "bench_gpu.json").write_text(json.dumps(record, indent=2) + "\n")
    (bench.out / "bench_gpu.md").write_text(
        f"# bench_gpu\n\n{machine.get('gpu') or machine['device']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, {args.model} seq {args.seq_len}\n\n"
        f"{text}\n\n{verdict}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

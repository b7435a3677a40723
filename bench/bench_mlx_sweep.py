"""MLX training throughput by batch size (and sequence length): where the CPU saturates.

Each (seq_len, batch) point is a fresh ``train.py --backend mlx --config smoke`` process on
the same data; points are interleaved across repeats (1, 2, 4, ..., 1, 2, 4, ...) so machine
noise hits all of them, and the speed-up against the smallest batch is measured in one run.
Per point: median tokens/s and step time over the logged intervals after the first (warm-up,
compile), and the peak MLX memory (``memory_gib`` of metrics.jsonl).

    python bench/bench_mlx_sweep.py [--batch-sizes 1,2,4,8,16] [--seq-lens 128] [--steps 30]
    python bench/bench_mlx_sweep.py --stage sft     # LoRA SFT on bench_mlx_lora's data

``--stage sft`` trains LoRA adapters (r 16 on all four linear layers) on a 5-step base and
the generated prompt/completion data of ``bench/bench_mlx_lora.py``; tokens/s there counts
real tokens (padding excluded), as train.py logs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_mlx import INTERVAL, VARIANTS  # noqa: E402

if TYPE_CHECKING:
    from bench.bench_mlx_lora import SftData

SAMPLE = "data/training/sample"
LORA_FLAGS = ["--lora-r", "16", "--lora-alpha", "32", "--lora-dropout", "0",
              "--lora-target-modules", "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"]


def ensure_sample_data(data_dir: str) -> None:
    """Build the bundled sample (stdlib text, ~10 s) when it is missing, as the README says."""
    if (REPO / data_dir / "dataset.json").is_file():
        return
    if data_dir != SAMPLE:
        sys.exit(f"error: {data_dir} has no dataset.json; run python -m data.prepare --out ...")
    print(f"{SAMPLE} missing: building it with python -m data.prepare", flush=True)
    subprocess.run([sys.executable, "-m", "data.prepare"], cwd=REPO, check=True)


def child_env(extra: dict[str, str], threads: int = 1) -> dict[str, str]:
    """The environment of a benchmarked process: fixed thread count plus ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", **extra}


def train_metrics(flags: Sequence[str], env: dict[str, str], steps: int) -> list[dict]:
    """metrics.jsonl of one fresh ``train.py`` run (logged every INTERVAL steps, no eval/save).

    Raises RuntimeError with the tail of the process output when the run fails.
    """
    with tempfile.TemporaryDirectory(prefix="bench-mlx-") as out:
        cmd = [sys.executable, "train.py", *flags, "--bucket", "", "--output-dir", out,
               "--run-name", "bench", "--max-steps", str(steps),
               "--logging-steps", str(INTERVAL), "--eval-steps", str(100 * steps),
               "--save-steps", str(100 * steps)]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
            raise RuntimeError(f"exit {done.returncode}: {' '.join(cmd)}\n" + "\n".join(tail))
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def after_warmup(records: list[dict]) -> dict[str, float]:
    """Medians of the intervals after the first (compile, allocator warm-up); peak memory."""
    timed = records[1:]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "step_time_s": statistics.median(r["step_time_s"] for r in timed),
            "memory_gib": max(r.get("memory_gib", float("nan")) for r in records)}


def stage_flags(stage: str, work: Path) -> tuple[list[str], SftData | None]:
    """Flags selecting the stage's data: the sample shards, or a LoRA base + SFT examples."""
    if stage == "pretrain":
        ensure_sample_data(SAMPLE)
        return ["--config", "smoke", "--data-dir", SAMPLE], None
    from bench.bench_mlx_lora import make_base, make_sft_data

    base = make_base(work / "base")
    data = make_sft_data(base, work / "sft", count=400, seed=0)
    print(f"sft data: {data.describe()}", flush=True)
    return ["--config", "smoke", "--stage", "sft", "--init-from", str(base),
            "--data-dir", str(data.folder), "--warmup-steps", "2", *LORA_FLAGS], data


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=ints, default=[1, 2, 4, 8, 16])
    parser.add_argument("--seq-lens", type=ints, default=[128])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stage", choices=["pretrain", "sft"], default="pretrain")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--threads", type=int, default=1, help="OMP/OpenBLAS threads per run")
    args = parser.parse_args()
    if args.steps < 2 * INTERVAL:
        parser.error(f"--steps must be at least {2 * INTERVAL} (one warm-up interval + one)")
    backend_flags, preload = VARIANTS["mlx-compile" if args.compile else "mlx"]
    env = child_env(preload, args.threads)
    points = [(s, b) for s in args.seq_lens for b in args.batch_sizes]
    results: dict[tuple[int, int], list[dict[str, float]]] = {p: [] for p in points}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as work:
        flags, data = stage_flags(args.stage, Path(work))
        flags += backend_flags
        for repeat in range(args.repeats):
            for seq_len, batch in points:
                records = train_metrics(
                    [*flags, "--seq-len", str(seq_len), "--per-device-train-batch-size",
                     str(batch)], env, args.steps)
                results[seq_len, batch].append(after_warmup(records))
                r = results[seq_len, batch][-1]
                print(f"repeat {repeat + 1}: seq {seq_len:4d} batch {batch:3d} "
                      f"{r['tokens_per_s']:8.0f} tokens/s {1e3 * r['step_time_s']:8.1f} ms/step "
                      f"{r['memory_gib']:.3f} GiB", flush=True)
    print_table(results, args, bool(preload) or "openblas" in os.environ.get("LD_PRELOAD", ""),
                time.perf_counter() - started, data)


def print_table(results: dict[tuple[int, int], list[dict[str, float]]],
                args: argparse.Namespace, openblas: bool, seconds: float,
                data: SftData | None) -> None:
    """Markdown table: medians over repeats; speed-up against the first batch size.

    SFT batches are padded to their longest example, so the padding share (expected over an
    epoch of random batches) and the positions/s the model really runs are shown too.
    """
    tokens = "real tokens/s" if args.stage == "sft" else "tokens/s"
    print(f"\nMLX {args.stage}, tiny GPT-NeoX, {args.steps} steps x {args.repeats} repeats, "
          f"compile {args.compile}, OpenBLAS {'preloaded' if openblas else 'not preloaded'}, "
          f"{args.threads} thread(s), {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"{seconds:.0f} s\n")
    extra = " padding | positions/s |" if data else ""
    print(f"| seq_len | batch | median {tokens} | per repeat | step time | peak memory "
          f"| vs batch {args.batch_sizes[0]} |{extra}")
    print("|---:|---:|---:|---|---:|---:|---:|" + ("---:|---:|" if data else ""))
    for seq_len in args.seq_lens:
        first = statistics.median(r["tokens_per_s"] for r in results[seq_len,
                                                                     args.batch_sizes[0]])
        for batch in args.batch_sizes:
            runs = results[seq_len, batch]
            rate = statistics.median(r["tokens_per_s"] for r in runs)
            step = statistics.median(r["step_time_s"] for r in runs)
            memory = max(r["memory_gib"] for r in runs)
            each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs)
            row = (f"| {seq_len} | {batch} | {rate:.0f} | {each} | {1e3 * step:.1f} ms "
                   f"| {1024 * memory:.1f} MiB | {rate / first:.2f}x |")
            if data:
                positions = data.positions_per_step(batch, seq_len)
                real = batch * statistics.mean(min(n, seq_len) for n in data.lengths)
                row += f" {1 - real / positions:.0%} | {rate * positions / real:.0f} |"
            print(row)


if __name__ == "__main__":
    main()

"""MLX training throughput against torch: tokens/s of train.py with each backend and setting.

Every variant is a fresh ``train.py`` process on the same tiny model, data, batch and sequence
length; variants are interleaved (a, b, c, a, b, c, ...) so machine noise hits all of them;
each figure is the median tokens/s of the logged intervals after the first (warm-up, compile).

    python bench/bench_mlx.py [--steps 30] [--repeats 2] [--variants torch,mlx,mlx-compile,...]

Variants: ``torch`` (eager fp32), ``mlx`` (eager fp32, OpenBLAS preloaded when installed),
``mlx-compile`` (mx.compile), ``mlx-refblas`` (the wheel's own BLAS), ``mlx-bf16``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from utils.mlx_engine.blas import OPENBLAS_OPT_OUT, openblas_preload  # noqa: E402

INTERVAL = 10  # steps per measured interval
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "torch": ([], {}),
    "mlx": (["--backend", "mlx"], openblas_preload()),
    "mlx-compile": (["--backend", "mlx", "--compile"], openblas_preload()),
    "mlx-refblas": (["--backend", "mlx"], {OPENBLAS_OPT_OUT: "0"}),
    "mlx-bf16": (["--backend", "mlx", "--mixed-precision", "bf16"], openblas_preload()),
}


def run(variant: str, data_dir: str, steps: int, seq_len: int, batch: int) -> float:
    """Median tokens/s of one fresh training process, warm-up interval excluded."""
    flags, env = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [sys.executable, "train.py", "--config", "smoke", *flags, "--data-dir", data_dir,
             "--bucket", "", "--output-dir", out, "--max-steps", str(steps),
             "--seq-len", str(seq_len), "--per-device-train-batch-size", str(batch),
             "--logging-steps", str(INTERVAL), "--eval-steps", str(10 * steps),
             "--save-steps", str(10 * steps)],
            cwd=REPO, check=True, capture_output=True, env={**os.environ, **env})
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        return statistics.median(json.loads(line)["tokens_per_s"] for line in lines[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--data-dir", default="data/training/sample")
    parser.add_argument("--variants", default="torch,mlx,mlx-compile,mlx-refblas")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.steps < 2 * INTERVAL:
        parser.error(f"--steps must be at least {2 * INTERVAL} (one warm-up interval + one)")
    results: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names:
            results[name].append(run(name, args.data_dir, args.steps, args.seq_len, args.batch))
            print(f"repeat {repeat + 1}: {name:<12} {results[name][-1]:8.0f} tokens/s", flush=True)
    print(f"\nmedian tokens/s, tiny model, batch {args.batch} x {args.seq_len} tokens, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}:")
    for name, rates in results.items():
        print(f"  {name:<12} {statistics.median(rates):8.0f}")


if __name__ == "__main__":
    main()

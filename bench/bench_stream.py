"""Streaming vs syncing a >= 1 GB bucket (issue 16), side by side in one run (repo root).

A real fake-gcs-server is seeded with --shards .bin shards of --shard-mb MB each (tokens of
the bundled sample corpus, tiled). Each round trains the same tiny model twice, from an
empty data folder: `--sync-data` (today's way: download everything, then train) and
`--stream --cache-limit-gb` (train as soon as the first block is local), in alternating
order. Reported per side:

* time to the first optimizer step: from launching train.py to its step-1 record;
* steady-state tokens/s: median of the per-step figures after --warmup steps;

and the ratios (goal: streaming starts in < 10 s; streamed / synced tokens/s >= 0.97).

    .venv/bin/python bench/bench_stream.py [--shards 256 --shard-mb 4 --steps 200 --rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from gcs_emulator import GcsEmulator  # noqa: E402

BUCKET = "bench-stream"


def _seed(root: Path, shards: int, shard_mb: int) -> int:
    """--shards .bin shards under root/BUCKET/training/, and the dataset.json they share."""
    sample = REPO / "data" / "training" / "sample"
    if not (sample / "shard_00000.npy").exists():
        subprocess.run([sys.executable, "-m", "data.prepare", "--out", str(sample)], cwd=REPO,
                       check=True, capture_output=True)
    tokens = np.load(sample / "shard_00000.npy").astype(np.uint16)
    per_shard = shard_mb * 2**20 // 2
    base = np.resize(tokens, per_shard)
    out = root / BUCKET / "training"
    out.mkdir(parents=True)
    for i in range(shards):
        np.roll(base, i * 7919).tofile(out / f"shard_{i:05d}.bin")
    meta = json.loads((sample / "dataset.json").read_text())
    meta.update(dtype="uint16", tokenizer=str((REPO / "data" / "tokenizer").resolve()))
    (out / "dataset.json").write_text(json.dumps(meta))
    return shards * per_shard * 2


def _train(work: Path, kind: str, args: argparse.Namespace, emulator: GcsEmulator,
           tag: str) -> dict:
    data, out = work / f"data-{tag}", work / f"out-{tag}"
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    how = (["--sync-data"] if kind == "sync" else
           ["--stream", "--cache-limit-gb", str(args.cache_gb), "--prefetch-shards", "4",
            "--shuffle-block-shards", "8"])
    cmd = [sys.executable, "train.py", "--config", "smoke", "--bucket", f"gs://{BUCKET}",
           "--data-dir", str(data), "--output-dir", str(out), "--run-name", tag,
           "--overwrite", "--max-steps", str(args.steps), "--logging-steps", "1",
           "--eval-steps", "100000", "--save-steps", "100000", "--eval-windows", "8", *how]
    env = {**os.environ, "STORAGE_EMULATOR_HOST": emulator.url, "OMP_NUM_THREADS": "2",
           "TMPDIR": str(work), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics, first = out / "metrics.jsonl", None
    while proc.poll() is None:
        if first is None and metrics.exists() and metrics.stat().st_size:
            first = time.perf_counter() - started
        time.sleep(0.01)
    output = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{kind} run failed:\n{output[-3000:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in records if "loss" in r and r["step"] > args.warmup]
    streamed = next((line for line in output.splitlines() if line.startswith("streamed")), "")
    return {"first_step_s": first, "tokens_per_s": statistics.median(steady),
            "streamed": streamed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=256)
    parser.add_argument("--shard-mb", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-gb", type=float, default=0.25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        work = Path(tmp)
        total = _seed(work / "seed", args.shards, args.shard_mb)
        emulator = GcsEmulator(work / "gcs", seed_dir=work / "seed")
        emulator.start(timeout_s=300)
        print(f"bucket: {args.shards} shards x {args.shard_mb} MB = {total / 1e9:.2f} GB; "
              f"stream cache limit {args.cache_gb} GB", flush=True)
        results: dict[str, list[dict]] = {"sync": [], "stream": []}
        try:
            for rnd in range(args.rounds):
                for kind in ("sync", "stream") if rnd % 2 == 0 else ("stream", "sync"):
                    r = _train(work, kind, args, emulator, f"{kind}{rnd}")
                    results[kind].append(r)
                    print(f"round {rnd} {kind:6s}: first step {r['first_step_s']:.1f} s, "
                          f"steady {r['tokens_per_s']:,.0f} tokens/s {r['streamed']}",
                          flush=True)
        finally:
            emulator.stop()
    first = {k: statistics.median(r["first_step_s"] for r in v) for k, v in results.items()}
    speed = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in results.items()}
    print(f"time to first step: sync {first['sync']:.1f} s, stream {first['stream']:.1f} s "
          f"-> {first['sync'] / first['stream']:.1f}x sooner "
          f"({'PASS' if first['stream'] < 10 else 'FAIL'}: goal < 10 s)")
    ratio = speed["stream"] / speed["sync"]
    print(f"steady state: sync {speed['sync']:,.0f}, stream {speed['stream']:,.0f} tokens/s "
          f"-> stream/sync {ratio:.3f} ({'PASS' if ratio >= 0.97 else 'FAIL'}: goal >= 0.97)")


if __name__ == "__main__":
    main()

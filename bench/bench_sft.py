"""LoRA SFT throughput: train.py's SFT stage against a bare peft training loop.

Both train the same LoRA adapters on the same base, examples and batches (same order, so the
same padding), as fresh processes, interleaved (bare, ours, bare, ours, ...) so machine noise
hits both. Each figure is the median tokens/s (real tokens, padding excluded) of the logged
intervals after the first. Prints ours/bare: 1.00 means no overhead (goal: at least 0.97).

    python bench/bench_sft.py [--base latest|PATH] [--data data/examples/sft] [--steps 60]
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

INTERVAL = 10  # steps per measured interval


def bare_loop(base: str, data: str, steps: int, seq_len: int, batch: int, seed: int,
              device: str) -> list[float]:
    """What a minimal peft script does: pad, forward with labels, backward, clip, step."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from utils.data import DataPosition, WindowBatchSampler, train_eval_split
    from utils.stages.examples import data_files, example_lengths, load_sft
    from utils.stages.tokenizers import encoder, load_tokenizer, resolve_tokenizer
    from utils.torch_engine.lora import load_base

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(resolve_tokenizer(Path(base)))
    examples = load_sft(data_files(data), encoder(tokenizer), tokenizer.eos_token_id, seq_len)
    n_eval = min(8, max(1, len(examples) // 10))  # as train.py holds out with --eval-windows 8
    train_idx, _ = train_eval_split(len(examples), n_eval, seed)
    batches = iter(WindowBatchSampler(train_idx, batch, 0, 1, seed, DataPosition(),
                                      example_lengths(examples)))  # as ours: length-grouped
    model = get_peft_model(load_base(Path(base)), LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["query_key_value", "dense"],
        task_type="CAUSAL_LM")).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                  weight_decay=0.1, betas=(0.9, 0.95))
    pad = tokenizer.pad_token_id
    model.train()
    rates, tokens, start = [], 0, time.perf_counter()
    for step in range(steps):
        rows = [examples[i] for i in next(batches)]
        length = max(len(r["input_ids"]) for r in rows)
        ids = np.full((len(rows), length), pad)
        labels = np.full((len(rows), length), -100)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
        tokens += int(mask.sum())
        loss = model(input_ids=torch.from_numpy(ids).to(device),
                     attention_mask=torch.from_numpy(mask).to(device),
                     labels=torch.from_numpy(labels).to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % INTERVAL == 0:
            loss.item()
            now = time.perf_counter()
            rates.append(tokens / (now - start))
            tokens, start = 0, now
    return rates


def ours(base: str, data: str, steps: int, seq_len: int, batch: int, seed: int) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [sys.executable, "train.py", "--config", "smoke", "--stage", "sft", "--init-from",
             base, "--data-dir", data, "--bucket", "", "--output-dir", out,
             "--max-steps", str(steps), "--seq-len", str(seq_len), "--seed", str(seed),
             "--per-device-train-batch-size", str(batch), "--learning-rate", "1e-3",
             "--warmup-steps", "0", "--lora-dropout", "0.1", "--eval-windows", "8",
             "--logging-steps", str(INTERVAL), "--eval-steps", str(10 * steps),
             "--save-steps", str(10 * steps)],
            cwd=REPO, check=True, capture_output=True)
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["tokens_per_s"] for line in lines]


def resolve(base: str) -> str:
    """``latest`` (of the smoke run, as the sft preset) or a path, as an absolute path."""
    from configs.training_config import TrainingConfig
    from utils.stages.init_from import resolve_base

    return str(resolve_base(TrainingConfig(stage="sft", init_from=base, init_run="smoke",
                                           run_name="bench")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="latest",
                        help="base model: a checkpoint/HF folder, or latest (of run smoke)")
    parser.add_argument("--data", default="data/examples/sft")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_only:  # child process: print the bare loop's rates
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(json.dumps(bare_loop(args.base, args.data, args.steps, args.seq_len, args.batch,
                                   args.seed, device)))
        return
    base = resolve(args.base)
    print(f"base {base}, data {args.data}, {args.steps} steps x batch {args.batch}, "
          f"seq_len {args.seq_len}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    bare_runs, our_runs = [], []
    for _ in range(args.repeats):
        child = subprocess.run(
            [sys.executable, __file__, "--bare-only", "--base", base, "--data", args.data,
             "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch",
             str(args.batch), "--seed", str(args.seed)],
            cwd=REPO, check=True, capture_output=True, text=True)
        bare_runs.append(statistics.median(json.loads(child.stdout.splitlines()[-1])[1:]))
        our_runs.append(statistics.median(
            ours(base, args.data, args.steps, args.seq_len, args.batch, args.seed)[1:]))
        print(f"bare {bare_runs[-1]:8.0f} tok/s   ours {our_runs[-1]:8.0f} tok/s", flush=True)
    bare, mine = statistics.median(bare_runs), statistics.median(our_runs)
    print(f"median: bare peft loop {bare:.0f} tok/s, train.py sft {mine:.0f} tok/s, "
          f"ratio ours/bare = {mine / bare:.3f} (goal >= 0.97)")


if __name__ == "__main__":
    main()

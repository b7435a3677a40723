"""Chunked LM-head cross-entropy against the whole-logits path: peak memory and time on the CPU.

A wide vocabulary (50304) on the tiny model (hidden 256), 10 x 512 tokens per step: the
plain path's fp32 logits alone are 1.03 GB. Each (scope, chunk) runs in a fresh process, so
its peak resident set (``ru_maxrss``) is its own; "extra" is that peak minus the resident set
just before the first step (the step's transient memory). Scopes: ``head`` is the LM head +
cross-entropy alone on random hidden states, ``model`` is ``causal_lm_loss`` on the whole
model (what a training step runs). Time is the median forward+backward after a warm-up step;
"largest" is the biggest tensor any op created during that warm-up step. chunk 0 = today's path.

    python bench/bench_loss.py [--variants head:0,head:1024,model:0,...] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VOCAB, BATCH, SEQ = 50304, 10, 512


def measure(scope: str, chunk: int, steps: int) -> dict:
    """One variant, in this (fresh) process."""
    import psutil
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from configs.training_config import preset
    from utils.torch_engine.chunked_ce import chunked_cross_entropy
    from utils.torch_engine.losses import causal_lm_loss
    from utils.torch_engine.model import build_model

    torch.manual_seed(0)
    model = build_model(replace(preset("smoke"), loss_chunk_tokens=chunk), {"vocab_size": VOCAB})
    windows = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    hidden = torch.zeros(())  # the head scope's input
    if scope == "model":
        def step() -> None:
            causal_lm_loss(model, windows).backward()
    else:
        weight = model.get_output_embeddings().weight
        hidden = torch.randn(BATCH * SEQ, weight.shape[1], requires_grad=True)
        targets = windows[:, 1:].reshape(-1)

        def step() -> None:
            if chunk > 0:
                loss = chunked_cross_entropy(hidden, weight, targets, chunk) / targets.numel()
            else:
                loss = F.cross_entropy(F.linear(hidden, weight).float(), targets)
            loss.backward()

    class Largest(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.nbytes = max(Largest.nbytes, t.numel() * t.element_size())
            return out

    before = psutil.Process().memory_info().rss
    with Largest():  # the warm-up step, untimed
        step()
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        hidden.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"scope": scope, "chunk": chunk, "s": statistics.median(times),
            "peak_gb": peak / 1e9, "extra_gb": (peak - before) / 1e9,
            "largest_gb": Largest.nbytes / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="head:0,head:1024,model:0,model:1024",
                        help="scope:chunk pairs; chunk 0 = the whole-logits path")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # scope chunk: child mode
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.steps)))
        return
    print(f"vocab {VOCAB}, hidden 256, {BATCH} x {SEQ} tokens: whole fp32 logits "
          f"{BATCH * SEQ * VOCAB * 4 / 1e9:.2f} GB")
    print("| scope | chunk | peak RSS GB | extra GB | largest tensor GB | fwd+bwd s |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for variant in args.variants.split(","):
        scope, chunk = variant.split(":")
        out = subprocess.run([sys.executable, __file__, "--one", scope, chunk,
                              "--steps", str(args.steps)],
                             cwd=REPO, check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"| {scope} | {row['chunk'] or 'whole'} | {row['peak_gb']:.2f} | "
              f"{row['extra_gb']:.2f} | {row['largest_gb']:.3f} | {row['s']:.2f} |", flush=True)
    for row in rows:
        plain = next((r for r in rows if r["scope"] == row["scope"] and r["chunk"] == 0), None)
        if plain and row["chunk"] > 0:
            print(f"{row['scope']}, chunk {row['chunk']}: whole/chunked extra memory "
                  f"{plain['extra_gb'] / max(row['extra_gb'], 1e-9):.1f}x, peak RSS "
                  f"{plain['peak_gb'] / row['peak_gb']:.2f}x, time {plain['s'] / row['s']:.2f}x")

if __name__ == "__main__":
    main()

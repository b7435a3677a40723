"""Harness overhead: tokens/s of train.py against a bare forward/backward/step loop.

Both run the same tiny model on the same data, batch and sequence length, as fresh
processes, interleaved (bare, harness, bare, harness, ...) so machine noise hits
both; each figure is the median tokens/s of the logged intervals after warm-up.
Prints bare/harness: 1.00 means no overhead (goal: at most 1.03).

    python bench/bench_overhead.py [--steps 60] [--repeats 3] [--data-dir data/training/sample]
        [--report-to tensorboard,wandb] [--log-mirror-minutes 0.005]

``--report-to`` is passed to train.py (W&B runs offline, into the run's temporary folder);
``--log-mirror-minutes M`` gives train.py a local-directory bucket and copies its logs there
every M minutes (at most once a second), so the background mirror runs during the measured
steps. The bare loop is the same either way.
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


def bare_loop(data_dir: str, steps: int, seq_len: int, batch: int) -> list[float]:
    """The minimum a training loop does: next batch, forward, backward, clip, step."""
    import numpy as np
    import torch

    from configs.training_config import PRESETS
    from utils.data import TokenWindows, find_shards, read_dataset_meta
    from utils.torch_engine.losses import causal_lm_loss
    from utils.torch_engine.model import build_model
    from utils.torch_engine.optim import build_adamw

    torch.manual_seed(0)
    config = PRESETS["smoke"]
    windows = TokenWindows(find_shards(Path(data_dir)), seq_len)
    model = build_model(config, read_dataset_meta(Path(data_dir)))
    optimizer = build_adamw(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    order = np.random.default_rng(0).permutation(len(windows))
    rates, start = [], time.perf_counter()
    for step in range(steps):
        idx = order[step * batch:(step + 1) * batch]
        x = torch.from_numpy(np.stack([windows[i] for i in idx]))
        loss = causal_lm_loss(model, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % INTERVAL == 0:
            loss.item()
            now = time.perf_counter()
            rates.append(INTERVAL * batch * seq_len / (now - start))
            start = now
    return rates


def harness(data_dir: str, steps: int, seq_len: int, batch: int, report_to: str = "tensorboard",
            mirror_minutes: float = 0.0) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        extra, env = ["--report-to", report_to], {**os.environ}
        if "wandb" in report_to:
            env.update(WANDB_MODE="offline", WANDB_DIR=out, WANDB_SILENT="true")
        if mirror_minutes > 0:
            extra += ["--log-upload-minutes", str(mirror_minutes)]
        bucket = str(Path(out) / "bucket") if mirror_minutes > 0 else ""
        subprocess.run(
            [sys.executable, "train.py", "--config", "smoke", "--data-dir", data_dir,
             "--bucket", bucket, "--output-dir", out, "--max-steps", str(steps),
             "--seq-len", str(seq_len), "--per-device-train-batch-size", str(batch),
             "--logging-steps", str(INTERVAL), "--eval-steps", str(10 * steps),
             "--save-steps", str(10 * steps), *extra],
            cwd=REPO, check=True, capture_output=True, env=env)
        if mirror_minutes > 0 and not list((Path(bucket) / "logs").rglob("events.out.*")):
            raise SystemExit("the log mirror copied no event files: the bench measured nothing")
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        return [r["tokens_per_s"] for r in records if "event" not in r]  # not checkpoint lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--data-dir", default="data/training/sample")
    parser.add_argument("--report-to", default="tensorboard", help="train.py's --report-to")
    parser.add_argument("--log-mirror-minutes", type=float, default=0.0,
                        help="copy the logs to a local bucket this often (0 = no bucket)")
    parser.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_only:  # child process: print the bare loop's rates
        print(json.dumps(bare_loop(args.data_dir, args.steps, args.seq_len, args.batch)))
        return
    bare_runs, harness_runs = [], []
    for _ in range(args.repeats):
        child = subprocess.run(
            [sys.executable, __file__, "--bare-only", "--steps", str(args.steps),
             "--seq-len", str(args.seq_len), "--batch", str(args.batch),
             "--data-dir", args.data_dir], cwd=REPO, check=True, capture_output=True,
            text=True, env={**os.environ})
        bare_runs.append(statistics.median(json.loads(child.stdout)[1:]))
        harness_runs.append(statistics.median(
            harness(args.data_dir, args.steps, args.seq_len, args.batch, args.report_to,
                    args.log_mirror_minutes)[1:]))
        print(f"bare {bare_runs[-1]:8.0f} tok/s   harness {harness_runs[-1]:8.0f} tok/s")
    bare, ours = statistics.median(bare_runs), statistics.median(harness_runs)
    print(f"train.py --report-to {args.report_to}, log mirror every "
          f"{args.log_mirror_minutes or 'never'} min")
    print(f"median: bare {bare:.0f} tok/s, train.py {ours:.0f} tok/s, "
          f"ratio bare/harness = {bare / ours:.3f} (goal <= 1.03)")


if __name__ == "__main__":
    main()

"""Our MLX LoRA SFT against ``mlx_lm lora`` (mlx-lm's own trainer): same model, data, settings.

Both sides are fresh processes, alternating (mlx_lm, ours, ours, mlx_lm, ...) so machine noise
hits both, on the same tiny GPT-NeoX base (5 torch steps of the smoke preset), the same
generated prompt/completion examples (40-120 tokens, completion tokens trained only), batch,
max length 128, LoRA r 16 / scale 2 (alpha 32) on the four linear layers of every block,
dropout 0, AdamW, fp32, compiled step, OpenBLAS preloaded, no evaluation while timed.

    python bench/bench_mlx_lora.py [--steps 60] [--repeats 3] [--batch 4] [--no-compile]

What is compared (the first logged interval, compile warm-up, is dropped on both sides):

* iterations/s, wall clock between two reports (batching and host work included): the
  apples-to-apples figure, as both draw examples from the same length distribution;
* real tokens/s: prompt + completion + EOS tokens of the batches, padding excluded (ours logs
  that as ``tokens_per_s``; for mlx_lm the batches are counted as they are yielded);
* each side's own figure: mlx_lm's ``Tokens/sec`` counts only the trained (completion + EOS)
  tokens and its timer leaves out batch building, so it is not comparable to ours as printed;
* positions/step: what the model runs, padding included. mlx_lm pads a batch to 1 + a
  multiple of 32 and means to sort examples by length first, but in mlx-lm 0.32.2 that sort
  is a no-op on local JSONL (``CacheDataset.itemlen`` is the raw record's len(), its number
  of keys): its batches are consecutive examples in file order. Ours are length-grouped
  batches (``utils.data.group_by_length``) padded to their longest example.

mlx_lm formats prompt/completion pairs with the tokenizer's chat template and our tokenizer
has none: its model folder here is a symlinked copy of the base whose tokenizer_config.json
adds a template that renders ``prompt + completion + EOS``, the exact token ids of our SFT
tokenization (checked before the run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_mlx import INTERVAL  # noqa: E402
from bench.bench_mlx_sweep import (  # noqa: E402
    LORA_FLAGS,
    SAMPLE,
    child_env,
    ensure_sample_data,
    train_metrics,
)
from utils.mlx_engine.blas import openblas_preload  # noqa: E402

KEYS = ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]
TEMPLATE = ("{% for m in messages %}{{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")
LR = 1e-4

# mlx_lm's own `mlx_lm lora` CLI with one reporting callback added (its trainer, batching and
# compiled step untouched): prints a timestamp per report and counts the real tokens and the
# positions (padding included) of the batches its iterate_batches yields.
MLX_LM_HOOK = """
import functools, json, sys, time
import numpy as np
import mlx_lm.lora as lora
from mlx_lm.tuner import trainer
from mlx_lm.tuner.callbacks import TrainingCallback
real, positions = [0], [0]
def counting(*args, **kwargs):
    for batch, lengths in trainer.iterate_batches(*args, **kwargs):
        real[0] += int(np.array(lengths)[:, 1].sum())
        positions[0] += batch.shape[0] * (batch.shape[1] - 1)  # the model sees batch[:, :-1]
        yield batch, lengths
class Report(TrainingCallback):
    def on_train_loss_report(self, info):
        info = {k: float(v) for k, v in info.items()}
        print("BENCH", json.dumps({"t": time.perf_counter(), "real_tokens": real[0],
                                   "positions": positions[0], **info}), flush=True)
        real[0] = positions[0] = 0
lora.get_reporting_callbacks = lambda *a, **k: Report()
lora.train = functools.partial(trainer.train, iterate_batches=counting)
sys.argv = ["mlx_lm.lora", *sys.argv[1:]]
lora.main()
"""


@dataclass
class SftData:
    """A folder with train.jsonl (read by both sides) and its token statistics."""

    folder: Path
    examples: int
    mean_tokens: float  # prompt + completion + EOS per example: real (non-padding) tokens
    mean_trained: float  # completion + EOS per example: what mlx_lm's Tokens/sec counts
    lengths: list[int]  # real tokens of each example

    def describe(self) -> str:
        return (f"{self.examples} examples, {min(self.lengths)}-{max(self.lengths)} tokens, "
                f"mean {self.mean_tokens:.1f} (completion + EOS {self.mean_trained:.1f})")

    def positions_per_step(self, batch: int, seq_len: int, grouped: bool = True) -> float:
        """Mean token positions our model runs per step, padding included, over 20 epochs.

        The batches of train.py's own sampler, length-grouped as in a LoRA run (or random with
        ``grouped=False``), each right-padded to its longest example.
        """
        import numpy as np

        from utils.data import DataPosition, WindowBatchSampler

        lengths = np.array(self.lengths)
        batches = iter(WindowBatchSampler(np.arange(self.examples), batch, 0, 1, 42,
                                          DataPosition(), lengths if grouped else None))
        widths = [min(int(lengths[next(batches)].max()), seq_len)
                  for _ in range(20 * (self.examples // batch))]
        return batch * statistics.mean(widths)


def make_base(out: Path) -> Path:
    """A tiny GPT-NeoX checkpoint (5 torch steps of the smoke preset): model + tokenizer."""
    found = sorted((out / "checkpoints").glob("checkpoint-*"))
    if not found:
        ensure_sample_data(SAMPLE)
        subprocess.run(
            [sys.executable, "train.py", "--config", "smoke", "--bucket", "", "--max-steps", "5",
             "--save-steps", "5", "--eval-steps", "5", "--output-dir", str(out)],
            cwd=REPO, check=True, capture_output=True, env=child_env({}, 2))
        found = sorted((out / "checkpoints").glob("checkpoint-*"))
    return found[-1]


def make_sft_data(base: Path, folder: Path, count: int, seed: int, min_tokens: int = 40,
                  max_tokens: int = 120) -> SftData:
    """``count`` prompt/completion pairs cut from the stdlib corpus at word boundaries.

    Lengths (with EOS) spread over [min_tokens, max_tokens] (targets drawn uniformly); the
    prompt takes 30-70 % of the words. Cutting before a space keeps the two pieces' tokens
    identical whether tokenized apart (ours) or as one rendered text (mlx_lm's template).
    """
    from transformers import AutoTokenizer

    from data.prepare import stdlib_files

    tokenizer = AutoTokenizer.from_pretrained(base)
    files, _ = stdlib_files(2_000_000)
    words = " ".join(" ".join(p.read_text(errors="replace").split()) for p in files).split(" ")
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    sizes: list[tuple[int, int]] = []
    per_word = 1.6  # tokens per word of this corpus, refined as examples are accepted
    while len(rows) < count:
        target = rng.randint(min_tokens, max_tokens)
        n = max(4, round(target / per_word))
        split = max(1, round(n * rng.uniform(0.3, 0.7)))
        start = rng.randrange(len(words) - n)
        prompt = " ".join(words[start:start + split])
        completion = " " + " ".join(words[start + split:start + n])
        p, c = (len(ids) for ids in tokenizer([prompt, completion],
                                              add_special_tokens=False)["input_ids"])
        per_word = 0.9 * per_word + 0.1 * (p + c) / n
        if min_tokens <= p + c + 1 <= max_tokens and p >= 4 and c >= 4:
            rows.append({"prompt": prompt, "completion": completion})
            sizes.append((p, c + 1))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    totals = [p + c for p, c in sizes]
    return SftData(folder, count, statistics.mean(totals), statistics.mean(c for _, c in sizes),
                   totals)


def mlx_lm_model(base: Path, folder: Path) -> Path:
    """The base as mlx_lm sees it: symlinked weights, tokenizer config plus a chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        link = folder / name
        if not link.exists():
            link.symlink_to(base / name)
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return folder


def check_same_tokens(model: Path, base: Path, data: SftData) -> None:
    """mlx_lm's (tokens, prompt offset) must equal our prompt ids + completion ids + EOS."""
    code = (
        "import json, sys\n"
        "from mlx_lm import load\n"
        "from mlx_lm.tuner.datasets import CompletionsDataset\n"
        "from transformers import AutoTokenizer\n"
        "_, tok = load(sys.argv[1])\n"
        "ours = AutoTokenizer.from_pretrained(sys.argv[2])\n"
        "rows = [json.loads(x) for x in open(sys.argv[3])][:50]\n"
        "ds = CompletionsDataset(rows, tok, 'prompt', 'completion', True)\n"
        "for r in rows:\n"
        "    p, c = ours([r['prompt'], r['completion']], add_special_tokens=False)['input_ids']\n"
        "    assert ds.process(r) == (p + c + [ours.eos_token_id], len(p)), r\n")
    subprocess.run([sys.executable, "-c", code, str(model), str(base),
                    str(data.folder / "train.jsonl")], cwd=REPO, check=True,
                   env=child_env(openblas_preload()))


def run_mlx_lm(model: Path, data: SftData, batch: int, seq_len: int, steps: int, work: Path,
               compile: bool) -> list[dict]:
    """Per-interval figures of one ``mlx_lm lora`` process, the first (warm-up) left out.

    mlx_lm always compiles its step; ``compile=False`` turns that off with MLX_DISABLE_COMPILE.
    """
    config = {
        "model": str(model), "train": True, "data": str(data.folder), "fine_tune_type": "lora",
        "num_layers": -1, "batch_size": batch, "iters": steps, "max_seq_length": seq_len,
        "mask_prompt": True, "learning_rate": LR, "optimizer": "adamw",
        "optimizer_config": {"adamw": {"weight_decay": 0.1, "betas": [0.9, 0.95],
                                       "eps": 1e-8}},
        "lora_parameters": {"rank": 16, "scale": 2.0, "dropout": 0.0, "keys": KEYS},
        "steps_per_report": INTERVAL, "steps_per_eval": 100 * steps,
        "save_every": 100 * steps, "val_batches": 0, "adapter_path": str(work / "adapters"),
        "seed": 0,
    }
    config_file = work / "mlx_lm_lora.yaml"
    config_file.write_text(json.dumps(config, indent=1))  # JSON is YAML
    done = subprocess.run([sys.executable, "-c", MLX_LM_HOOK, "-c", str(config_file)],
                          cwd=REPO, capture_output=True, text=True,
                          env=child_env({**openblas_preload(),
                                         **({} if compile else {"MLX_DISABLE_COMPILE": "1"})}))
    if done.returncode != 0:
        raise RuntimeError("mlx_lm lora failed:\n" + (done.stdout + done.stderr)[-3000:])
    reports = [json.loads(line[6:]) for line in done.stdout.splitlines()
               if line.startswith("BENCH ")]
    out = []
    for prev, cur in zip(reports, reports[1:], strict=False):
        seconds = cur["t"] - prev["t"]
        its = cur["iteration"] - prev["iteration"]
        out.append({"it_per_s": its / seconds, "real_tokens_per_s": cur["real_tokens"] / seconds,
                    "positions_per_step": cur["positions"] / its,
                    "own_tokens_per_s": cur["tokens_per_second"],
                    "own_it_per_s": cur["iterations_per_second"]})
    return out


def run_ours(base: Path, data: SftData, batch: int, seq_len: int, steps: int,
             compile: bool) -> list[dict]:
    """Per-interval figures of one ``train.py --backend mlx --stage sft [--compile]`` run."""
    flags = ["--backend", "mlx", "--stage", "sft", "--init-from", str(base),
             "--data-dir", str(data.folder), "--seq-len", str(seq_len),
             "--per-device-train-batch-size", str(batch), "--warmup-steps", "2",
             "--learning-rate", str(LR), "--weight-decay", "0.1", *LORA_FLAGS,
             *(["--compile"] if compile else [])]
    records = train_metrics(flags, child_env(openblas_preload()), steps)
    positions = data.positions_per_step(batch, seq_len)  # not logged: expected from the data
    return [{"it_per_s": 1 / r["step_time_s"], "real_tokens_per_s": r["tokens_per_s"],
             "positions_per_step": positions,
             "own_tokens_per_s": r["tokens_per_s"], "own_it_per_s": 1 / r["step_time_s"]}
            for r in records[1:]]


def median(runs: list[list[dict]], key: str) -> float:
    """Median over every timed interval of every repeat."""
    values = [r[key] for run in runs for r in run]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compiled steps on both sides (mlx_lm: MLX_DISABLE_COMPILE=1 if off)")
    parser.add_argument("--only", choices=["mlx_lm", "ours"], help="run one side (debugging)")
    parser.add_argument("--work", type=Path, help="keep base/data here (default: a temp dir)")
    args = parser.parse_args()
    if args.steps < 2 * INTERVAL:
        parser.error(f"--steps must be at least {2 * INTERVAL} (one warm-up interval + one)")
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        work = args.work or Path(tmp)
        base = make_base(work / "base")
        data = make_sft_data(base, work / "sft", args.examples, seed=0,
                             max_tokens=min(120, args.seq_len))
        model = mlx_lm_model(base, work / "mlx_lm_model")
        check_same_tokens(model, base, data)
        print(f"base {base}\ndata {data.describe()}; identical token ids on both sides\n"
              f"batch {args.batch}, seq_len {args.seq_len}, {args.steps} steps, compile "
              f"{args.compile}, OpenBLAS "
              f"{'preloaded' if openblas_preload() else 'NOT preloaded'}", flush=True)
        sides = ["mlx_lm", "ours"] if args.only is None else [args.only]
        results: dict[str, list[list[dict]]] = {side: [] for side in sides}
        started = time.perf_counter()
        for repeat in range(args.repeats):
            for side in sides if repeat % 2 == 0 else sides[::-1]:
                run = (run_mlx_lm(model, data, args.batch, args.seq_len, args.steps, work,
                                  args.compile)
                       if side == "mlx_lm" else
                       run_ours(base, data, args.batch, args.seq_len, args.steps, args.compile))
                results[side].append(run)
                print(f"repeat {repeat + 1}: {side:<6} "
                      f"{median([run], 'it_per_s'):6.2f} it/s "
                      f"{median([run], 'real_tokens_per_s'):7.0f} real tokens/s "
                      f"(own figure {median([run], 'own_tokens_per_s'):7.0f})", flush=True)
    report(results, args, data, time.perf_counter() - started)


def report(results: dict[str, list[list[dict]]], args: argparse.Namespace, data: SftData,
           seconds: float) -> None:
    """Markdown table of medians and the ours / mlx_lm ratios."""
    print(f"\n{args.repeats} repeats x {args.steps} steps, {seconds:.0f} s, "
          f"load {os.getloadavg()[0]:.1f}\n")
    print("| side | it/s (wall) | real tokens/s | real tokens/step | positions/step "
          "| positions/s | own tokens/s | own it/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for side, runs in results.items():
        it = median(runs, "it_per_s")
        real = median(runs, "real_tokens_per_s")
        positions = median(runs, "positions_per_step")
        print(f"| {side} | {it:.2f} | {real:.0f} | {real / it:.0f} | {positions:.0f} "
              f"| {positions * it:.0f} | {median(runs, 'own_tokens_per_s'):.0f} "
              f"| {median(runs, 'own_it_per_s'):.2f} |")
    plain = data.positions_per_step(args.batch, args.seq_len, grouped=False)
    print(f"\nreal tokens/step expected: {args.batch * data.mean_tokens:.0f} (batch x mean "
          f"example length). positions/step: what the model runs, padding included (mlx_lm: "
          f"counted; ours: expected from our sampler, {plain:.0f} with random "
          f"batches). mlx_lm's own tokens/s "
          f"counts completion + EOS only ({data.mean_trained / data.mean_tokens:.0%} of real "
          f"tokens) over its step timer.")
    if len(results) == 2:
        for key in ("it_per_s", "real_tokens_per_s"):
            ratio = median(results["ours"], key) / median(results["mlx_lm"], key)
            print(f"ours / mlx_lm, {key}: {ratio:.3f}")

if __name__ == "__main__":
    main()

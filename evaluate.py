"""Score a checkpoint on downstream tasks, offline, on either backend (as ``--eval-tasks`` does
while training).

    python evaluate.py outputs/smoke/checkpoints/CKPT --tasks python-syntax,python-lines
    python evaluate.py outputs/sft/merged --tasks arithmetic,capitals --backend mlx
    python evaluate.py CKPT --tasks my_task.jsonl --examples 0 --output scores.json

CKPT is a checkpoint, a merged or Hugging Face GPT-NeoX folder, or a LoRA checkpoint (merged
onto its recorded base on load). Tasks are shipped names (``data/eval_tasks/NAME.jsonl``) or
JSONL paths in the format of ``utils/stages/downstream.py``. Prints one line per metric;
``--output`` also writes them, with every example's per-choice log-likelihoods, as JSON.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from configs.cli import OneLineParser, count, number, run_main
from utils.errors import ConfigError, HarnessError
from utils.stages.downstream import (
    Score,
    build_requests,
    example_results,
    load_task,
    local_sums,
    run_requests,
    task_files,
    task_metrics,
)
from utils.stages.init_from import check_base
from utils.stages.tokenizers import load_tokenizer, resolve_tokenizer


def torch_scorer(path: Path) -> Score:
    import torch

    from utils.torch_engine.lora import load_base
    from utils.torch_engine.scoring import score_batch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_base(path).to(device).eval()
    return lambda batch: score_batch(model, batch, device)


def mlx_scorer(path: Path) -> Score:
    from utils.mlx_engine.lora import load_base
    from utils.mlx_engine.scoring import score_batch

    model, _ = load_base(path)
    model.eval()
    return lambda batch: score_batch(model, batch)


def evaluate(path: Path, tasks: str, backend: str = "torch", examples: int = 0,
             max_length: int = 0, batch_tokens: int = 4096) -> dict:
    """{"metrics": {eval/TASK/METRIC: value}, "examples": {TASK: [per-example results]}}."""
    check_base(path)
    tokenizer = load_tokenizer(resolve_tokenizer(path))
    loaded = [load_task(file, examples) for file in task_files(tasks)]  # bad files: first
    score = (mlx_scorer if backend == "mlx" else torch_scorer)(path)
    positions = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    out: dict = {"metrics": {}, "examples": {}}
    for task in loaded:
        requests = build_requests(
            task, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], prefix,
            max_length or positions or 2048)
        per_example = example_results(task, requests, run_requests(
            requests, score, pad, 0, 1, batch_tokens))
        out["metrics"].update(task_metrics(task, local_sums(task, per_example)))
        out["examples"][task.name] = [asdict(per_example[i]) for i in range(len(task.examples))]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="evaluate.py", description=__doc__.splitlines()[0],
                           allow_abbrev=False)
    parser.add_argument("checkpoint", type=Path, help="checkpoint or GPT-NeoX model folder")
    parser.add_argument("--tasks", required=True,
                        help="shipped task names or .jsonl paths, comma-separated")
    parser.add_argument("--backend", choices=("torch", "mlx"), default="torch")
    parser.add_argument("--examples", type=number(int, count(0, "0 = all")), default=0,
                        help="the first N examples of each task (0 = all)")
    parser.add_argument("--max-length", type=number(int, count(0, "0 = the model's")),
                        default=0, help="tokens the model sees; longer rows lose their start")
    parser.add_argument("--batch-tokens", type=number(int, count(1)), default=4096,
                        help="padded tokens per forward pass")
    parser.add_argument("--output", type=Path, help="also write metrics and examples as JSON")
    args = parser.parse_args(argv)
    if args.backend == "mlx":
        from utils.mlx_engine.blas import reexec_with_openblas

        reexec_with_openblas()
    if not args.checkpoint.is_dir():
        parser.error(f"{args.checkpoint} is not a folder: pass a checkpoint or model folder")
    try:
        result = evaluate(args.checkpoint, args.tasks, args.backend, args.examples,
                          args.max_length, args.batch_tokens)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    for key, value in result["metrics"].items():
        print(f"{key}: {value:.4f}", flush=True)
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_main(main, "evaluate.py")

"""Data and helpers shared by the LoRA tests of both backends (test_finetune, test_mlx_finetune).

Arithmetic questions a 30-step base cannot answer, so learning them is visible; preferences of
an answer over a refusal, which a short DPO run learns.
"""

from __future__ import annotations

import json
from pathlib import Path

PAIRS = [(a, b) for a in range(10) for b in range(10)]
TRAIN_PAIRS, HELD_OUT_PAIRS = PAIRS[::2], PAIRS[1::2][:16]
LORA = ["--config", "smoke", "--bucket", "", "--seq-len", "64", "--eval-windows", "4",
        "--eval-steps", "1000", "--logging-steps", "5", "--warmup-steps", "2",
        "--per-device-train-batch-size", "8", "--save-total-limit", "0"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def qa(pairs) -> list[dict]:
    return [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in pairs]


def prefs(pairs) -> list[dict]:
    return [{"prompt": f"Question: What is {a} + {b}?\nAnswer:", "chosen": f" {a + b}",
             "rejected": f" {a + b + 1}"} for a, b in pairs]


def refusals(pairs) -> list[dict]:
    """Preferences a 30-step base can learn quickly: an answer over a refusal."""
    return [{"prompt": f"Question: What is {a} + {b}?\nAnswer:", "chosen": f" {a + b}",
             "rejected": " I do not know"} for a, b in pairs]


def error_line(stderr: str) -> str:
    return next(line for line in stderr.replace("\r", "\n").splitlines()
                if line.startswith("error:"))


def mean_answer_logp(model, examples, pad_id: int) -> float:
    """A torch model's mean summed log-probability of the examples' answers."""
    import torch

    from utils.torch_engine.losses import answer_logps

    batch = torch_collate(examples, pad_id, pairs=False)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
    return answer_logps(logits, batch["labels"]).mean().item()


def torch_collate(examples, pad_id: int, pairs: bool) -> dict:
    """pad_sft / pad_dpo as torch tensors, as the torch engine's loader gives them."""
    import torch

    from utils.stages.examples import pad_dpo, pad_sft

    batch = (pad_dpo if pairs else pad_sft)(examples, pad_id)
    return {key: torch.from_numpy(value) for key, value in batch.items()}

"""Print completions from a model: a checkpoint, a merged or Hugging Face folder, plus adapters.

    python generate.py --model outputs/sft/merged --prompt "What is 2 + 3?" --template question
    python generate.py --model BASE_DIR --adapter outputs/sft/checkpoints/CKPT --prompt "..."
    python generate.py --adapter outputs/sft/checkpoints/CKPT --prompt "..."   # its own base

``--model`` may itself be a LoRA checkpoint (merged onto its recorded base on load).
``--template question|chat`` wraps each prompt the way the SFT data was formatted.
Greedy decoding unless ``--temperature`` > 0.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from configs.cli import RANGES, OneLineParser, Range, count, number, run_main
from utils.checkpoint import CheckpointError
from utils.checkpoint.format import ADAPTER_CONFIG
from utils.stages.examples import TEMPLATES, format_prompt
from utils.stages.init_from import adapter_base
from utils.stages.tokenizers import load_tokenizer, resolve_tokenizer


def load(model_dir: Path | None, adapter_dir: Path | None):
    """(model, tokenizer); the adapter is applied unmerged, as it was trained."""
    from utils.torch_engine.lora import load_base  # torch: seconds, after the flags are checked

    if adapter_dir is not None:
        if not (adapter_dir / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"--adapter {adapter_dir} has no {ADAPTER_CONFIG}; pass a "
                                  f"LoRA checkpoint folder, or give the model as --model")
        from peft import PeftModel

        model_dir = model_dir or adapter_base(adapter_dir)
        model = PeftModel.from_pretrained(load_base(model_dir), adapter_dir)
    else:
        model = load_base(model_dir)
    tokenizer = load_tokenizer(resolve_tokenizer(adapter_dir or model_dir))
    return model.eval(), tokenizer


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 40,
             temperature: float = 0.0, seed: int = 0) -> str:
    """The completion of ``prompt`` (up to EOS or max_new_tokens), without the prompt."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])  # an empty prompt: start of a document
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None,
                             top_p=None, top_k=None,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="generate.py", description=__doc__.splitlines()[0],
                           allow_abbrev=False)
    parser.add_argument("--model", type=Path, help="checkpoint or Hugging Face GPT-NeoX folder")
    parser.add_argument("--adapter", type=Path, help="LoRA checkpoint to apply on --model")
    parser.add_argument("--prompt", action="append", required=True,
                        help="text to complete (repeat for several)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="raw")
    parser.add_argument("--max-new-tokens", type=number(int, count(1)), default=40)
    parser.add_argument("--temperature", type=number(float, Range(0, note="0 = greedy")),
                        default=0.0)
    parser.add_argument("--seed", type=number(int, RANGES["seed"]), default=0)
    args = parser.parse_args(argv)
    if args.model is None and args.adapter is None:
        parser.error("pass --model DIR, --adapter DIR, or both")
    try:
        model, tokenizer = load(args.model, args.adapter)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for prompt in args.prompt:
        text = format_prompt(prompt, args.template)
        completion = generate(model, tokenizer, text, args.max_new_tokens, args.temperature,
                              args.seed)
        print(f"### {text}\n{completion}\n", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_main(main, "generate.py")

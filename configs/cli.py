"""Dataclass fields -> command-line flags, with one-line errors.

``--config NAME`` picks a preset; every ``TrainingConfig`` field can then be
overridden as ``--field-name VALUE`` (booleans as ``--flag/--no-flag``).
Bad input exits 2 with a single line that names the valid choices.

Every number a flag takes has its range in :data:`RANGES` (one entry per int or float field
of ``TrainingConfig``): ``inf``, ``nan``, negatives and zeros where they mean nothing are
refused here, at parse time, instead of surfacing later as an OverflowError in a thread or an
assertion inside torch. The other entry points use the same :class:`Range` through
:func:`number`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from configs.model_config import LORA_TARGETS, MODEL_SIZES
from configs.training_config import PRESETS, QUANT_BITS, TrainingConfig, run_name_problem
from utils.errors import ConfigError
from utils.secrets import credentials_problem

BUCKET_ENV = "HARNESS_BUCKET"
TRACKERS = ("tensorboard", "wandb")  # what --report-to may list (or "none")
# Whole numbers (steps, windows, tokens, ...) above this are typos: numpy, torch and MLX index with
# 64-bit integers, and no run takes two billion steps.
INT_LIMIT = 2**31 - 1
WEEK_MINUTES = 7 * 24 * 60
WEEK_S = WEEK_MINUTES * 60.0


@dataclass(frozen=True)
class Range:
    """The numbers a flag accepts: finite, from ``low`` to ``high`` (``*_open``: excluding
    that end); ``note`` says what the bounds mean (e.g. "0 = no limit")."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def rule(self) -> str:
        """The range in words: ">= 0", "> 0 and < 1", each end written as given."""
        ends = [f"{'>' if self.low_open else '>='} {_plain(self.low)}" * (self.low > -math.inf),
                f"{'<' if self.high_open else '<='} {_plain(self.high)}" * (self.high < math.inf)]
        text = " and ".join(filter(None, ends)) or "a finite number"
        return f"{text} ({self.note})" if self.note else text

    def problem(self, value: float) -> str | None:
        """What is wrong with ``value`` ("must be ..., got ..."), None if it is in range.

        Whole numbers above :data:`INT_LIMIT` are refused even where no upper bound is set.
        """
        if isinstance(value, int) and value > INT_LIMIT and self.high == math.inf:
            return replace(self, high=INT_LIMIT).problem(value)
        inside = (math.isfinite(value)
                  and (value > self.low if self.low_open else value >= self.low)
                  and (value < self.high if self.high_open else value <= self.high))
        if inside:
            return None
        finite = "" if math.isfinite(value) else "a finite number "
        return f"must be {finite}{self.rule()}, got {value!r}"


def _plain(bound: float) -> str:
    """A bound as a person writes it: 10080, 0.5, 1e-08."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def count(low: int, note: str = "") -> Range:
    """A whole number from ``low`` up (to :data:`INT_LIMIT`)."""
    return Range(low, note=note)


POSITIVE = Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)  # a probability or an Adam beta: 1 itself is meaningless

# One entry per int or float field of TrainingConfig (test_config checks there is no gap).
RANGES: dict[str, Range] = {
    "seq_len": count(1, "tokens per sequence; at most the model's positions"),
    "lora_r": count(1),
    "lora_alpha": count(1),
    "lora_dropout": FRACTION,
    "dpo_beta": POSITIVE,
    "grpo_group_size": count(2, "advantages compare the completions of a prompt"),
    "grpo_temperature": Range(0, low_open=True, note="sampling"),
    "grpo_max_new_tokens": count(1),
    "grpo_beta": Range(0, note="0 = no KL penalty"),
    "grpo_epsilon": POSITIVE,
    "grpo_epochs": count(1, "optimisation passes over each batch of generations"),
    "quantize_bits": Range(0, 8, note="0 = full-precision base"),
    "max_files": count(0, "0 = all"),
    "prefetch_shards": count(0),
    "shuffle_block_shards": count(1),
    "cache_limit_gb": Range(0, 1e6, note="GB; 0 = no limit"),
    "max_steps": count(1),
    "per_device_train_batch_size": count(1),
    "gradient_accumulation_steps": count(1),
    "learning_rate": POSITIVE,
    "min_lr_ratio": Range(0, 1),
    "warmup_steps": count(0),
    "weight_decay": Range(0),
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "adam_epsilon": POSITIVE,
    "max_grad_norm": POSITIVE,
    "seed": Range(0, 2**32 - 1, note="numpy's seed range"),
    "loss_chunk_tokens": count(0, "0 = all at once"),
    "num_workers": count(0),
    "prefetch_factor": count(1, "batches each DataLoader worker reads ahead"),
    "log_upload_minutes": Range(0, WEEK_MINUTES, note="0 = only at the end; at most a week"),
    "logging_steps": count(1),
    "eval_steps": count(1),
    "eval_windows": count(0),
    "save_steps": count(1),
    "save_interval_minutes": Range(0, WEEK_MINUTES, note="0 = off; at most a week"),
    "save_total_limit": count(0),
    "remote_keep": count(0, "0 = all"),
    "keep_every_steps": count(0, "0 = off"),
    "preemption_budget_s": Range(1, 3600, low_open=True,
                                 note="seconds from the signal to the exit; Spot VMs give 30"),
    "upload_timeout_s": Range(0, WEEK_S, note="seconds; at most a week"),
    "final_upload_timeout_s": Range(0, WEEK_S, note="seconds; at most a week"),
    "peak_tflops": Range(0, 1e6, note="0 = the built-in table"),
}


def number(kind: type[int] | type[float], valid: Range) -> Callable[[str], float]:
    """An argparse ``type=`` for the other entry points: parses ``kind`` and checks ``valid``,
    so ``--max-mb nan`` is one parse error naming the flag, not a ValueError later."""

    def parse(text: str) -> float:
        value = kind(text)  # ValueError: argparse says "invalid int value: 'x'"
        problem = valid.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = kind.__name__
    return parse


def run_main(main: Callable[[], int], prog: str) -> typing.NoReturn:
    """``sys.exit(main())``, but a Ctrl-C before the run installs its own handler (imports,
    engine start-up, a data sync) ends with one line and status 130, not a traceback."""
    try:
        status = main()
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted\n")
        status = 130
    sys.exit(status)


def report_to(value: str) -> list[str]:
    """``--report-to`` as a list of trackers (``none`` or nothing: []); ConfigError naming the
    valid ones for anything else."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in (*TRACKERS, "none")]
    if unknown or ("none" in names and len(names) > 1):
        what = (f"unknown tracker {', '.join(map(repr, unknown))}" if unknown
                else "none cannot be combined with a tracker")
        raise ConfigError(f"--report-to {value!r}: {what}; valid: {', '.join(TRACKERS)} "
                          f"(comma-separated), or none")
    return [name for name in dict.fromkeys(names) if name != "none"]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are a single line (no usage dump) and exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments"):
            message += " (run with --help to list the valid flags)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, allow_abbrev=False,
                            description="Pretrain or fine-tune GPT-NeoX; see README.md.")
    parser.add_argument("--config", default="smoke", choices=sorted(PRESETS),
                        help="preset to start from (default: smoke)")
    parser.add_argument("--validate", action="store_true",
                        help="run the preflight checks and exit")
    hints = typing.get_type_hints(TrainingConfig)
    for field in fields(TrainingConfig):
        kind = hints[field.name]
        flag = _flag(field.name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(kind), default=None)
        else:  # a number's help is its range ("--max-files: >= 0 (0 = all)")
            parser.add_argument(flag, type=kind, default=None, metavar=field.name.upper(),
                                help=RANGES[field.name].rule() if kind in (int, float) else None)
    return parser


def parse_args(argv: list[str] | None = None,
               prog: str = "train.py") -> tuple[TrainingConfig, argparse.Namespace]:
    """Parse argv into a validated config; exits 2 with one line on bad input."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainingConfig)
                 if getattr(args, f.name) is not None}
    config = replace(PRESETS[args.config], **overrides)
    if not config.bucket and config.sync_data:
        config.bucket = os.environ.get(BUCKET_ENV, "")
    try:
        validate(config, args.config)
    except ConfigError as err:
        parser.exit(2, f"{prog}: error: {err}\n")
    return config, args


def validate(config: TrainingConfig, preset_name: str = "") -> None:
    """Reject configs that would fail later, with a message that says what to change."""
    if config.model not in MODEL_SIZES:
        raise ConfigError(f"unknown model {config.model!r}; "
                          f"choose one of: {', '.join(MODEL_SIZES)}")
    check_numbers(config)
    max_pos = MODEL_SIZES[config.model].max_position_embeddings
    if config.seq_len > max_pos:
        raise ConfigError(f"--seq-len {config.seq_len} exceeds model {config.model}'s "
                          f"{max_pos} positions; lower --seq-len or pick a larger --model")
    if config.sync_data and not config.bucket:
        where = f"preset {preset_name!r}" if preset_name else "this config"
        raise ConfigError(f"{where} syncs data from a bucket but none is set: pass "
                          f"--bucket gs://NAME/PREFIX (or a local directory), set ${BUCKET_ENV}, "
                          f"or use --no-sync-data with data already in --data-dir")
    if config.stream and not config.bucket:
        raise ConfigError("--stream reads shards from a bucket while training: pass --bucket "
                          "gs://NAME/PREFIX (or a local directory), or drop --stream to train "
                          "on --data-dir")
    problem = run_name_problem("--run-name", config.run_name) or (
        config.init_run and run_name_problem("--init-run", config.init_run))
    if problem:
        raise ConfigError(problem)
    report_to(config.report_to)
    problem = credentials_problem(config.credentials, "--credentials")
    if problem:
        raise ConfigError(problem)
    if config.quantize_bits and config.stage == "pretrain" and not config.topics:
        raise ConfigError("--quantize-bits applies to LoRA stages (a frozen base); use it with "
                          "--stage sft or dpo")
    if config.stage != "pretrain" or config.topics:
        validate_lora(config)


def check_numbers(config: TrainingConfig) -> None:
    """Every int and float field against its :data:`RANGES` entry (a field without one is a
    KeyError here, so a new numeric flag cannot skip the check)."""
    hints = typing.get_type_hints(TrainingConfig)
    for field in fields(TrainingConfig):
        if hints[field.name] in (int, float):
            problem = RANGES[field.name].problem(getattr(config, field.name))
            if problem:
                raise ConfigError(f"{_flag(field.name)} {problem}")


def validate_lora(config: TrainingConfig) -> None:
    """LoRA settings that cannot work (SFT, DPO and curriculum stages)."""
    if not config.init_from:
        raise ConfigError(f"stage {config.stage} needs a base model: pass --init-from PATH (a "
                          f"checkpoint or Hugging Face GPT-NeoX folder) or --init-from latest "
                          f"(newest checkpoint of --init-run, now {config.init_run!r})")
    unknown = [t for t in config.lora_targets if t not in LORA_TARGETS]
    if unknown or not config.lora_targets:
        raise ConfigError(f"--lora-target-modules {config.lora_target_modules!r}: "
                          f"{'unknown ' + ', '.join(unknown) if unknown else 'none given'}; use "
                          f"a comma-separated subset of {','.join(LORA_TARGETS)}")
    if config.quantize_bits not in (0, *QUANT_BITS):
        raise ConfigError(f"--quantize-bits must be {' or '.join(map(str, QUANT_BITS))} "
                          f"(0 = full-precision base), got {config.quantize_bits}")
    if config.quantize_bits and config.backend != "mlx":
        raise ConfigError("--quantize-bits (QLoRA) needs --backend mlx: the torch backend has no "
                          "4/8-bit kernels on this install; drop the flag or add --backend mlx")

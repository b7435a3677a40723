"""Dataclass fields -> command-line flags, with one-line errors.

``--config NAME`` picks a preset; every ``TrainingConfig`` field can then be
overridden as ``--field-name VALUE`` (booleans as ``--flag/--no-flag``).
Bad input exits 2 with a single line that names the valid choices.
"""

from __future__ import annotations

import argparse
import os
import typing
from dataclasses import fields, replace

from configs.model_config import LORA_TARGETS, MODEL_SIZES
from configs.training_config import PRESETS, QUANT_BITS, TrainingConfig
from utils.errors import ConfigError
from utils.secrets import credentials_problem

BUCKET_ENV = "HARNESS_BUCKET"
TRACKERS = ("tensorboard", "wandb")  # what --report-to may list (or "none")


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


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are a single line (no usage dump) and exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments"):
            message += " (run with --help to list the valid flags)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, allow_abbrev=False,
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
        else:
            parser.add_argument(flag, type=kind, default=None, metavar=field.name.upper())
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
    positive = ("seq_len", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "logging_steps", "eval_steps", "save_steps")
    for name in positive:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{_flag(name)} must be a positive integer, "
                              f"got {getattr(config, name)}")
    for name in ("max_files", "warmup_steps", "num_workers", "eval_windows", "save_total_limit",
                 "remote_keep"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{_flag(name)} must be >= 0, got {getattr(config, name)}")
    if not config.learning_rate > 0:
        raise ConfigError(f"--learning-rate must be > 0, got {config.learning_rate}")
    if not 0 <= config.min_lr_ratio <= 1:
        raise ConfigError(f"--min-lr-ratio must be within [0, 1], got {config.min_lr_ratio}")
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
    if config.prefetch_shards < 0 or config.shuffle_block_shards < 1 \
            or not config.cache_limit_gb >= 0:
        raise ConfigError(f"--prefetch-shards must be >= 0, --shuffle-block-shards >= 1 and "
                          f"--cache-limit-gb >= 0 (0 = no limit); got {config.prefetch_shards}, "
                          f"{config.shuffle_block_shards} and {config.cache_limit_gb}")
    if not config.run_name:
        raise ConfigError("--run-name must not be empty")
    report_to(config.report_to)
    problem = credentials_problem(config.credentials, "--credentials")
    if problem:
        raise ConfigError(problem)
    if config.quantize_bits and config.stage == "pretrain" and not config.topics:
        raise ConfigError("--quantize-bits applies to LoRA stages (a frozen base); use it with "
                          "--stage sft or dpo")
    if config.stage != "pretrain" or config.topics:
        validate_lora(config)


def validate_grpo(config: TrainingConfig) -> None:
    """GRPO settings that cannot work (the reward names are checked when they are loaded)."""
    problems = [
        (config.grpo_group_size < 2, f"--grpo-group-size must be >= 2 (advantages compare the "
                                     f"completions of a prompt), got {config.grpo_group_size}"),
        (config.grpo_max_new_tokens < 1,
         f"--grpo-max-new-tokens must be >= 1, got {config.grpo_max_new_tokens}"),
        (not config.grpo_temperature > 0,
         f"--grpo-temperature must be > 0 (sampling), got {config.grpo_temperature}"),
        (config.grpo_beta < 0 or not config.grpo_epsilon > 0,
         f"--grpo-beta must be >= 0 and --grpo-epsilon > 0, got {config.grpo_beta} and "
         f"{config.grpo_epsilon}"),
        (config.grpo_epochs < 1, f"--grpo-epochs must be >= 1 (optimisation passes over "
                                 f"each batch of generations), got {config.grpo_epochs}"),
    ]
    for bad, message in problems:
        if bad:
            raise ConfigError(message)


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
    if config.lora_r < 1 or config.lora_alpha <= 0:
        raise ConfigError(f"--lora-r must be >= 1 and --lora-alpha > 0, got {config.lora_r} "
                          f"and {config.lora_alpha}")
    if not 0 <= config.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout must be within [0, 1), got {config.lora_dropout}")
    if config.stage == "dpo" and not config.dpo_beta > 0:
        raise ConfigError(f"--dpo-beta must be > 0, got {config.dpo_beta}")
    if config.stage == "grpo" or config.topics:
        validate_grpo(config)
    if config.quantize_bits not in (0, *QUANT_BITS):
        raise ConfigError(f"--quantize-bits must be {' or '.join(map(str, QUANT_BITS))} "
                          f"(0 = full-precision base), got {config.quantize_bits}")
    if config.quantize_bits and config.backend != "mlx":
        raise ConfigError("--quantize-bits (QLoRA) needs --backend mlx: the torch backend has no "
                          "4/8-bit kernels on this install; drop the flag or add --backend mlx")

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
import textwrap
import typing
from collections.abc import Callable
from dataclasses import Field, dataclass, fields, replace
from typing import NamedTuple

from configs.model_config import LORA_TARGETS, MODEL_SIZES
from configs.training_config import (
    PRESETS,
    QUANT_BITS,
    RUN,
    SECTIONS,
    TRACKERS,
    TrainingConfig,
    report_to,
    run_name_problem,
)
from utils.credential_checks import credentials_problem
from utils.errors import ConfigError

BUCKET_ENV = "HARNESS_BUCKET"
DEFAULT_PRESET = "smoke"  # what --config is when not given
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
    "grpo_temperature": POSITIVE,
    "grpo_max_new_tokens": count(1),
    "grpo_beta": Range(0, note="0 = no KL penalty"),
    "grpo_epsilon": POSITIVE,
    "grpo_epochs": count(1),
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
    "max_skipped_steps": count(0, "0 = act on the first"),
    "max_rollbacks": count(0, "0 = stop instead"),
    "rollback_lr_factor": Range(0, 1, low_open=True, note="1 = unchanged"),
    "rollback_lr_steps": count(0),
    "spike_zscore": Range(0, 1e6, note="0 = off"),
    "seed": Range(0, 2**32 - 1, note="numpy's seed range"),
    "loss_chunk_tokens": count(0, "0 = all at once"),
    "num_workers": count(0, "0 = read in the training process"),
    "prefetch_factor": count(1),
    "log_upload_minutes": Range(0, WEEK_MINUTES, note="0 = only at the end; at most a week"),
    "logging_steps": count(1),
    "eval_steps": count(1),
    "eval_windows": count(0),
    "eval_task_examples": count(0, "0 = all"),
    "save_steps": count(1),
    "save_interval_minutes": Range(0, WEEK_MINUTES, note="0 = off; at most a week"),
    "save_total_limit": count(0, "0 = all"),
    "remote_keep": count(0, "0 = all"),
    "keep_every_steps": count(0, "0 = off"),
    "preemption_budget_s": Range(1, 3600, low_open=True, note="seconds; Spot VMs give 30"),
    "upload_streams": Range(1, 256, note="1 = one stream per file"),
    "upload_timeout_s": Range(0, WEEK_S, note="seconds; at most a week"),
    "final_upload_timeout_s": Range(0, WEEK_S, note="seconds; at most a week"),
    "peak_tflops": Range(0, 1e6, note="0 = the built-in table"),
    "collective_timeout_minutes": Range(0, WEEK_MINUTES, low_open=True,
                                        note="minutes; at most a week"),
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


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are a single line (no usage dump) and exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        if message.startswith("unrecognized arguments"):
            message += " (run with --help to list the valid flags)"
        self.exit(2, f"{self.prog}: error: {message}\n")


class WholeWordsFormatter(argparse.HelpFormatter):
    """Wraps help text at spaces only: ``--grpo-group-size`` or ``BUCKET/logs/RUN_NAME`` is
    never split across two lines (argparse's textwrap breaks at hyphens and in long words)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False,
                             break_long_words=False)


def flag_name(name: str) -> str:
    """A field's flag: ``max_files`` -> ``--max-files``."""
    return "--" + name.replace("_", "-")


# What a text flag takes where a fixed list says it (other text flags: see their help).
TEXT_VALUES: dict[str, str] = {
    "model": ", ".join(MODEL_SIZES),
    "lora_target_modules": f"comma-separated, of {','.join(LORA_TARGETS)}",
    "report_to": f"comma-separated, of {', '.join(TRACKERS)}; or none",
}


AUTO = "auto"
# Int flags that also take a word, and what the word turns on.
WORDS: dict[str, tuple[str, str]] = {
    "per_device_train_batch_size": (AUTO, "auto_micro_batch"),
}


def int_or_word(word: str) -> Callable[[str], int | str]:
    """An argparse ``type=`` taking a whole number or ``word``: "abc" or "nan" is argparse's
    one-line "invalid" error; the number's range is checked with the other fields'."""

    def parse(text: str) -> int | str:
        return word if text.strip().lower() == word else int(text)

    parse.__name__ = f"int (or {word})"
    return parse


class FlagDoc(NamedTuple):
    """One flag as ``--help`` and the README's flag reference describe it."""

    names: tuple[str, ...]  # ("--compile", "--no-compile") for a boolean
    values: str  # what it takes: a range, the choices, a fixed list; "" for on/off or free text
    default: str  # "on", "off", "empty" or the value as typed
    help: str
    section: str


def shown(value: object) -> str:
    """A default as a person types it: on/off, empty, 0.0003, 3600."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value) or "empty"


def describe(field: Field, kind: object) -> FlagDoc:
    """A ``TrainingConfig`` field's flag, from its metadata, its type and :data:`RANGES`."""
    flag = flag_name(field.name)
    names = (flag, "--no-" + flag[2:]) if kind is bool else (flag,)
    if kind in (int, float):
        values = RANGES[field.name].rule()
        if field.name in WORDS:
            values += f", or {WORDS[field.name][0]}"
    elif typing.get_origin(kind) is typing.Literal:
        values = ", ".join(typing.get_args(kind))
    else:
        values = TEXT_VALUES.get(field.name, "")
    return FlagDoc(names, values, shown(field.default), field.metadata["help"],
                   field.metadata["section"])


# train.py's own flags, which are no TrainingConfig field.
LAUNCH_FLAGS = (
    FlagDoc(("--config",), ", ".join(sorted(PRESETS)), DEFAULT_PRESET,
            "the preset whose values replace the defaults below; flags override it", RUN.title),
    FlagDoc(("--validate",), "", "off", "run the preflight checks (bucket, data, model, one "
            "step, a checkpoint round trip) and exit", RUN.title),
)


def flag_docs() -> list[FlagDoc]:
    """Every flag of ``train.py``: ``--config`` and ``--validate``, then each field's."""
    hints = typing.get_type_hints(TrainingConfig)
    return [*LAUNCH_FLAGS, *(describe(f, hints[f.name]) for f in fields(TrainingConfig))]


def _help(doc: FlagDoc, has_choices: bool, preset_value: str, preset_name: str) -> str:
    """The ``--help`` text: what it does, the range (not choices: argparse lists those), the
    default, and ``preset_name``'s value where it differs ("%" escaped for argparse)."""
    facts = [doc.values * (not has_choices), f"default: {doc.default}",
             f"--config {preset_name}: {preset_value}" * (preset_value != doc.default)]
    return f"{doc.help} [{'; '.join(filter(None, facts))}]".replace("%", "%%")


def build_parser(prog: str = "train.py", preset: str = DEFAULT_PRESET) -> argparse.ArgumentParser:
    """``train.py``'s parser: one flag per field, grouped by section. Every field's flag
    defaults to None (not given: the preset's value stays); the help names ``preset``'s
    values where they differ from the defaults."""
    parser = OneLineParser(
        prog=prog, allow_abbrev=False, formatter_class=WholeWordsFormatter,
        usage="%(prog)s [-h] [--config PRESET] [--validate] [--FLAG VALUE | --[no-]SWITCH ...]",
        description=f"Pretrain or fine-tune GPT-NeoX; see README.md. Each flag shows its "
                    f"default and, where it differs, preset {preset}'s value "
                    f"(--config NAME --help shows NAME's).")
    groups = {section.title: parser.add_argument_group(section.title) for section in SECTIONS}
    config_doc, validate_doc = LAUNCH_FLAGS
    groups[RUN.title].add_argument("--config", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                                   help=_help(config_doc, True, config_doc.default, preset))
    groups[RUN.title].add_argument("--validate", action="store_true",
                                   help=_help(validate_doc, False, validate_doc.default, preset))
    hints = typing.get_type_hints(TrainingConfig)
    for field in fields(TrainingConfig):
        kind = hints[field.name]
        doc = describe(field, kind)
        group = groups[doc.section]
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        text = _help(doc, choices is not None, shown(getattr(PRESETS[preset], field.name)),
                     preset)
        if kind is bool:
            group.add_argument(doc.names[0], action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        elif choices:
            group.add_argument(doc.names[0], choices=choices, default=None, help=text)
        else:
            parse = int_or_word(WORDS[field.name][0]) if field.name in WORDS else kind
            group.add_argument(doc.names[0], type=parse, default=None,
                               metavar=field.name.upper(), help=text)
    return parser


def chosen_preset(argv: list[str] | None, prog: str) -> str:
    """The ``--config`` in ``argv`` (its help shows that preset's values), or the default
    where none, or an unknown one, is given (the full parser then names the choices)."""
    early = OneLineParser(prog=prog, allow_abbrev=False, add_help=False)
    early.add_argument("--config", default=DEFAULT_PRESET)
    name = early.parse_known_args(argv)[0].config
    return name if name in PRESETS else DEFAULT_PRESET


def parse_args(argv: list[str] | None = None,
               prog: str = "train.py") -> tuple[TrainingConfig, argparse.Namespace]:
    """Parse argv into a validated config; exits 2 with one line on bad input."""
    parser = build_parser(prog, chosen_preset(argv, prog))
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainingConfig)
                 if getattr(args, f.name) is not None}
    config = replace(PRESETS[args.config], **with_words(overrides))
    if not config.bucket and config.sync_data:
        config.bucket = os.environ.get(BUCKET_ENV, "")
    try:
        validate(config, args.config)
    except ConfigError as err:
        parser.exit(2, f"{prog}: error: {err}\n")
    return config, args


def with_words(overrides: dict[str, object]) -> dict[str, object]:
    """A flag's word (:data:`WORDS`) becomes the switch it names; a number given to that flag
    turns the switch off, unless the switch's own flag was given too."""
    out = dict(overrides)
    for name, (word, switch) in WORDS.items():
        if out.get(name) == word:
            del out[name]
            out[switch] = True
        elif name in out and switch not in overrides:
            out[switch] = False
    return out


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
    if config.auto_micro_batch and (config.backend != "torch" or config.stage != "pretrain"
                                    or config.topics):
        raise ConfigError("--per-device-train-batch-size auto (--auto-micro-batch) is for torch "
                          "pretraining: give the micro-batch as a number, or drop --backend "
                          "mlx / the fine-tuning stage")


def check_numbers(config: TrainingConfig) -> None:
    """Every int and float field against its :data:`RANGES` entry (a field without one is a
    KeyError here, so a new numeric flag cannot skip the check)."""
    hints = typing.get_type_hints(TrainingConfig)
    for field in fields(TrainingConfig):
        if hints[field.name] in (int, float):
            problem = RANGES[field.name].problem(getattr(config, field.name))
            if problem:
                raise ConfigError(f"{flag_name(field.name)} {problem}")


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

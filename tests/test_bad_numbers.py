"""Every number a flag takes, and every run name, is checked when the flags are parsed.

Most cases run ``configs.cli.parse_args`` in-process (milliseconds each); a few run the real
entry points to show the user sees one line, exit status 2 (130 for Ctrl-C), no traceback.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import typing
from dataclasses import fields
from pathlib import Path

import pytest
from helpers import finish

from configs.cli import INT_LIMIT, RANGES, Range, build_parser, parse_args
from configs.training_config import PRESETS, TrainingConfig

REPO = Path(__file__).resolve().parent.parent
HINTS = typing.get_type_hints(TrainingConfig)
NUMERIC = [f.name for f in fields(TrainingConfig) if HINTS[f.name] in (int, float)]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _out_of_range(name: str) -> list[str]:
    """Values just outside the field's range, plus inf/nan for floats and a huge int."""
    valid, kind = RANGES[name], HINTS[name]
    step = 1 if kind is int else 1e-3
    bad = [valid.low if valid.low_open else valid.low - step]
    if valid.high < math.inf:
        bad.append(valid.high if valid.high_open else valid.high + step)
    if kind is float:
        return [repr(float(v)) for v in bad] + ["inf", "-inf", "nan"]
    return [str(int(v)) for v in bad] + [str(10**30)]


def _parse_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The single stderr line of a parse that must exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_every_int_and_float_field_has_a_range_and_every_preset_is_in_it():
    assert sorted(RANGES) == sorted(NUMERIC)
    for name, config in PRESETS.items():
        for field in NUMERIC:
            assert RANGES[field].problem(getattr(config, field)) is None, (name, field)
    assert RANGES["max_files"].problem(0) is None  # 0 = all files
    help_text = " ".join(build_parser().format_help().split())
    assert "[>= 0 (0 = all); default: 0]" in help_text  # each range is in --help


@pytest.mark.parametrize("name", NUMERIC)
def test_out_of_range_values_are_one_line_naming_flag_and_value(name, capsys):
    for value in _out_of_range(name):
        err = _parse_error([f"{_flag(name)}={value}"], capsys)  # "=": argparse takes -inf
        assert f"train.py: error: {_flag(name)} must be " in err, err
        shown = err.rsplit("got ", 1)[1].strip()
        if value in ("inf", "-inf", "nan"):
            assert shown == value and "a finite number" in err
        else:
            assert float(shown) == float(value), err


@pytest.mark.parametrize(("argv", "expected"), [
    # The cases: each was a traceback (OverflowError, ValueError, AssertionError) or a
    # dead log-mirror thread.
    (["--cache-limit-gb", "inf"], "--cache-limit-gb must be a finite number >= 0 and <= 1000000 "
                                  "(GB; 0 = no limit), got inf"),
    (["--upload-timeout-s", "nan"], "--upload-timeout-s must be a finite number >= 0"),
    (["--prefetch-factor", "0", "--num-workers", "1"], "--prefetch-factor must be >= 1"),
    (["--log-upload-minutes", "inf"], "--log-upload-minutes must be a finite number >= 0 and "
                                      "<= 10080 (0 = only at the end; at most a week), got inf"),
    (["--log-upload-minutes", "1e12"], "--log-upload-minutes must be >= 0 and <= 10080"),
    (["--max-steps", str(INT_LIMIT + 1)], f"--max-steps must be >= 1 and <= {INT_LIMIT}"),
    (["--seed", str(2**32)], "--seed must be >= 0 and <= 4294967295"),
    (["--lora-dropout", "1"], "--lora-dropout must be >= 0 and < 1, got 1.0"),
    (["--grpo-group-size", "1"], "--grpo-group-size must be >= 2 (advantages compare"),
])
def test_the_reported_numbers_are_refused_at_parse_time(argv, expected, capsys):
    assert expected in _parse_error(argv, capsys)


def test_a_range_describes_itself_and_takes_its_bounds():
    valid = Range(0, 1, high_open=True, note="a share")
    assert valid.rule() == ">= 0 and < 1 (a share)"
    assert [valid.problem(v) for v in (0, 0.5)] == [None, None]
    assert valid.problem(1) == "must be >= 0 and < 1 (a share), got 1"
    assert Range(1e-8).problem(0.0) == "must be >= 1e-08, got 0.0"


GOOD_NAMES = ["smoke", "a.b_c-1", "7", "x" * 100, "Run.2026-01-01"]
BAD_NAMES = ["", ".", "..", "a/b", "../data", "/abs", "a b", "-x", ".hidden", "_x", "x" * 101,
             "a;rm", "a$b", "a%2Fb", "a?b", "a#b", "a\\b", "a\nb", "é"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_run_names_of_safe_characters_are_accepted(name):
    config, _ = parse_args(["--run-name", name, "--init-run", name])
    assert (config.run_name, config.init_run) == (name, name)


@pytest.mark.parametrize("flag", ["--run-name", "--init-run"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_run_name_is_one_path_component_of_safe_characters(flag, name, capsys):
    if flag == "--init-run" and not name:
        assert parse_args([f"{flag}="])[0].init_run == ""  # unset: no run to start from
        return
    err = _parse_error([f"{flag}={name}"], capsys)
    assert f"train.py: error: {flag} {name!r}: use one name of letters, digits, '.', '_' and " \
           f"'-' starting with a letter or digit" in err
    assert "nested names are not supported" in err


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    return finish([sys.executable, *args], tmp_path, env)


@pytest.mark.parametrize("args", [
    ["train.py", "--cache-limit-gb", "inf"],
    ["train.py", "--run-name", ".."],
    ["-m", "data.prepare", "--max-mb", "nan"],
    ["generate.py", "--model", "m", "--prompt", "p", "--temperature", "inf"],
    ["download_training_data.py", "--bucket", "b", "--retry-deadline", "nan"],
])
def test_entry_points_print_one_line_and_exit_2(args, tmp_path):
    result = _run(args, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    flag = next(a for a in args if a.startswith("--") and a not in ("--model", "--prompt",
                                                                    "--bucket"))
    assert flag in lines[0] and args[args.index(flag) + 1] in lines[0], lines


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    """SIGINT while train.py imports torch and builds its engine (before the run's own
    handler): one line, status 130, no KeyboardInterrupt traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "train.py", "--config", "smoke", "--bucket", "",
                             "--output-dir", str(tmp_path / "out")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    while proc.poll() is None and "libtorch" not in maps.read_text():
        time.sleep(0.02)  # until the engine's torch import is under way (seconds of it left)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate()
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "train.py: interrupted", stderr


def test_a_curriculum_topic_folder_follows_the_run_name_rule(tmp_path):
    """A topic's name becomes part of its stages' run names (RUN-TOPIC-STAGE)."""
    from utils.errors import DataError
    from utils.stages.curriculum import plan

    for name in ("01-ok", "02 bad"):
        (tmp_path / name).mkdir()
        for stage in ("sft", "dpo"):
            (tmp_path / name / f"{stage}.jsonl").write_text("")
    with pytest.raises(DataError, match=r"topic folder '02 bad' in .*: use one name of letters"):
        plan(tmp_path)
    (tmp_path / "02 bad").rename(tmp_path / "02-good")
    assert [s.key for s in plan(tmp_path)] == ["01-ok/sft", "01-ok/dpo", "02-good/sft",
                                               "02-good/dpo"]

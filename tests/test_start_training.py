"""start_training.sh: bad options, quoting, and the accelerate command it builds and runs."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import clean_env, finish, metrics

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "start_training.sh"
USAGE = "Launch training the way the machine needs it."
TINY = ["--seq-len", "64", "--logging-steps", "1", "--eval-steps", "1000",
        "--eval-windows", "8", "--save-steps", "1000", "--bucket", ""]


def start(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """The script as a user runs it from a fresh shell (it changes to the repo root itself)."""
    return finish(["bash", str(SCRIPT), *args], tmp, clean_env(tmp), cwd=tmp, name="start")


def launched(stdout: str) -> list[str]:
    """The command from the script's '[start] CMD' line, split as the shell would."""
    line = next(x for x in stdout.splitlines() if x.startswith("[start] "))
    return shlex.split(line.removeprefix("[start] "))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("start-data")
    subprocess.run([sys.executable, "-m", "data.prepare",
                    "--out", str(root / "data"), "--tokenizer-out", str(root / "tok"),
                    "--max-mb", "1"], cwd=REPO, check=True, capture_output=True)
    return root / "data"


@pytest.mark.parametrize(("args", "problem"), [
    (["--bogus"], "start_training.sh: error: unrecognized arguments: --bogus"),
    (["stray"], "start_training.sh: unexpected argument 'stray'"),
])
def test_bad_option_prints_usage_then_the_problem_and_exits_2(args: list[str], problem: str,
                                                              tmp_path: Path) -> None:
    result = start(args, tmp_path)
    assert result.returncode == 2
    assert USAGE in result.stderr
    assert problem in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr and "[start]" not in result.stdout


@pytest.mark.parametrize(("args", "problem"), [
    (["--gpus", "two"], "--gpus must be a whole number, got 'two'"),
    (["--num-machines"], "--num-machines needs a value"),
    (["--gpus", "8", "--num-machines", "2"], "--num-machines 2 needs --main-process-ip"),
    (["--gpus", "8", "--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "h"],
     "--machine-rank 2 must be below --num-machines 2"),
    (["--gpus", "2", "--backend", "mlx", "--num-machines", "2", "--main-process-ip", "h"],
     "--backend mlx runs on one machine"),
])
def test_bad_launch_setting_is_one_line_and_exit_2(args: list[str], problem: str,
                                                   tmp_path: Path) -> None:
    result = start(args, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"start_training.sh: {problem}"), lines
    assert "[start]" not in result.stdout


PASSED = ["--output-dir", "a b", "--bucket", ""]  # a space and an empty value, kept intact


@pytest.mark.parametrize(("args", "expected"), [
    (["--gpus", "0"], [".venv/bin/python", "train.py"]),
    (["--gpus", "2"],
     [".venv/bin/accelerate", "launch", "--config_file", "configs/accelerate/ddp.yaml",
      "--num_processes", "2", "--num_machines", "1", "--machine_rank", "0",
      "--main_process_port", "29500", "train.py"]),
    (["--gpus", "4", "--fsdp"],
     [".venv/bin/accelerate", "launch", "--config_file", "configs/accelerate/fsdp.yaml",
      "--num_processes", "4", "--num_machines", "1", "--machine_rank", "0",
      "--main_process_port", "29500", "train.py"]),
    (["--gpus", "8", "--num-machines", "2", "--machine-rank", "1",
      "--main-process-ip", "10.1.2.3", "--main-process-port", "29555"],
     [".venv/bin/accelerate", "launch", "--config_file", "configs/accelerate/multinode.yaml",
      "--num_processes", "16", "--num_machines", "2", "--machine_rank", "1",
      "--main_process_port", "29555", "--main_process_ip", "10.1.2.3", "train.py"]),
    (["--gpus", "2", "--backend", "mlx"],
     [".venv/bin/mlx.launch", "--backend", "ring", "-n", "2", ".venv/bin/python",
      "mlx_train.py"]),
    (["--gpus", "8", "--fsdp", "--num-machines", "2", "--main-process-ip", "10.1.2.3"],
     [".venv/bin/accelerate", "launch", "--config_file", "configs/accelerate/fsdp.yaml",
      "--num_processes", "16", "--num_machines", "2", "--machine_rank", "0",
      "--main_process_port", "29500", "--main_process_ip", "10.1.2.3", "train.py"]),
])
def test_dry_run_prints_the_launch_command(args: list[str], expected: list[str],
                                           tmp_path: Path) -> None:
    result = start([*args, *PASSED, "--dry-run"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert launched(result.stdout) == [*expected, *PASSED]
    if "--config_file" in expected:
        assert (REPO / expected[expected.index("--config_file") + 1]).is_file()


@pytest.mark.parametrize(("args", "expected"), [
    (["--gpus=2", "--backend=mlx"],
     [".venv/bin/mlx.launch", "--backend", "ring", "-n", "2", ".venv/bin/python",
      "mlx_train.py", "--config=sft"]),
    (["--gpus=8", "--fsdp", "--num-machines=2", "--machine-rank=1",
      "--main-process-ip=10.1.2.3", "--main-process-port=29555"],
     [".venv/bin/accelerate", "launch", "--config_file", "configs/accelerate/fsdp.yaml",
      "--num_processes", "16", "--num_machines", "2", "--machine_rank", "1",
      "--main_process_port", "29555", "--main_process_ip", "10.1.2.3", "train.py",
      "--config=sft"]),
])
def test_flags_take_the_equals_form(args: list[str], expected: list[str],
                                    tmp_path: Path) -> None:
    """--flag=value as every GNU tool takes it: the script's own flags are read, train.py's
    (--config=sft, --max-steps=3) passed on unchanged."""
    result = start(["--config=sft", *args, "--max-steps=3", "--dry-run"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert launched(result.stdout) == [*expected, "--max-steps=3"]


def test_sample_preparation_never_writes_into_the_bundled_examples(tmp_path: Path) -> None:
    """--config=sft reads data/examples/sft (no dataset.json there: it is JSONL): the script
    must not "prepare the missing sample" into it; train.py then fails on the base model."""
    examples = REPO / "data" / "examples"
    before = sorted(examples.rglob("*"))
    result = start(["--config=sft", "--gpus=0", "--init-from", str(tmp_path / "no-base"),
                    "--bucket=", "--output-dir", str(tmp_path / "out")], tmp_path)
    assert "sample data missing" not in result.stdout
    assert sorted(examples.rglob("*")) == before
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]


def _trained_config(out: Path) -> dict:
    (ckpt,) = (p for p in (out / "checkpoints").iterdir() if p.is_dir())
    return json.loads((ckpt / "trainer_state.json").read_text())["config"]


def test_arguments_with_spaces_reach_train_py_intact(tiny_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out dir"
    result = start(["--gpus", "0", "--max-steps", "1", "--data-dir", str(tiny_data_dir),
                    "--output-dir", str(out), "--run-name", "a.b", *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(metrics(out)) == 1
    assert _trained_config(out)["run_name"] == "a.b"
    assert _trained_config(out)["output_dir"] == str(out)


@pytest.mark.slow
def test_gpus_2_launches_two_processes_through_accelerate(tiny_data_dir: Path,
                                                          tmp_path: Path) -> None:
    """On this CPU machine the DDP command really starts two ranks joined with gloo."""
    out = tmp_path / "two ranks"
    port = str(free_port())
    result = start(["--gpus", "2", "--main-process-port", port, "--max-steps", "2",
                    "--data-dir", str(tiny_data_dir), "--output-dir", str(out),
                    "--run-name", "a.b", "--per-device-train-batch-size", "4", *TINY], tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    command = launched(result.stdout)
    assert command[:command.index("train.py")] == [
        ".venv/bin/accelerate", "launch", "--config_file", "configs/accelerate/ddp.yaml",
        "--num_processes", "2", "--num_machines", "1", "--machine_rank", "0",
        "--main_process_port", port]
    assert "4 per device x 1 accumulation x 2 processes = 8 sequences" in result.stdout
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert _trained_config(out)["run_name"] == "a.b"

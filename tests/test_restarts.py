"""start_training.sh --max-restarts N: a crashed run starts again with --resume latest, up to N
times; a clean end, a configuration error, a stop requested by a signal and --max-restarts 0
are never restarted. Real processes: the script, train.py, kill -9."""

from __future__ import annotations

import json
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import TINY, Watched, clean_env, finish, last_step, metrics

from utils import checkpoint

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "start_training.sh"
RESTART = "start_training.sh: training failed ("


class Script(Watched):
    """``start_training.sh`` as a user starts it, from a fresh shell's environment."""

    def __init__(self, tmp: Path, name: str, args: list[str]):
        super().__init__(["bash", str(SCRIPT), *args], tmp, name, clean_env(tmp), cwd=tmp)

    def trainers(self) -> list[psutil.Process]:
        """The train.py processes the script runs now (itself, after an exec)."""
        found = []
        for p in self.family():
            try:
                if "train.py" in p.cmdline():
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found


@pytest.fixture
def scripts() -> Iterator[list[Script]]:
    """Every script a test started; whatever still runs at its end is killed."""
    started: list[Script] = []
    yield started
    for script in started:
        script.kill()


def tiny(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--gpus", "0", *TINY, "--bucket", "", "--data-dir", str(data),
            "--output-dir", str(out), *extra]


def complete(out: Path) -> list[Path]:
    return checkpoint.find_complete(out / "checkpoints") if (out / "checkpoints").exists() else []


def trained_step(ckpt: Path) -> int:
    return json.loads((ckpt / "trainer_state.json").read_text())["state"]["step"]


def starts(script: Script) -> int:
    """How many times train.py started: each start prints its batch line once."""
    return script.stdout.count("accumulation x 1 processes")


# ------------------------------------------------------------------ bad input and dry runs


@pytest.mark.parametrize("value", ["-1", "101", "two", "1.5", ""])
def test_a_bad_max_restarts_is_one_line_and_exit_2(value: str, tmp_path: Path) -> None:
    result = finish(["bash", str(SCRIPT), "--max-restarts", value, "--dry-run"], tmp_path,
                    cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"start_training.sh: --max-restarts must be a whole number from 0 to 100, got '{value}'"]
    assert "[start]" not in result.stdout


def test_dry_run_shows_the_restarts_and_keeps_the_first_commands_resume(tmp_path: Path) -> None:
    result = finish(["bash", str(SCRIPT), "--gpus", "0", "--max-restarts=3", "--resume",
                     "outputs/x/checkpoints/a b", "--dry-run"], tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    first, restarts = [x for x in result.stdout.splitlines() if x.startswith("[start] ")]
    assert shlex.split(first.removeprefix("[start] ")) == [
        ".venv/bin/python", "train.py", "--resume", "outputs/x/checkpoints/a b"]
    assert restarts == ("[start] after a crash: up to 3 restart(s) with --resume latest "
                        "(--max-restarts 3)")
    default = finish(["bash", str(SCRIPT), "--gpus", "0", "--dry-run"], tmp_path,
                     cwd=tmp_path, name="default")
    assert "restart" not in default.stdout  # --max-restarts 0: the launch as it always was


# ------------------------------------------------------------------ real runs


@pytest.mark.slow
def test_a_killed_run_restarts_from_its_checkpoint_and_finishes(sample_data, scripts,
                                                                 tmp_path: Path) -> None:
    """kill -9 of train.py after its first complete checkpoint: one restart line, the second
    attempt resumes from that checkpoint (the user's --resume replaced) and reaches
    --max-steps."""
    out = tmp_path / "out"
    script = Script(tmp_path, "run", tiny(sample_data, out, "--max-steps", "40",
                                          "--save-steps", "10", "--max-restarts", "1",
                                          "--resume", "", "--run-name", "restarts"))
    scripts.append(script)
    script.wait_for(lambda: bool(complete(out)) and bool(script.trainers()),
                    "a complete checkpoint")
    (first,) = script.trainers()
    saved = trained_step(complete(out)[-1])
    killed_at = time.monotonic()
    first.send_signal(signal.SIGKILL)
    assert saved < 40, "the run ended before the kill: raise --max-steps"
    script.wait_for(lambda: "resumed from" in script.stdout, "the restart's resume")
    resumed_in = time.monotonic() - killed_at
    assert script.wait() == 0, script.stderr[-3000:]
    print(f"killed after the checkpoint of step {saved}; resumed {resumed_in:.1f} s after the "
          f"kill")
    restarts = [x for x in script.stderr.splitlines() if x.startswith(RESTART)]
    assert restarts == ["start_training.sh: training failed (killed by SIGKILL, status 137): "
                        "restart 1 of 1 with --resume latest"], script.stderr[-3000:]
    assert starts(script) == 2
    resumed = [x for x in script.stdout.splitlines() if "resumed from" in x]
    assert len(resumed) == 1 and "checkpoint-epoch0-step" in resumed[0], resumed
    resumed_step = int(resumed[0].rsplit(" at step ", 1)[1])
    assert saved <= resumed_step < 40
    assert trained_step(complete(out)[-1]) == 40
    assert [m["step"] for m in metrics(out)][-1] == 40


def test_without_max_restarts_a_crash_ends_the_script(sample_data, scripts,
                                                     tmp_path: Path) -> None:
    """--max-restarts 0 (the default) execs train.py: kill -9 ends the script with it."""
    out = tmp_path / "out"
    script = Script(tmp_path, "run", tiny(sample_data, out, "--max-steps", "1000",
                                          "--save-steps", "1000"))
    scripts.append(script)
    script.wait_for(lambda: last_step(out) >= 1, "step 1")
    (trainer,) = script.trainers()
    assert trainer.pid == script.proc.pid  # exec: no shell left in between
    trainer.send_signal(signal.SIGKILL)
    assert script.wait(within=60) == -signal.SIGKILL
    assert RESTART not in script.stderr and starts(script) == 1
    assert last_step(out) < 1000


def test_a_clean_run_is_not_restarted(sample_data, scripts, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = Script(tmp_path, "run", tiny(sample_data, out, "--max-steps", "2",
                                          "--save-steps", "2", "--max-restarts", "3"))
    scripts.append(script)
    assert script.wait() == 0, script.stderr[-3000:]
    assert RESTART not in script.stderr and starts(script) == 1
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_a_configuration_error_is_not_retried(sample_data, scripts, tmp_path: Path) -> None:
    """A configuration problem found at start-up (--fp8 on a CPU) exits 2 with its one line,
    once: a restart would repeat it."""
    out = tmp_path / "out"
    script = Script(tmp_path, "run", tiny(sample_data, out, "--max-steps", "2", "--fp8",
                                          "--max-restarts", "3"))
    scripts.append(script)
    assert script.wait() == 2, script.stderr[-3000:]
    errors = [x for x in script.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --fp8 cannot run here"), errors
    assert RESTART not in script.stderr and "Traceback" not in script.stderr
    assert not (out / "metrics.jsonl").exists()


def test_a_bad_flag_value_is_refused_before_any_attempt(sample_data, tmp_path: Path) -> None:
    result = finish(["bash", str(SCRIPT), *tiny(sample_data, tmp_path / "out",
                                                "--max-restarts", "3", "--max-steps", "-5")],
                    tmp_path, cwd=tmp_path)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("start_training.sh: error: ") and "--max-steps" in last, last
    assert RESTART not in result.stderr and "[start]" not in result.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_script_reaches_training_and_is_not_restarted(
        sig: signal.Signals, sample_data, scripts, tmp_path: Path) -> None:
    """SIGTERM or SIGINT (Ctrl-C) to the supervising script: train.py saves and stops as it
    does for a preemption, the script exits with its status and starts nothing more."""
    out = tmp_path / "out"
    script = Script(tmp_path, "run", tiny(sample_data, out, "--max-steps", "1000",
                                          "--save-steps", "1000", "--max-restarts", "2"))
    scripts.append(script)
    script.wait_for(lambda: last_step(out) >= 2, "step 2")
    (trainer,) = script.trainers()
    assert trainer.pid != script.proc.pid  # the script supervises: it did not exec
    script.proc.send_signal(sig)
    assert script.wait() == 0, script.stderr[-3000:]
    assert script.stderr.count(f"{sig.name} received") == 1, script.stderr[-3000:]
    assert RESTART not in script.stderr and starts(script) == 1
    stopped = last_step(out)
    assert stopped < 1000
    assert trained_step(complete(out)[-1]) == stopped  # saved on the way out


def test_ctrl_c_while_training_starts_up_stops_it(sample_data, scripts, tmp_path: Path) -> None:
    """A shell's background command ignores SIGINT; the script gives training the default
    back, so a Ctrl-C before train.py installs its own handler still ends it (130)."""
    out = tmp_path / "out"
    script = Script(tmp_path, "run", tiny(sample_data, out, "--max-steps", "1000",
                                          "--save-steps", "1000", "--max-restarts", "2"))
    scripts.append(script)
    script.wait_for(lambda: bool(script.trainers()), "train.py to start")
    script.proc.send_signal(signal.SIGINT)
    # 130 from train.py's "interrupted", 0 once its handler saved, 1 when the interpreter
    # itself was still starting ("Fatal Python error: init_import_site"): none restarted.
    assert script.wait() in (0, 1, 130), script.stderr[-3000:]
    assert RESTART not in script.stderr and starts(script) <= 1
    assert last_step(out) < 1000


@pytest.mark.slow
def test_a_crash_that_repeats_gives_up_after_n_restarts(scripts, tmp_path: Path) -> None:
    """Every attempt fails (no shards in the data folder): N restarts, one line each, then a
    last line and training's status."""
    (tmp_path / "empty").mkdir()
    script = Script(tmp_path, "run", tiny(tmp_path / "empty", tmp_path / "out",
                                          "--max-restarts", "1"))
    scripts.append(script)
    assert script.wait() == 1, script.stderr[-3000:]
    lines = script.stderr.strip().splitlines()
    assert [x for x in lines if x.startswith("start_training.sh:")] == [
        "start_training.sh: training failed (exit status 1): restart 1 of 1 with --resume latest",
        "start_training.sh: training failed (exit status 1) after 1 restart(s): giving up "
        "(--max-restarts 1)"]
    assert len([x for x in lines if x.startswith("error: no shards")]) == 2

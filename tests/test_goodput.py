"""Goodput across sessions: a run killed with kill -9 and resumed on a fresh machine.

The account of each session (``goodput.json``, mirrored to ``BUCKET/logs/RUN/``) must add up
to its wall time, count the steps trained twice (after the checkpoint the resume started from,
before the kill), and be read back from the bucket by ``python -m utils.loop.goodput``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fake_engine import FakeEngine, fake_config
from helpers import REPO, Run, finish, last_step, metrics, train

from utils.checkpoint import find_complete, step_of
from utils.loop.goodput import CATEGORIES, read_sessions, report, totals
from utils.loop.trainer import Trainer


def _adds_up(session: dict, explained: bool = True) -> None:
    """The categories are the session's wall time, and (a real run's, not milliseconds of a
    fake one) they explain it: little is left over in ``other``."""
    seconds = session["seconds"]
    assert set(seconds) <= set(CATEGORIES)
    assert sum(seconds.values()) == pytest.approx(session["wall_s"], rel=0.01)
    assert not explained or seconds["other"] < 0.1 * session["wall_s"], seconds


def test_each_session_adds_up_and_a_resume_counts_the_redone_steps(sample_data, tmp_path):
    crash_at = 6

    def crash(step: int) -> None:
        if step == crash_at:
            raise RuntimeError("the machine went away")

    config = fake_config(sample_data, tmp_path, max_steps=10, save_steps=4, logging_steps=1)
    with pytest.raises(RuntimeError):
        Trainer(config, FakeEngine(on_step=crash)).run()  # steps 1..6 logged, 4 saved
    resumed = fake_config(sample_data, tmp_path, max_steps=10, save_steps=4, logging_steps=1,
                          resume="latest", overwrite=False)
    summary = Trainer(resumed, FakeEngine()).run()
    first, second = read_sessions(tmp_path / "goodput.json")
    assert (first["start_step"], first["step"]) == (0, crash_at)
    assert (second["start_step"], second["step"], second["redone_steps"]) == (4, 10, 2)
    for session in (first, second):
        _adds_up(session, explained=False)
    assert "over 2 sessions" in summary["goodput"] and "2 step(s) trained twice" in \
        summary["goodput"]
    assert 0 < metrics(tmp_path)[-1]["goodput/productive"] <= 1  # what the trackers get


def test_an_overwrite_starts_the_account_afresh(sample_data, tmp_path):
    Trainer(fake_config(sample_data, tmp_path, max_steps=4), FakeEngine()).run()
    Trainer(fake_config(sample_data, tmp_path, max_steps=4), FakeEngine()).run()  # --overwrite
    assert len(read_sessions(tmp_path / "goodput.json")) == 1


def test_the_run_line_counts_the_time_between_sessions_as_lost():
    sessions = [
        {"started_at": 0.0, "updated_at": 100.0, "wall_s": 100.0, "step": 50,
         "seconds": {"productive": 80.0, "startup": 20.0}},
        {"started_at": 120.0, "updated_at": 200.0, "wall_s": 80.0, "step": 90,
         "redone_steps": 10, "seconds": {"productive": 60.0, "redone": 10.0, "restore": 10.0}},
    ]
    wall, seconds = totals(sessions)
    assert wall == 200.0 and seconds["lost"] == 20.0
    assert sum(seconds.values()) == wall
    assert report(sessions) == ("goodput 70.0% over 2 sessions (200 s): startup 10.0%, "
                                "restore 5.0%, redone work 5.0%, lost between sessions "
                                "10.0%; 10 step(s) trained twice")


def _goodput_cli(source: Path) -> subprocess.CompletedProcess:
    return finish([sys.executable, "-m", "utils.loop.goodput", str(source)], cwd=REPO)


def test_the_cli_names_a_folder_without_an_account(tmp_path):
    result = _goodput_cli(tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"goodput: {tmp_path}: no goodput.json here; give a run's output folder or its logs "
        f"folder in the bucket (gs://BUCKET/PREFIX/logs/RUN)"]


@pytest.mark.slow
def test_kill_9_and_a_resume_on_a_fresh_machine(sample_data, tmp_path):
    bucket, out = tmp_path / "bucket", tmp_path / "out"
    mirrored = bucket / "logs" / "gp" / "goodput.json"
    args = ["--data-dir", str(sample_data), "--output-dir", str(out), "--bucket", str(bucket),
            "--run-name", "gp", "--max-steps", "40", "--save-steps", "10",
            "--log-upload-minutes", "0.01"]

    def mirrored_step() -> int:
        sessions = read_sessions(mirrored) if mirrored.is_file() else []
        return sessions[-1]["step"] if sessions else 0

    def uploaded_step() -> int:
        complete = find_complete(bucket / "checkpoints" / "gp")
        return step_of(complete[-1].name) if complete else 0

    first = Run(tmp_path, "first", args)
    # Killed once the bucket's account is past a checkpoint in the bucket: steps to redo.
    first.wait_for(lambda: 0 < uploaded_step() < mirrored_step(),
                   "a mirrored account past a checkpoint in the bucket")
    first.signal(signal.SIGKILL)
    first.wait()
    killed_at, recorded = last_step(out), mirrored_step()
    shutil.rmtree(out)  # a fresh machine: only the bucket is left
    second = train(tmp_path, "second", [*args, "--resume", "latest"])
    assert second.proc.returncode == 0, second.stderr[-3000:]
    assert "restored goodput.json of the earlier attempt" in second.stdout

    sessions = read_sessions(mirrored)
    assert len(sessions) == 2
    resumed_from = sessions[1]["start_step"]
    assert sessions[1]["redone_steps"] == recorded - resumed_from > 0
    for session in sessions:
        _adds_up(session)
    wall, seconds = totals(sessions)
    assert sum(seconds.values()) == pytest.approx(wall, rel=0.01)
    line = _goodput_cli(bucket / "logs" / "gp").stdout.strip()
    print(line, f"(killed at step {killed_at}, resumed from {resumed_from})")
    assert line.startswith("goodput ") and "over 2 sessions" in line
    assert f"{recorded - resumed_from} step(s) trained twice" in line
    assert f"| {line}" in second.stdout  # the summary's row says the same

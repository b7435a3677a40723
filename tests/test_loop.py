"""The loop's own logic with an in-process fake engine (tests/fake_engine.py): milliseconds.

Cadence (log, evaluate, save), a NaN stopping the run before anything is saved from it, a
signal's emergency checkpoint, a resume that continues the data order exactly, and the
callbacks' events (README's example, the order, errors, a bad --callbacks) — each on the real
``Trainer``, data, sampler, saver and publisher, with numbers for tensors.
"""

from __future__ import annotations

import math
import os
import re
import signal
from pathlib import Path

import pytest
from fake_engine import FakeEngine, fake_config
from helpers import metrics

from utils.checkpoint import find_complete, lineage
from utils.errors import ConfigError, TrainingError
from utils.loop.callbacks import Callback, Evaluation
from utils.loop.trainer import Trainer


def _steps(names: list) -> list[int]:
    return [int(str(getattr(n, "name", n)).split("-step")[1].split("-")[0]) for n in names]


def test_logs_evaluates_and_saves_on_its_cadence(sample_data, tmp_path):
    config = fake_config(sample_data, tmp_path, max_steps=7, logging_steps=2, save_steps=3,
                         eval_steps=4, save_total_limit=0)
    summary = Trainer(config, FakeEngine()).run()
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 6, 7]  # every 2 steps and the last
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 7]
    assert summary["checkpoints"] == [f"checkpoint-epoch0-step{s}-files1" for s in (3, 6, 7)]
    # The logged loss is the mean of the interval's steps: steps 3 and 4 -> (10/3 + 10/4) / 2.
    assert records[1]["loss"] == pytest.approx((10 / 3 + 10 / 4) / 2)
    head = lineage.read_local(tmp_path / "checkpoints")
    assert head["checkpoint"] == summary["checkpoints"][-1]
    assert head["lineage"] == summary["checkpoints"] and head["run_id"] == summary["run_id"]


def test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on(sample_data, tmp_path):
    config = fake_config(sample_data, tmp_path, max_steps=8, logging_steps=4, save_steps=2)
    engine = FakeEngine(loss_at=lambda step: math.nan if step == 4 else 1.0)
    summary = Trainer(config, engine).run()  # step index 4 is the 5th step
    assert engine.weight == 7.0  # that update was not applied
    assert [(r["step"], r["skipped_steps"], r["loss"]) for r in metrics(tmp_path)] == [
        (4, 0, 1.0), (8, 1, 1.0)]  # the skipped step's loss is not averaged in
    assert summary["skipped_steps"] == 1 and summary["steps"] == 8


def test_too_many_skips_in_a_row_stop_the_run_before_anything_is_saved_from_them(
        sample_data, tmp_path):
    config = fake_config(sample_data, tmp_path, max_steps=12, logging_steps=4, save_steps=2,
                         max_skipped_steps=2)
    engine = FakeEngine(loss_at=lambda step: math.nan if step >= 3 else 1.0)
    with pytest.raises(TrainingError, match=r"3 updates in a row up to step 6 had a "
                                            r"non-finite loss or gradient norm"):
        Trainer(config, engine).run()  # step indices 3, 4, 5: the 4th to 6th steps
    assert _steps(find_complete(tmp_path / "checkpoints")) == [2, 4]


def test_a_signal_saves_the_finished_steps_and_stops(sample_data, tmp_path):
    config = fake_config(sample_data, tmp_path, max_steps=50, save_steps=100)
    engine = FakeEngine(on_step=lambda step: step == 4 and os.kill(os.getpid(), signal.SIGTERM))
    summary = Trainer(config, engine).run()
    assert summary["stopped_early"] and summary["steps"] == 5
    assert _steps(find_complete(tmp_path / "checkpoints")) == [5]


def test_a_resume_continues_the_data_order_exactly(sample_data, tmp_path):
    whole = FakeEngine()
    Trainer(fake_config(sample_data, tmp_path / "whole", max_steps=8), whole).run()

    out = tmp_path / "cut"
    first = FakeEngine()
    Trainer(fake_config(sample_data, out, max_steps=5, save_steps=5), first).run()
    second = FakeEngine()
    summary = Trainer(fake_config(sample_data, out, max_steps=8, save_steps=5, resume="latest",
                                  overwrite=False), second).run()
    assert first.seen + second.seen == whole.seen  # the same windows, in the same order
    assert second.weight == 8.0  # the weight came back from step 5's checkpoint
    assert summary["run_id"] == lineage.read_local(out / "checkpoints")["run_id"]


def _readme_example(tmp_path) -> Path:
    """The callback example of README.md's "Extending the loop", written where a user would."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = text.split("```python\n# my_callbacks.py\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "my_callbacks.py"
    path.write_text(code)
    return path


def test_the_readme_callback_example_runs_every_5_steps_and_adds_a_metric(sample_data, tmp_path):
    example = _readme_example(tmp_path)
    out = tmp_path / "run"
    config = fake_config(sample_data, out, max_steps=12, logging_steps=4,
                         callbacks=f"{example}:Heartbeat")
    Trainer(config, FakeEngine()).run()
    beats = (out / "heartbeat.txt").read_text().split()
    assert beats[0::2] == ["5", "10"]
    records = metrics(out)
    assert [r["step"] for r in records] == [4, 8, 12]
    assert all(r["peak_rss_mib"] > 1 for r in records)  # written with the loop's own numbers


class Recorder(Callback):
    """Every event with the step it came at; log steps keep their record's keys."""

    def __init__(self):
        self.events = []

    def pre_train(self, trainer):
        self.events.append(("pre_train", trainer.state.step))

    def pre_step(self, trainer):
        self.events.append(("pre_step", trainer.state.step))

    def post_step(self, trainer):
        self.events.append(("post_step", trainer.state.step))

    def log_metrics(self, trainer, record):
        self.events.append(("log_metrics", record["step"], "eval_loss" in record))

    def post_checkpoint_saved(self, trainer, path):
        self.events.append(("post_checkpoint_saved", trainer.state.step, path.name))

    def post_train(self, trainer):
        self.events.append(("post_train", trainer.state.step))

    def on_error(self, trainer, error):
        self.events.append(("on_error", type(error).__name__))

    def close(self, trainer):
        self.events.append(("close", trainer.state.step))


def _with_recorder(config, engine):
    trainer = Trainer(config, engine)
    recorder = Recorder()
    callbacks = trainer.callbacks.callbacks  # after evaluation, before the writers
    callbacks.insert(1 + next(i for i, c in enumerate(callbacks) if isinstance(c, Evaluation)),
                     recorder)
    return trainer, recorder


def test_callbacks_see_each_event_once_in_order_with_evaluation_before_them(sample_data,
                                                                           tmp_path):
    config = fake_config(sample_data, tmp_path, max_steps=4, logging_steps=2, save_steps=4,
                         eval_steps=4)
    trainer, recorder = _with_recorder(config, FakeEngine())
    trainer.run()
    assert recorder.events == [
        ("pre_train", 0),
        ("pre_step", 0), ("post_step", 1), ("pre_step", 1), ("post_step", 2),
        ("log_metrics", 2, False),
        ("pre_step", 2), ("post_step", 3), ("pre_step", 3), ("post_step", 4),
        ("log_metrics", 4, True),  # the eval step: evaluation added its number first
        ("post_checkpoint_saved", 4, "checkpoint-epoch0-step4-files1"),
        ("post_train", 4), ("close", 4)]


def test_a_failing_run_tells_the_callbacks_and_closes_them(sample_data, tmp_path):
    config = fake_config(sample_data, tmp_path, max_steps=8, logging_steps=2)
    trainer, recorder = _with_recorder(config, FakeEngine(loss_at=lambda step: math.nan))
    trainer.config.max_skipped_steps = 0
    with pytest.raises(TrainingError):
        trainer.run()
    assert recorder.events[-2:] == [("on_error", "TrainingError"), ("close", 2)]
    assert ("post_train", 2) not in recorder.events


@pytest.mark.parametrize(("spec", "problem"), [
    ("nowhere.py:Heartbeat", "no file"),
    ("{example}", "give FILE.py:ClassName"),
    ("{example}:Missing", "has no class Missing; classes there: Heartbeat"),
    ("{plain}:Plain", "answers none of the loop's events"),
    ("{broken}:X", "failed to import (ZeroDivisionError"),
])
def test_a_bad_callbacks_flag_is_one_line_before_any_work(sample_data, tmp_path, spec, problem):
    (tmp_path / "plain.py").write_text("class Plain:\n    pass\n")
    (tmp_path / "broken.py").write_text("1 / 0\n")
    spec = spec.format(example=_readme_example(tmp_path), plain=tmp_path / "plain.py",
                       broken=tmp_path / "broken.py")
    config = fake_config(sample_data, tmp_path / "run", max_steps=2, callbacks=spec)
    with pytest.raises(ConfigError, match=re.escape(problem)) as err:
        Trainer(config, FakeEngine())
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing was written

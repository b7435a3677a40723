"""The loop's own logic with an in-process fake engine (tests/fake_engine.py): milliseconds.

Cadence (log, evaluate, save), a NaN stopping the run before anything is saved from it, a
signal's emergency checkpoint, a resume that continues the data order exactly, and the
callbacks' events (README's example, the order, errors, a bad --callbacks) — each on the real
``Trainer``, data, sampler, saver and publisher, with numbers for tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
from fake_engine import FakeEngine, fake_config
from helpers import metrics

from utils.checkpoint import MARKER, choose_resume, find_complete, lineage
from utils.errors import ConfigError, TrainingError
from utils.loop.callbacks import Callback, Evaluation
from utils.loop.schedule import Schedule
from utils.loop.trainer import Trainer
from utils.storage import open_store


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


def test_failing_updates_roll_back_twice_then_stop_unsaved(
        sample_data, tmp_path):
    config = fake_config(sample_data, tmp_path, max_steps=12, logging_steps=4, save_steps=2,
                         max_skipped_steps=2)
    engine = FakeEngine(loss_at=lambda step: math.nan if step >= 3 else 1.0)
    with pytest.raises(TrainingError, match=r"4 updates in a row up to step 10 had a "
                                            r"non-finite loss or gradient norm .* after 2 "
                                            r"rollback\(s\) \(step 6 -> 4, 4 windows skipped; "
                                            r"step 8 -> 6, 4 windows skipped\)"):
        Trainer(config, engine).run()  # every step from index 3 on fails: 2 rollbacks, stop
    # Steps 6 and 8 were saved on the rolled-back lines (the abort lets the write of step 8
    # finish): skipped updates leave the weights as they were (3 updates, as in step 4's),
    # and nothing is saved at the stop.
    assert _steps(find_complete(tmp_path / "checkpoints")) == [4, 6, 8]
    assert engine.weight == 3.0


def _poison_steps(sample_data, tmp_path, steps: range) -> frozenset[int]:
    """The windows a clean run reads at ``steps`` (step indices): a stretch of bad data."""
    clean = FakeEngine()
    Trainer(fake_config(sample_data, tmp_path / "clean", max_steps=steps.stop + 12), clean).run()
    return frozenset(i for step in steps for i in clean.seen[step])


def test_persistent_poison_rolls_back_skips_the_windows_and_completes(sample_data, tmp_path):
    poisoned = _poison_steps(sample_data, tmp_path, range(5, 10))
    out = tmp_path / "run"
    config = fake_config(sample_data, out, max_steps=16, save_steps=4, max_skipped_steps=2)
    engine = FakeEngine(poisoned=poisoned)
    summary = Trainer(config, engine).run()
    (event,) = metrics(out, "rollback")
    # Steps 6-8 (indices 5-7) failed; noticed after step 8: back to step 4, whose weight
    # (4 updates) is the one trained on; the poisoned windows of indices 8-9 are skipped too.
    assert (event["from_step"], event["step"], event["windows_skipped"]) == (8, 4, 8)
    assert event["checkpoint"] == "checkpoint-epoch0-step4-files1"
    assert summary["steps"] == 16 and summary["final_loss"] == pytest.approx(10 / 16)
    assert engine.weight == 4 + 16 - 4 - 2  # the updates kept: 4, then 12 steps less 2 skipped
    assert summary["rollbacks"] == ["rolled back from step 8 to checkpoint-epoch0-step4-files1 "
                                    "(step 4); skipping the 8 windows read since"]
    assert lineage.read_local(out / "checkpoints")["lineage"][-1] == summary["checkpoints"][-1]
    # Step 8 was saved on the new line only: 4 updates, then 2 skipped and 2 applied.
    step8 = out / "checkpoints" / "checkpoint-epoch0-step8-files1" / "model.safetensors"
    assert json.loads(step8.read_text())["weight"] == 6.0


def test_max_rollbacks_0_stops_with_one_line(sample_data, tmp_path):
    poisoned = _poison_steps(sample_data, tmp_path, range(5, 10))
    config = fake_config(sample_data, tmp_path / "run", max_steps=16, save_steps=4,
                         max_skipped_steps=2, max_rollbacks=0)
    with pytest.raises(TrainingError, match=r"^3 updates in a row up to step 8 .* after 0 "
                                            r"rollback\(s\): stopping without saving"):
        Trainer(config, FakeEngine(poisoned=poisoned)).run()


def test_a_resume_after_a_rollback_continues_exactly(sample_data, tmp_path):
    poisoned = _poison_steps(sample_data, tmp_path, range(5, 10))
    settings = {"max_steps": 16, "save_steps": 4, "max_skipped_steps": 2}
    whole = FakeEngine(poisoned=poisoned)
    Trainer(fake_config(sample_data, tmp_path / "whole", **settings), whole).run()
    out = tmp_path / "cut"
    first = FakeEngine(poisoned=poisoned)  # stopped at step 11, after the rollback
    Trainer(fake_config(sample_data, out, **{**settings, "max_steps": 11}), first).run()
    second = FakeEngine(poisoned=poisoned)
    Trainer(fake_config(sample_data, out, **settings, resume="latest", overwrite=False),
            second).run()
    assert first.seen + second.seen == whole.seen and second.weight == whole.weight


def test_a_rollback_lowers_the_learning_rate_for_a_while_and_a_resume_keeps_it(sample_data,
                                                                                tmp_path):
    poisoned = _poison_steps(sample_data, tmp_path, range(5, 10))
    settings = {"max_steps": 16, "save_steps": 4, "max_skipped_steps": 2,
                "rollback_lr_factor": 0.5, "rollback_lr_steps": 6}
    whole = FakeEngine(poisoned=poisoned)
    summary = Trainer(fake_config(sample_data, tmp_path / "whole", **settings), whole).run()
    assert summary["rollbacks"][0].endswith("; learning rate x0.5 until step 10")
    (event,) = metrics(tmp_path / "whole", "rollback")
    assert (event["step"], event["lr_factor"], event["lr_calm_until"]) == (4, 0.5, 10)
    plain = Schedule.of(fake_config(sample_data, tmp_path, **settings))
    plain.calm_factor = 1.0
    # 8 steps at the plain rate, back to step 4, steps 4-9 at half of it, then plain again.
    expected = [plain.lr(s) * (0.5 if n >= 8 and s < 10 else 1.0)
                for n, s in enumerate([*range(8), *range(4, 16)])]
    assert whole.lrs == pytest.approx(expected, rel=1e-12)

    calls: list[int] = []  # stopped (SIGTERM) at step index 6 the second time: inside the calm

    def stop_in_the_calm(step: int) -> None:
        calls.append(step)
        if calls.count(6) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "cut"
    first = FakeEngine(poisoned=poisoned, on_step=stop_in_the_calm)
    assert Trainer(fake_config(sample_data, out, **settings), first).run()["stopped_early"]
    second = FakeEngine(poisoned=poisoned)
    Trainer(fake_config(sample_data, out, **settings, resume="latest", overwrite=False),
            second).run()
    assert first.seen + second.seen == whole.seen
    assert first.lrs + second.lrs == whole.lrs  # steps 7-9 after the resume: still halved


def test_a_signal_saves_the_finished_steps_and_stops(sample_data, tmp_path):
    config = fake_config(sample_data, tmp_path, max_steps=50, save_steps=100)
    engine = FakeEngine(on_step=lambda step: step == 4 and os.kill(os.getpid(), signal.SIGTERM))
    summary = Trainer(config, engine).run()
    assert summary["stopped_early"] and summary["steps"] == 5
    assert _steps(find_complete(tmp_path / "checkpoints")) == [5]


def test_a_crash_while_a_checkpoint_is_written_still_completes_it(sample_data, tmp_path):
    """The step-4 snapshot is still being written (1 s) when step 5 raises: the abort waits
    for the write, so the checkpoint counts and a resume starts from it."""
    def crash(step: int) -> None:
        if step == 5:
            raise RuntimeError("the machine went away")

    config = fake_config(sample_data, tmp_path, max_steps=8, save_steps=4)
    with pytest.raises(RuntimeError, match="went away"):
        Trainer(config, FakeEngine(on_step=crash, write_s=1.0)).run()
    assert _steps(find_complete(tmp_path / "checkpoints")) == [4]


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


def test_a_loss_spike_is_an_event_and_a_smooth_run_has_none(sample_data, tmp_path):
    def spiky(step: int) -> float:
        return 50.0 if step == 14 else 10.0 / (step + 1)

    summary = Trainer(fake_config(sample_data, tmp_path / "smooth", max_steps=30),
                      FakeEngine()).run()
    assert metrics(tmp_path / "smooth", "spike") == [] and summary["steps"] == 30
    Trainer(fake_config(sample_data, tmp_path / "spiky", max_steps=30), FakeEngine(spiky)).run()
    (event,) = metrics(tmp_path / "spiky", "spike")
    assert (event["step"], event["metric"], event["value"]) == (15, "loss", 50.0)
    assert event["zscore"] > 6


def test_a_head_ahead_of_its_newest_marker_resumes_from_the_one_before(sample_data, tmp_path):
    """The publisher moves the head before it writes the marker, so a kill between the two
    leaves this: the head names step 8, whose marker never came. ``--resume latest`` walks
    back along the head's line to step 4 (the other order lost a complete checkpoint the
    head did not name, and the resume went a checkpoint further back)."""
    out = tmp_path / "run"
    Trainer(fake_config(sample_data, out, max_steps=8, save_steps=4), FakeEngine()).run()
    root = out / "checkpoints"
    step8 = root / "checkpoint-epoch0-step8-files1"
    assert lineage.read_local(root)["checkpoint"] == step8.name
    (step8 / MARKER).unlink()
    assert choose_resume("latest", root).name == "checkpoint-epoch0-step4-files1"
    second = FakeEngine()
    Trainer(fake_config(sample_data, out, max_steps=10, save_steps=4, resume="latest",
                        overwrite=False), second).run()
    assert len(second.seen) == 6  # steps 5-10, after step 4's checkpoint


def test_a_bucket_head_ahead_of_its_newest_marker_resumes_from_the_one_before(sample_data,
                                                                              tmp_path):
    """The same in the bucket, read from a fresh machine (no local checkpoints): the head is
    written there just before the marker, a kill between them leaves step 8 unmarked."""
    out, bucket = tmp_path / "run", tmp_path / "bucket"
    config = fake_config(sample_data, out, max_steps=8, save_steps=4, bucket=str(bucket))
    Trainer(config, FakeEngine()).run()
    store, prefix = open_store(str(bucket)), f"checkpoints/{config.run_name}"
    assert lineage.read_remote(store, prefix)["checkpoint"] == "checkpoint-epoch0-step8-files1"
    store.child(f"{prefix}/checkpoint-epoch0-step8-files1").delete(MARKER)
    fresh = tmp_path / "fresh" / "checkpoints"
    assert choose_resume("latest", fresh, store, prefix).name == "checkpoint-epoch0-step4-files1"

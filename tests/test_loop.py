"""The loop's own logic with an in-process fake engine (tests/fake_engine.py): milliseconds.

Cadence (log, evaluate, save), a NaN stopping the run before anything is saved from it, a
signal's emergency checkpoint, and a resume that continues the data order exactly — each on
the real ``Trainer``, data, sampler, saver and publisher, with numbers for tensors.
"""

from __future__ import annotations

import math
import os
import signal

import pytest
from fake_engine import FakeEngine, fake_config
from helpers import metrics

from utils.checkpoint import find_complete, lineage
from utils.errors import TrainingError
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


def test_a_nan_loss_stops_the_run_before_anything_is_saved_from_it(sample_data, tmp_path):
    config = fake_config(sample_data, tmp_path, max_steps=8, logging_steps=4, save_steps=2)
    engine = FakeEngine(loss_at=lambda step: math.nan if step == 4 else 1.0)
    with pytest.raises(TrainingError, match="loss became nan at step 6"):
        Trainer(config, engine).run()  # step index 4 is the 5th step; noticed at the save
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

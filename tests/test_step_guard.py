"""The per-step guard on the real engines: a non-finite update is skipped on the device.

A poisoned step (its loss multiplied by NaN at the loss boundary, so every gradient is NaN)
must leave the weights, the optimizer's moments and its step count exactly as they were, be
counted as ``skipped_steps``, and cost no host sync: the torch steps run under a
``TorchFunctionMode`` that counts every host read of a tensor (``item``, ``tolist``, ``bool``,
``float``) — there must be none between log steps. (transformers' check for packed sequences
was one, every forward: ``causal_lm_loss`` passes the mask that skips it.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from fake_engine import fake_config
from helpers import metrics

from utils.loop.trainer import Trainer

POISONED = {3, 4}  # step indices whose loss is NaN (the 4th and 5th steps)


def _poison(engine, steps: set[int], factor) -> list[int]:
    """Make the engine's loss NaN on ``steps`` (counted by calls to train_step). The factor
    rides in the batch, an input of the step, so a compiled step sees it too."""
    seen = [-1]
    loss, train_step, on_device = engine.loss, engine.train_step, engine.on_device

    def poisoned_loss(model, batch):
        value, extras = loss(model, batch)
        return value * batch["poison"], extras

    def with_factor(rows, target_count=None):
        batch = on_device(rows, target_count)
        batch["poison"] = factor(math.nan if seen[0] in steps else 1.0)
        return batch

    def counting_step(*args, **kwargs):
        seen[0] += 1
        return train_step(*args, **kwargs)

    engine.loss, engine.train_step, engine.on_device = poisoned_loss, counting_step, with_factor
    return seen


def test_torch_skips_a_poisoned_update_on_the_device_without_a_host_sync(sample_data,
                                                                          tmp_path):
    torch = pytest.importorskip("torch")
    from torch.overrides import TorchFunctionMode

    from utils.torch_engine.engine import TorchEngine

    class HostReads(TorchFunctionMode):
        """Every call that hands a tensor's value to Python (on a GPU: waits for the device).
        On this CPU a copy to the host cannot be told from a no-op ``.to(device)``."""

        READS = {"item", "tolist", "__bool__", "__float__", "__int__", "numpy"}

        def __init__(self):
            super().__init__()
            self.reads: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in self.READS:
                self.reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    config = fake_config(sample_data, tmp_path, max_steps=8, logging_steps=8, save_steps=100,
                         compile=False, mixed_precision="no", eval_windows=0)
    engine = TorchEngine(config)
    trainer = Trainer(config, engine)
    _poison(engine, POISONED, torch.tensor)
    inner = engine.optimizer.optimizer
    weights, counts, modes = {}, {}, []
    train_step = engine.train_step

    def watched_step(micro, step, target_count=None):
        mode = HostReads()
        before = [p.detach().clone() for p in engine.model.parameters()]
        with mode:
            train_step(micro, step, target_count)
        modes.append(mode.reads)
        params = list(engine.model.parameters())
        weights[step] = all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
        counts[step] = int(inner.state[params[0]]["step"])

    engine.train_step = watched_step
    summary = trainer.run()
    assert modes == [[]] * 8  # no host read inside any step, poisoned or not
    assert [step for step, same in weights.items() if same] == sorted(POISONED)
    assert [counts[s] for s in range(8)] == [1, 2, 3, 3, 3, 4, 5, 6]  # AdamW's own count
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())
    assert summary["skipped_steps"] == 2 and math.isfinite(summary["final_loss"])
    assert [r["skipped_steps"] for r in metrics(tmp_path)] == [2]


@pytest.mark.slow
def test_mlx_skips_a_poisoned_update_and_keeps_its_optimizer_state(sample_data, tmp_path):
    mx = pytest.importorskip("mlx.core")
    from mlx.utils import tree_flatten

    from utils.mlx_engine.engine import MlxEngine

    config = fake_config(sample_data, tmp_path, max_steps=6, logging_steps=6, save_steps=100,
                         backend="mlx", compile=True, mixed_precision="no", eval_windows=0)
    engine = MlxEngine(config)
    trainer = Trainer(config, engine)
    seen = _poison(engine, POISONED, mx.array)
    snapshots = []
    update = engine.update

    def watched_update():
        update()
        state = dict(tree_flatten(engine.optimizer.state))
        snapshots.append((seen[0], {k: np.array(v) for k, v in tree_flatten(engine.params)},
                          int(state["step"].item())))

    engine.update = watched_update
    summary = trainer.run()
    steps = [count for _, _, count in snapshots]
    assert steps == [1, 2, 3, 3, 3, 4]
    for (index, params, _), (_, previous, _) in zip(snapshots[1:], snapshots, strict=False):
        same = all(np.array_equal(params[k], previous[k]) for k in params)
        assert same == (index in POISONED)
    assert summary["skipped_steps"] == 2 and math.isfinite(summary["final_loss"])


def _poison_stream(trainer, engine, batches: range, factor) -> None:
    """Bad data: the stream's batches ``batches`` (counted as drawn, so a rollback, which
    keeps the data position, moves past them) make the loss NaN."""
    drawn = iter(trainer.batches)
    loss = engine.loss

    def tagged():
        for index, batch in enumerate(drawn):
            yield {**batch, "poison": factor(math.nan if index in batches else 1.0)}

    def poisoned_loss(model, batch):
        value, extras = loss(model, batch)
        return value * batch["poison"], extras

    trainer.batches, engine.loss = tagged(), poisoned_loss


@pytest.mark.slow
def test_torch_rolls_back_past_poisoned_data_and_ends_near_a_clean_run(sample_data, tmp_path):
    torch = pytest.importorskip("torch")
    from utils.torch_engine.engine import TorchEngine

    applied: dict[str, list[float]] = {}  # the rate AdamW stepped with, step by step

    def run(out, poison: range | None) -> dict:
        config = fake_config(sample_data, out, max_steps=40, logging_steps=5, save_steps=10,
                             compile=False, mixed_precision="no", eval_windows=0,
                             max_skipped_steps=2, rollback_lr_factor=0.5, rollback_lr_steps=8)
        engine = TorchEngine(config)
        trainer = Trainer(config, engine)
        if poison is not None:
            _poison_stream(trainer, engine, poison, lambda v: torch.tensor(v))
        rates, step = applied.setdefault(out.name, []), engine.optimizer.step

        def recording_step(*args, **kwargs):
            rates.append(engine.optimizer.param_groups[0]["lr"])
            return step(*args, **kwargs)

        engine.optimizer.step = recording_step
        return trainer.run()

    clean = run(tmp_path / "clean", None)
    rolled = run(tmp_path / "rolled", range(12, 20))
    # After the (last) rollback to step 10: steps 10-17 at half the rate, then the clean rate.
    tail = applied["rolled"][-30:]
    assert tail == pytest.approx([r * (0.5 if s < 18 else 1.0)
                                  for s, r in enumerate(applied["clean"][10:], start=10)])
    print(f"final loss: clean {clean['final_loss']:.4f}, rolled back "
          f"{rolled['final_loss']:.4f}; {rolled['rollbacks']}")
    assert rolled["rollbacks"] and rolled["steps"] == 40
    assert rolled["final_loss"] == pytest.approx(clean["final_loss"], rel=0.05)
    records = metrics(tmp_path / "rolled", "rollback")
    assert [r["step"] for r in records] == [10] * len(rolled["rollbacks"])

"""Weighted data mixtures: per-step proportions, exact resume, one line for bad specs.

The sampler's arithmetic is checked directly; the end-to-end tests run train.py as real
processes on two sources synced from the GCS emulator.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_same_records, kill_and_resume, metrics, tensorboard_scalars, train

from utils.data import (
    DataError,
    MixtureBatchSampler,
    MixturePosition,
    Source,
    parse_mix,
    position_from_dict,
    source_weights,
    split_count,
)
from utils.data.mixture import allocate
from utils.storage import open_store, sync_up

SEQ = 64  # helpers.TINY's --seq-len


def _sources(sizes: dict[str, int], weights: dict[str, float]) -> list[Source]:
    out, start = [], 0
    for name, size in sizes.items():
        out.append(Source(name, weights[name], np.arange(start, start + size)))
        start += size
    return out


@pytest.mark.parametrize("weights", [[0.75, 0.25], [0.7, 0.2, 0.1], [0.5, 0.3, 0.15, 0.05],
                                     [0.97, 0.03]])
@pytest.mark.parametrize("batch", [8, 13, 64])
def test_every_step_holds_the_weights_within_one_window(weights, batch):
    w = np.array(weights)
    taken = np.zeros(len(w))
    for step in range(1, 2001):
        counts = allocate(w, taken, batch)
        assert counts.sum() == batch
        assert np.all(np.abs(counts - w * batch) < 1 + 1e-9), (step, counts)
        taken += counts
        assert np.all(np.abs(taken - w * batch * step) <= 1 + 1e-9), (step, taken)


def test_sources_run_out_on_their_own_and_resume_exactly_at_another_world_size():
    sources = _sources({"big": 100, "small": 9}, {"big": 0.75, "small": 0.25})
    one = MixtureBatchSampler(sources, 8, 0, 1, seed=3)
    batches = [b for _, b in zip(range(40), one, strict=False)]
    drawn = np.concatenate(batches)
    small = drawn[drawn >= 100]
    assert len(small) == 40 * 2  # a quarter of every batch, epoch after epoch
    epochs = [set(small[i:i + 8]) for i in range(0, 80, 8)]  # 2 a batch, 8 of 9 an epoch
    assert all(len(e) == 8 and e <= set(range(100, 109)) for e in epochs)
    small_at = dict(one.position.sources)["small"]
    assert (small_at.epoch, small_at.offset, small_at.taken) == (9, 8, 80)
    # The same stream from a saved position, split over two processes (batch 4 each).
    saved = position_from_dict(json.loads(json.dumps(MixtureBatchSampler(
        sources, 8, 0, 1, seed=3).position.to_dict())))
    head = MixtureBatchSampler(sources, 8, 0, 1, seed=3, position=saved)
    list(zip(range(15), head, strict=False))
    ranks = [MixtureBatchSampler(sources, 4, r, 2, seed=3,
                                 position=position_from_dict(head.position.to_dict()))
             for r in range(2)]
    rest = [a + b for _, a, b in zip(range(25), *ranks, strict=False)]
    assert [list(b) for b in batches[15:]] == rest


def test_the_position_names_the_sources_and_a_changed_mix_is_refused():
    sources = _sources({"web": 50, "code": 50}, {"web": 0.5, "code": 0.5})
    position = MixturePosition.start(["web", "math"])
    with pytest.raises(DataError, match="same --data-mix sources"):
        MixtureBatchSampler(sources, 4, 0, 1, seed=0, position=position)
    with pytest.raises(DataError, match="'code' has 2 training windows, fewer than its 3"):
        MixtureBatchSampler(_sources({"web": 50, "code": 2}, {"web": 0.5, "code": 0.5}),
                            6, 0, 1, seed=0)


def test_mix_specs(tmp_path):
    assert parse_mix("web=7, code=3") == {"web": 0.7, "code": 0.3}
    path = tmp_path / "mix.json"
    path.write_text(json.dumps({"a": 1, "b": 1, "c": 2}))
    assert parse_mix(str(path)) == {"a": 0.25, "b": 0.25, "c": 0.5}
    assert source_weights("") == {"": 1.0}  # no mixture: the data folder itself
    assert source_weights("web=1,code=3") == {"web": 0.25, "code": 0.75}
    for bad, match in [("web", "not NAME=WEIGHT"), ("web=x", "not NAME=WEIGHT"),
                       ("web=0", "positive"), ("../x=1", "not a folder name"),
                       ("a=1,a=2", "twice"), (str(tmp_path / "no.json"), "cannot read")]:
        with pytest.raises(DataError, match=match):
            parse_mix(bad)
    assert split_count(8, [0.75, 0.25]) == [6, 2]


def test_mix_weights_are_finite_positive_and_normalised_without_overflow(tmp_path):
    """web=1e308,code=1e308 summed to inf: every weight became 0 and each batch shrank to
    the 2 windows handed out as remainders."""
    weights = parse_mix("web=1e308,code=1e308")
    assert weights == {"web": 0.5, "code": 0.5}
    assert allocate(np.array(list(weights.values())), np.zeros(2), 8).tolist() == [4, 4]
    assert parse_mix("a=1e308,b=1e308,c=1e308") == pytest.approx({"a": 1 / 3, "b": 1 / 3,
                                                                   "c": 1 / 3})
    path = tmp_path / "mix.json"
    path.write_text('{"a": ' + "1" * 400 + ', "b": ' + "1" * 400 + "}")  # beyond float
    assert parse_mix(str(path)) == {"a": 0.5, "b": 0.5}
    for bad, match in [("web=inf,code=1", "weight inf"), ("web=nan", "weight nan"),
                       ("web=-1e308", "weight -1e+308"),
                       ("web=1e308,code=1e-320", "'code' has weight 1e-320, a share of the mix "
                                                 "too small to ever be drawn")]:
        with pytest.raises(DataError, match=re.escape(match)):
            parse_mix(bad)
    for text, match in [('{"a": true}', "weight True"), ("[" * 100_000, "nested too deeply")]:
        path.write_text(text)
        with pytest.raises(DataError, match=match):
            parse_mix(str(path))
    assert split_count(5, [0.5, 0.3, 0.2]) == [3, 1, 1]


@pytest.fixture(scope="module")
def mix_data(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sources cut from the sample corpus: web/ (3 shards) and code/ (1 shard)."""
    root = tmp_path_factory.mktemp("mix")
    tokens = np.load(sample_data / "shard_00000.npy")
    meta = json.loads((sample_data / "dataset.json").read_text())
    cut = np.linspace(0, len(tokens), 6).astype(int)  # 5 equal pieces: web 3, code 1
    for name, parts in [("web", [tokens[cut[i]:cut[i + 1]] for i in range(3)]),
                        ("code", [tokens[cut[3]:cut[4]]])]:
        (root / name).mkdir()
        for i, part in enumerate(parts):
            np.save(root / name / f"shard_{i:05d}.npy", part)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _mix_args(data: Path, out: Path, bucket: str, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), "--bucket", bucket,
            "--run-name", "mix", "--data-mix", "web=0.75,code=0.25",
            "--per-device-train-batch-size", "8", *extra]


@pytest.mark.slow
def test_a_two_source_mixture_from_the_bucket_holds_its_shares_every_step(
        mix_data, gcs_bucket, tmp_path):
    sync_up(mix_data, open_store(gcs_bucket).child("training"))
    local = tmp_path / "data"
    run = train(tmp_path, "mix", _mix_args(local, tmp_path / "out", gcs_bucket, "--sync-data",
                                           "--max-steps", "12", "--save-steps", "12"))
    assert run.proc.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in local.iterdir() if p.is_dir()) == ["code", "web"]
    assert (local / "dataset.json").is_file()  # the prefix's shared tokenizer facts
    records = metrics(tmp_path / "out")
    assert [r["step"] for r in records] == list(range(1, 13))
    previous = {"web": 0, "code": 0}
    for r in records:
        by_source = r["tokens_by_source"]
        assert sum(by_source.values()) == r["tokens_seen"]
        for name, weight in (("web", 0.75), ("code", 0.25)):
            step_tokens = by_source[name] - previous[name]
            assert abs(step_tokens - weight * 8 * SEQ) <= SEQ, (r["step"], by_source)
        previous = by_source
    web = tensorboard_scalars(tmp_path / "out" / "logs" / "mix", "tokens_by_source/web")
    assert web == {r["step"]: r["tokens_by_source"]["web"] for r in records}
    state = json.loads(next((tmp_path / "out" / "checkpoints").glob("*/trainer_state.json"))
                       .read_text())["state"]
    assert set(state["position"]["sources"]) == {"web", "code"}


@pytest.mark.slow
def test_a_killed_mixture_run_resumes_with_identical_losses(mix_data, tmp_path):
    steps = ["--max-steps", "10", "--save-steps", "3"]
    whole = train(tmp_path, "whole", _mix_args(mix_data, tmp_path / "whole", "", *steps))
    assert whole.proc.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "cut"
    second = kill_and_resume(tmp_path, out, _mix_args(mix_data, out, "", *steps), kill_at=7)
    # From step 6; step 3 when the kill came before step 6 was marked; step 9 when the steps
    # outran the (low-priority) marking until then.
    assert re.search(r"resumed from \S+step(3|6|9)-", second.stdout), second.stdout[-2000:]
    assert_same_records(out, tmp_path / "whole", ("loss", "tokens_by_source", "tokens_seen"), 10)


@pytest.mark.slow
def test_resuming_a_mixture_without_it_says_what_to_do(mix_data, tmp_path):
    args = _mix_args(mix_data, tmp_path / "out", "", "--max-steps", "2", "--save-steps", "2")
    assert train(tmp_path, "first", args).proc.returncode == 0
    plain = [a for a in args if a not in ("--data-mix", "web=0.75,code=0.25")]
    run = train(tmp_path, "second", [*plain, "--resume", "latest", "--max-steps", "4"])
    assert run.proc.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--data-mix" in errors[0], run.stderr[-2000:]


@pytest.mark.slow
def test_validate_checks_every_source(mix_data, tmp_path):
    from conftest import run_train

    common = ["--data-dir", str(mix_data), "--bucket", "", "--output-dir", str(tmp_path / "v"),
              "--seq-len", "64", "--validate"]
    good = run_train(*common, "--data-mix", "web=3,code=1", tmp_path=tmp_path)
    assert good.returncode == 0, good.stdout[-2000:]
    assert re.search(r"\[PASS\] data present.*mix web 75% \([\d,]+ windows\), code 25%",
                     good.stdout)
    bad = run_train(*common, "--data-mix", "web=3,math=1", tmp_path=tmp_path)
    assert bad.returncode == 1
    assert re.search(r"\[FAIL\] data present.*math does not exist", bad.stdout), bad.stdout

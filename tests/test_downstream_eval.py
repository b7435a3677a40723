"""Downstream evaluation (--eval-tasks, evaluate.py): the task format and its one-line errors,
requests and sharding, per-example agreement with an independent torch reference (and with
lm-evaluation-harness when it is installed), on both backends, and in the loop: accuracy
rising over the smoke preset, and 2 processes reporting what 1 does."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_train
from helpers import finish, metrics

import evaluate
from utils.errors import ConfigError, DataError
from utils.stages.downstream import (
    CHOICE,
    CLOZE,
    DownstreamTask,
    Example,
    build_requests,
    encode_pair,
    example_results,
    load_task,
    plan_batches,
    run_requests,
    shipped_tasks,
    task_files,
    task_metrics,
)

LM_EVAL = importlib.util.find_spec("lm_eval") is not None
TASKS = REPO / "data" / "eval_tasks"


def chars(text: str) -> list[int]:
    """A character-level encoding: token boundaries are obvious in the assertions."""
    return [ord(c) for c in text]


# ------------------------------------------------------------------ format


def test_every_shipped_task_loads_with_its_kind():
    kinds = {name: load_task(TASKS / f"{name}.jsonl").kind for name in shipped_tasks()}
    assert kinds == {"arithmetic": CHOICE, "capitals": CHOICE, "python-cloze": CLOZE,
                     "python-lines": CHOICE, "python-syntax": CHOICE}
    assert len(load_task(TASKS / "python-syntax.jsonl", limit=7).examples) == 7


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": ["x", "y"], "gold": 2}', "'gold' must be the index (0 to 1)"),
    ('{"context": "a", "choices": ["x", "y"], "gold": true}', "'gold' must be the index"),
    ('{"context": "a", "choices": ["x"], "gold": 0}', "at least 2 non-empty strings"),
    ('{"context": "a", "choices": ["x", ""], "gold": 0}', "at least 2 non-empty strings"),
    ('{"context": 3, "target": "x"}', "'context' must be a string, got int"),
    ('{"context": "a", "target": "x", "delimiter": 1}', "'delimiter' must be a string"),
    ('{"context": "a", "answer": "x"}', "not a task example: expected 'context' with"),
    ('{"context": "a", "target": "x"', "not valid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"context": "a", "target": "x"}', "a cloze example in a multiple choice task"),
])
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text('{"context": "q", "choices": ["a", "b"], "gold": 1}\n\n' + line + "\n")
    with pytest.raises(DataError) as err:
        load_task(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_task_names_and_paths_resolve_or_fail_with_one_line(tmp_path):
    assert task_files("python-syntax, capitals") == [TASKS / "python-syntax.jsonl",
                                                     TASKS / "capitals.jsonl"]
    with pytest.raises(ConfigError, match="no shipped task of that name; choose from "
                                          "arithmetic, capitals, python-cloze"):
        task_files("hellaswag")
    with pytest.raises(ConfigError, match="no such file"):
        task_files(str(tmp_path / "missing.jsonl"))
    (tmp_path / "capitals.jsonl").write_text('{"context": "a", "target": "b"}\n')
    with pytest.raises(ConfigError, match="two tasks named 'capitals'"):
        task_files(f"capitals,{tmp_path / 'capitals.jsonl'}")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: no examples"):
        load_task(tmp_path / "empty.jsonl")


# ------------------------------------------------------------------ requests and metrics


def test_requests_split_like_lm_eval_and_truncate_from_the_left():
    # Trailing whitespace of the context moves to the continuation; empty context -> prefix.
    assert encode_pair(chars, "ab \n", "c", 0) == (chars("ab"), chars(" \nc"))
    assert encode_pair(chars, "", " c", 7) == ([7], chars(" c"))
    task = DownstreamTask("t", CHOICE, [Example("f:1", "abcdef", ("xy", "z"), 0)])
    long, short = build_requests(task, chars, 0, max_len=4)
    assert long.tokens.tolist() == chars("ef xy") and long.n_target == 3  # 5 = max_len + 1
    assert short.tokens.tolist() == chars("def z") and short.n_target == 2


def test_every_request_is_scored_once_over_the_processes_in_equal_batch_counts():
    task = DownstreamTask("t", CHOICE, [Example(f"f:{i}", "c" * (i % 7), ("a", "bb", "ccc"), 0)
                                        for i in range(11)])
    requests = build_requests(task, chars, 0, max_len=64)
    for world in (1, 2, 3):
        plans = plan_batches(requests, world, token_budget=24)
        scored = sorted(i for plan in plans for batch in plan for i in batch)
        assert scored == list(range(len(requests)))
        for rank, plan in enumerate(plans):  # whole examples, padded width within the budget
            assert {requests[i].example % world for batch in plan for i in batch} <= {rank}
            for batch in plan:
                width = max(len(requests[i].tokens) - 1 for i in batch)
                assert len(batch) == 1 or len(batch) * width <= 24
        calls = []
        for rank in range(world):  # each process makes as many forward passes as the busiest

            def score(batch, calls=calls, rank=rank):
                calls.append(rank)
                return [(0.0, True, 1)] * len(batch["input_ids"])

            run_requests(requests, score, 0, rank, world, 24)
        assert len(set(calls.count(rank) for rank in range(world))) == 1


def test_acc_norm_divides_by_the_choices_length_in_characters_and_ties_go_first():
    task = DownstreamTask("t", CHOICE, [Example("f:1", "q", ("a", "bbbb"), 1),
                                        Example("f:2", "q", ("a", "b"), 1)])
    requests = build_requests(task, chars, 0, 16)
    scores = {0: (-2.0, False, 2), 1: (-4.0, False, 5), 2: (-1.0, True, 2), 3: (-1.0, True, 2)}
    results = example_results(task, requests, scores)
    assert (results[0].pred, results[0].pred_norm) == (0, 1)  # -4/4 > -2/1
    assert (results[1].pred, results[1].correct) == (0, False)  # a tie: the first, as numpy
    sums = [2.0, 0.0, 1.0, -3.0]
    assert task_metrics(task, sums) == {"eval/t/acc": 0.0, "eval/t/acc_norm": 0.5}
    cloze = DownstreamTask("c", CLOZE, task.examples)
    assert task_metrics(cloze, [2.0, 1.0, 1.0, -3.0]) == {"eval/c/acc": 0.5,
                                                          "eval/c/ppl": math.exp(1.5)}


def test_the_generator_rebuilds_the_shipped_files(tmp_path, monkeypatch):
    from data.eval_tasks import build

    monkeypatch.setattr(build, "HERE", tmp_path)
    build.write("arithmetic", build.arithmetic(__import__("random").Random(3)))
    build.write("capitals", build.capitals(__import__("random").Random(4)))
    for name in ("arithmetic", "capitals"):
        assert (tmp_path / f"{name}.jsonl").read_text() == (TASKS / f"{name}.jsonl").read_text()
    asked = (REPO / "data" / "examples").rglob("*.jsonl")
    text = "".join(p.read_text() for p in asked)
    for example in load_task(TASKS / "arithmetic.jsonl").examples:  # held out of SFT data
        assert example.context.split("\n")[0].removeprefix("Question: ") not in text


# ------------------------------------------------------------------ agreement


def reference(model_dir: Path, task_name: str, limit: int) -> list[tuple[list[float], int, int]]:
    """Per example (log-likelihood per choice, argmax, length-normalised argmax), computed one
    sequence at a time with a plain transformers forward and log_softmax: no padding, no
    batching, none of the code under test."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = GPTNeoXForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for line in (TASKS / f"{task_name}.jsonl").read_text().splitlines()[:limit]:
        record = json.loads(line)
        context = record["context"].rstrip()
        moved = record["context"][len(context):]
        lls = []
        for choice in record["choices"]:
            text = context + moved + record.get("delimiter", " ") + choice
            whole = tokenizer(text, add_special_tokens=False)["input_ids"]
            start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            lls.append(sum(logp[t - 1, whole[t]].item() for t in range(start, len(whole))))
        norm = [ll / len(c) for ll, c in zip(lls, record["choices"], strict=True)]
        out.append((lls, int(np.argmax(lls)), int(np.argmax(norm))))
    return out


AGREE_TASKS, AGREE_EXAMPLES = ("python-syntax", "capitals"), 40


@pytest.fixture(scope="module")
def expected(tiny_base):
    return {name: reference(tiny_base, name, AGREE_EXAMPLES) for name in AGREE_TASKS}


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_per_example_scores_match_an_independent_torch_reference(tiny_base, expected, backend,
                                                                 tmp_path):
    """Batched, padded, sorted by length (torch in-process; MLX through evaluate.py, which
    preloads OpenBLAS): every example's prediction as the one-at-a-time reference's."""
    if backend == "torch":
        ours = evaluate.evaluate(tiny_base, ",".join(AGREE_TASKS), backend,
                                 examples=AGREE_EXAMPLES, batch_tokens=700)
    else:
        done = finish(
            [sys.executable, "evaluate.py", str(tiny_base), "--backend", "mlx", "--tasks",
             ",".join(AGREE_TASKS), "--examples", str(AGREE_EXAMPLES), "--batch-tokens", "700",
             "--output", str(tmp_path / "mlx.json")],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)})
        assert done.returncode == 0, done.stderr[-2000:]
        ours = json.loads((tmp_path / "mlx.json").read_text())
    for name in AGREE_TASKS:
        got = ours["examples"][name]
        assert [(g["pred"], g["pred_norm"]) for g in got] == [e[1:] for e in expected[name]]
        np.testing.assert_allclose([g["lls"] for g in got], [e[0] for e in expected[name]],
                                   rtol=1e-4, atol=2e-4 if backend == "mlx" else 1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not LM_EVAL, reason="lm-evaluation-harness is not installed (pip install "
                                        "lm-eval)")
def test_lm_eval_recipe_agrees_per_example(tiny_base, tmp_path):
    """The README's recipe: lm_eval with the shipped task YAML on a checkpoint gives the same
    per-example log-likelihoods and correctness as evaluate.py."""
    tasks = {"python_syntax": "python-syntax", "python_cloze": "python-cloze",
             "capitals": "capitals"}
    done = finish(
        [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
         f"pretrained={tiny_base},dtype=float32", "--include_path", "data/eval_tasks/lm_eval",
         "--tasks", ",".join(tasks), "--device", "cpu", "--batch_size", "8", "--limit", "30",
         "--log_samples", "--output_path", str(tmp_path / "lm_eval")],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
             "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.stderr[-3000:]
    ours = evaluate.evaluate(tiny_base, ",".join(tasks.values()), examples=30)
    for lm_name, name in tasks.items():
        samples = sorted((json.loads(line) for path in (tmp_path / "lm_eval").rglob(
            f"samples_{lm_name}_*.jsonl") for line in path.read_text().splitlines()),
            key=lambda s: s["doc_id"])
        got = ours["examples"][name]
        assert len(samples) == len(got) == min(30, len(load_task(TASKS / f"{name}.jsonl")
                                                   .examples))
        lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
        np.testing.assert_allclose(lls, [g["lls"] for g in got], rtol=1e-5, atol=1e-5)
        if name == "python-cloze":
            assert [bool(s["acc"]) for s in samples] == [g["correct"] for g in got]
        else:
            assert [s["acc"] for s in samples] == [float(g["correct"]) for g in got]
            assert [s["acc_norm"] for s in samples] == [float(g["correct_norm"]) for g in got]
        assert ours["metrics"][f"eval/{name}/acc"] == pytest.approx(
            np.mean([float(s["acc"]) for s in samples]))


def test_evaluate_cli_prints_metrics_and_refuses_bad_input_in_one_line(tiny_base, tmp_path):
    out = tmp_path / "scores.json"
    done = finish([sys.executable, "evaluate.py", str(tiny_base), "--tasks",
                   "capitals", "--examples", "5", "--output", str(out)],
                  cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0].startswith("eval/capitals/acc: ")
    assert len(json.loads(out.read_text())["examples"]["capitals"]) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["b", "c"], "gold": 5}\n')
    done = finish([sys.executable, "evaluate.py", str(tiny_base), "--tasks", str(bad)],
                  cwd=REPO)
    assert done.returncode == 1
    assert done.stderr == f"error: {bad}:1: 'gold' must be the index (0 to 1) of the right " \
                          f"choice, got 5\n"


# ------------------------------------------------------------------ in the loop


def eval_records(out: Path, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in metrics(out) if key in r}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_smoke_accuracy_rises_above_chance(sample_data, tmp_path, backend):
    """The smoke preset with a shipped task: chance (1 in 4) before the first step, well above
    it by the end. MLX runs the same preset with a 64-token window (a quarter of the time)."""
    from utils.mlx_engine.blas import openblas_preload

    extra = ["--seq-len", "64"] if backend == "mlx" else []
    out = tmp_path / "out"
    result = run_train("--config", "smoke", "--backend", backend, "--data-dir",
                       str(sample_data), "--bucket", "", "--output-dir", str(out),
                       "--eval-tasks", "python-syntax", "--report-to", "none", *extra,
                       tmp_path=tmp_path,
                       env=openblas_preload() if backend == "mlx" else None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "downstream eval: python-syntax (100 x 4): 400 rows" in result.stdout
    acc = eval_records(out, "eval/python-syntax/acc")
    assert sorted(acc) == [0, 50, 100, 150]
    assert acc[0] < 0.4 and acc[150] > 0.6, acc
    assert eval_records(out, "eval/python-syntax/acc_norm").keys() == acc.keys()


@pytest.mark.slow
def test_two_processes_report_what_one_does(sample_data, tmp_path):
    """Examples dealt over 2 ranks (an odd count: uneven shards), sums added: the same metrics
    as one process with the same global batch."""
    from test_distributed import accelerate_two, finish, launch, ok

    common = ["train.py", "--config", "smoke", "--seq-len", "64", "--max-steps", "20",
              "--logging-steps", "10", "--eval-steps", "10", "--save-steps", "20", "--bucket",
              "", "--data-dir", str(sample_data), "--report-to", "none", "--eval-tasks",
              "python-syntax,python-cloze", "--eval-task-examples", "21"]
    one, two = tmp_path / "one", tmp_path / "two"
    ok(finish(launch([sys.executable, *common, "--output-dir", str(one)], tmp_path, name="a")))
    ok(finish(launch(accelerate_two(*common, "--output-dir", str(two),
                                    "--per-device-train-batch-size", "4"), tmp_path, name="b")))
    for key in ("eval/python-syntax/acc", "eval/python-syntax/acc_norm",
                "eval/python-cloze/acc"):
        assert eval_records(two, key) == eval_records(one, key), key
        assert sorted(eval_records(one, key)) == [0, 10, 20]
    ppl_one, ppl_two = (eval_records(o, "eval/python-cloze/ppl") for o in (one, two))
    assert ppl_two == pytest.approx(ppl_one, rel=1e-4)


"""GRPO's framework-neutral half: prompt data, rewards, scoring and group advantages.

Hand-computed cases only, no model and no framework: fast, and exact about the numbers the
engines build their losses on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from utils.errors import ConfigError, DataError, TrainingError
from utils.stages.examples import MAX_LINE_BYTES, data_files, load_sft, sft_segments
from utils.stages.grpo import (
    REWARDS,
    GrpoExample,
    batch_examples,
    completion_mask,
    decode_completions,
    frac_zero_std,
    group_advantages,
    load_grpo,
    load_rewards,
    pad_prompts,
    per_completion,
    reward_metrics,
    score,
)

REPO = Path(__file__).resolve().parent.parent


def chars(texts: list[str]) -> list[list[int]]:
    """A stand-in tokenizer: one token per character."""
    return [[ord(c) for c in text] for text in texts]


def write(path: Path, *lines: str | dict) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------- data


def test_both_forms_load_with_the_sft_prompt_text(tmp_path: Path) -> None:
    record = {"question": "What is 6 + 5?", "answer": "11"}
    path = write(tmp_path / "a.jsonl", record, "",
                 {"prompt": "The capital of France is", "answer": "Paris", "level": 2})
    examples = load_grpo([path], chars, max_prompt_tokens=64)
    sft_prompt = sft_segments(record, "x")[0][0]
    assert examples[0].prompt == sft_prompt == "Question: What is 6 + 5?\nAnswer:"
    assert examples[0].answer == "11" and examples[0].fields == record
    assert examples[0].prompt_ids.dtype == np.int32
    assert examples[0].prompt_ids.tolist() == chars([sft_prompt])[0]
    assert examples[1].fields["level"] == 2 and examples[1].prompt == "The capital of France is"
    assert [e.index for e in examples] == [0, 1]


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('["a"]', "expected a JSON object"),
    ({"answer": "3"}, "not a GRPO example"),
    ({"prompt": "  ", "answer": "3"}, "'prompt' is empty"),
    ({"question": "What is 1 + 2?"}, "missing key 'answer'"),
    ({"prompt": "1 + 2 =", "answer": 3}, "'answer' must be a string, got int"),
    ({"question": ["x"], "answer": "3"}, "'question' must be a string, got list"),
    ({"prompt": "x" * 20, "answer": "3"}, "the prompt takes 20 tokens, over the 10"),
    # Hostile lines: the decoder's ValueError and RecursionError, named like any bad line.
    ('{"prompt": "a", "answer": "1", "n": ' + "9" * 5000 + "}",
     "not readable as JSON (Exceeds the limit (4300 digits) for integer string conversion"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
])
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path: Path, line, message) -> None:
    path = write(tmp_path / "bad.jsonl", {"prompt": "ok", "answer": "1"}, line)
    with pytest.raises(DataError) as err:
        load_grpo([path], chars, max_prompt_tokens=10)
    text = str(err.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text


@pytest.mark.parametrize("load", [
    lambda files: load_grpo(files, chars, max_prompt_tokens=10),
    lambda files: load_sft(files, chars, eos_id=0, seq_len=64),
], ids=["grpo", "sft"])
@pytest.mark.parametrize("line, message", [
    ('{"prompt": "' + "x" * MAX_LINE_BYTES + '", "answer": "1"}',
     f"line longer than {MAX_LINE_BYTES:,} bytes"),
    ('{"prompt": "caf\xe9", "answer": "1"}'.encode("latin-1"),
     "not UTF-8 text (invalid continuation byte at byte 15 of the line)"),
    ('{"prompt": "a", "completion": "b", "n": ' + "1" * 4301 + "}", "4300 digits"),
])
def test_hostile_lines_are_one_error_naming_file_and_line(tmp_path: Path, load, line,
                                                          message) -> None:
    """The line bound, bad bytes and huge integers, in both SFT and GRPO data; the lines
    before the bad one (one just under the bound included) read fine."""
    path = tmp_path / "bad.jsonl"
    ok = json.dumps({"prompt": "a", "answer": "1", "completion": "b"}).encode()
    near = json.dumps({"prompt": "a", "answer": "1", "completion": "b", "pad": ""}).encode()
    near = near[:-2] + b"x" * (MAX_LINE_BYTES - len(near)) + near[-2:]
    bad = line if isinstance(line, bytes) else line.encode()
    path.write_bytes(ok + b"\n" + near + b"\r\n" + bad + b"\n")
    with pytest.raises(DataError) as err:
        load([path])
    text = str(err.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text, text


def test_no_examples_and_no_room_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no examples"):
        load_grpo([write(tmp_path / "empty.jsonl", "")], chars, max_prompt_tokens=10)
    with pytest.raises(ConfigError, match="no room for prompts"):
        load_grpo([write(tmp_path / "a.jsonl", {"prompt": "a", "answer": "1"})], chars, 0)


def test_bundled_examples_load() -> None:
    for where in ("data/examples/grpo", "data/examples/topics/01-arithmetic/grpo.jsonl",
                  "data/examples/topics/02-capitals/grpo.jsonl"):
        examples = load_grpo(data_files(REPO / where), chars, max_prompt_tokens=64)
        assert len(examples) >= 24


def test_pad_prompts_pads_on_the_left_and_keeps_positions() -> None:
    examples = [GrpoExample("ab", "1", np.array([5, 6], np.int32), {"answer": "1"}, index=7),
                GrpoExample("abcd", "2", np.array([1, 2, 3, 4], np.int32), {"answer": "2"},
                            index=3)]
    batch = pad_prompts(examples, pad_id=0)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int64
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6], [1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["index"].tolist() == [7, 3]
    table = [None] * 8
    table[7], table[3] = examples
    assert batch_examples(batch, table) == examples
    prompts, records = per_completion(examples, 2)
    assert prompts == ["ab", "ab", "abcd", "abcd"]
    assert records == [{"answer": "1"}] * 2 + [{"answer": "2"}] * 2


def test_completions_end_at_the_first_eos() -> None:
    eos = 2
    generated = np.array([[7, 8, 2, 2], [9, 2, 7, 7], [7, 7, 7, 7]])
    assert completion_mask(generated, eos).tolist() == [[1, 1, 1, 0], [1, 1, 0, 0],
                                                        [1, 1, 1, 1]]
    decode = "".join(map(chr, [0] * 7 + [ord("a"), ord("b"), ord("c")])).__getitem__
    assert decode_completions(generated, eos, lambda ids: "".join(decode(i) for i in ids)) \
        == ["ab", "c", "aaaa"]


# ------------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("name, completion, answer, expected", [
    ("numeric", " 11", "11", 1.0),
    ("numeric", " 11.0 apples", "11", 1.0),
    ("numeric", " it is 11\nQuestion: What is 3 + 4? 7", "11", 1.0),
    ("numeric", " 12", "11", 0.0),
    ("numeric", " eleven", "11", 0.0),
    ("numeric", " -2", "-2", 1.0),
    ("numeric_partial", " 11", "11", 1.0),
    ("numeric_partial", " 12", "11", 1 - 1 / 11),
    ("numeric_partial", " 5", "11", 1 - 6 / 11),
    ("numeric_partial", " 40", "11", 0.0),
    ("numeric_partial", " 1", "0", 0.0),
    ("numeric_partial", " none", "11", 0.0),
    ("exact", " Paris.", "Paris", 1.0),
    ("exact", "\n Paris \nThe capital of Spain", "Paris", 1.0),
    ("exact", " New Delhi", "New Delhi.", 1.0),
    ("exact", " paris", "Paris", 0.0),
    ("exact", " Paris is nice", "Paris", 0.0),
    ("exact", "", "Paris", 0.0),
    ("format", " 7", "11", 1.0),
    ("format", " 11. Next", "11", 1.0),
    ("format", " 11abc", "11", 0.0),
    ("format", " The answer", "11", 0.0),
    ("format", " Berlin", "Paris", 1.0),
    ("format", " berlin", "Paris", 0.0),
    ("format", " 42", "Paris", 0.0),
    ("format", "   ", "Paris", 0.0),
])
def test_builtin_rewards(name: str, completion: str, answer: str, expected: float) -> None:
    value = REWARDS[name]("Question: ...\nAnswer:", completion, {"answer": answer})
    assert value == pytest.approx(expected) and 0.0 <= value <= 1.0


def test_score_means_the_rewards_and_keeps_each() -> None:
    rewards = load_rewards("numeric, format")
    assert [name for name, _ in rewards] == ["numeric", "format"]
    completions = [" 11", " 12", " no", " 3"]
    records = [{"answer": "11"}] * 2 + [{"answer": "3"}] * 2
    total, per_reward = score(rewards, ["p"] * 4, completions, records)
    assert per_reward["numeric"].tolist() == [1, 0, 0, 1]
    assert per_reward["format"].tolist() == [1, 1, 0, 1]
    assert total.dtype == np.float32 and total.tolist() == [1.0, 0.5, 0.0, 1.0]
    metrics = reward_metrics(total, per_reward, group_size=2)
    assert metrics["reward_mean"] == pytest.approx(0.625)
    assert metrics["reward_numeric"] == 0.5 and metrics["reward_format"] == 0.75
    assert metrics["frac_zero_std_groups"] == 0.0


def test_unknown_or_empty_reward_names_list_the_available_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_rewards("numeric,bogus")
    assert "'bogus'" in str(err.value) and "numeric, numeric_partial, exact, format" in \
        str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="--reward is empty"):
        load_rewards(" , ")


def test_a_non_numeric_answer_under_numeric_is_one_training_error() -> None:
    with pytest.raises(TrainingError) as err:
        score(load_rewards("numeric"), ["The capital of France is"], [" Paris"],
              [{"answer": "Paris"}])
    text = str(err.value)
    assert "reward 'numeric'" in text and "'Paris' is not a number" in text
    assert "The capital of France is" in text and "\n" not in text


# ------------------------------------------------------------------------- reward module


def test_a_reward_module_is_added_under_its_file_stem(tmp_path: Path) -> None:
    module = tmp_path / "shorter.py"
    module.write_text("from dataclasses import dataclass\n\n@dataclass\nclass C:\n    n: int\n\n"
                      "def reward(prompt, completion, example):\n"
                      "    return 1.0 / (1 + len(completion))\n")
    rewards = load_rewards("numeric", str(module))
    assert [name for name, _ in rewards] == ["numeric", "shorter"]
    assert [name for name, _ in load_rewards("shorter", str(module))] == ["shorter"]
    total, per_reward = score(rewards, ["p"], ["1"], [{"answer": "1"}])
    assert per_reward["shorter"].tolist() == [0.5] and total.tolist() == [0.75]


@pytest.mark.parametrize("source, message", [
    ("import no_such_module_here\n", "import failed: ModuleNotFoundError"),
    ("raise RuntimeError('bad\\nsecond line')\n", "import failed: RuntimeError: bad"),
    ("def score(prompt, completion, example):\n    return 1.0\n", "defines no function reward"),
    ("reward = 3\n", "defines no function reward"),
])
def test_a_broken_reward_module_is_one_config_error(tmp_path: Path, source: str,
                                                    message: str) -> None:
    module = tmp_path / "mine.py"
    module.write_text(source)
    with pytest.raises(ConfigError) as err:
        load_rewards("numeric", str(module))
    text = str(err.value)
    assert text.startswith(f"--reward-module {module}: ") and message in text
    assert "\n" not in text


def test_missing_or_clashing_reward_module(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_rewards("numeric", str(tmp_path / "absent.py"))
    clash = tmp_path / "exact.py"
    clash.write_text("def reward(p, c, e):\n    return 0.0\n")
    with pytest.raises(ConfigError, match="is a built-in reward"):
        load_rewards("numeric", str(clash))


@pytest.mark.parametrize("body, message", [
    ("    raise KeyError('level')", "failed on prompt {}: KeyError: 'level'"),
    ("    return float('nan')", "returned nan for completion 0 of prompt {}; return a finite "
                              "float within +-3.4e+38 (rewards are float32 in training)"),
    ("    return '1.0'", "returned '1.0' for completion 0 of prompt {}"),
    ("    return None", "returned None for completion 0 of prompt {}"),
    # Finite in Python, inf in the float32 the advantages, loss and metrics use.
    ("    return 1e39", "returned 1e+39 for completion 0 of prompt {}"),
    ("    return -10 ** 400", "for completion 0 of prompt {}"),
])
def test_a_reward_failing_at_scoring_is_one_training_error(tmp_path: Path, body: str,
                                                           message: str) -> None:
    module = tmp_path / "flaky.py"
    module.write_text(f"def reward(prompt, completion, example):\n{body}\n")
    rewards = load_rewards("flaky", str(module))
    prompt = "Question: What is 6 + 5?\nAnswer:" + "x" * 100
    with pytest.raises(TrainingError) as err:
        score(rewards, [prompt], [" 11"], [{"answer": "11"}])
    text = str(err.value)
    assert text.startswith("reward 'flaky' ") and "\n" not in text
    assert message.format(repr(prompt[:60])) in text  # the prompt cut at 60 characters


def test_rewards_near_float32s_limit_keep_a_finite_total() -> None:
    """Two rewards of 3e38 each: finite in float32, but a float32 sum of them is not."""
    big = [("a", lambda p, c, e: 3e38), ("b", lambda p, c, e: 3e38)]
    total, per_reward = score(big, ["p"] * 2, ["c"] * 2, [{}] * 2)
    assert total.dtype == np.float32 and np.all(np.isfinite(total)) and total[0] == np.float32(3e38)
    assert per_reward["a"].dtype == np.float32


# ---------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand() -> None:
    rewards = np.array([0, 1, 1, 0, 1, 1, 1, 1], dtype=np.float32)
    advantages = group_advantages(rewards, 4)
    std = np.sqrt(4 * 0.25 / 3)  # unbiased, as TRL's nanstd
    expected = [-0.5 / (std + 1e-4), 0.5 / (std + 1e-4)] * 2
    assert advantages.dtype == np.float32
    assert advantages[:4].tolist() == pytest.approx([expected[0], expected[1], expected[1],
                                                     expected[0]], rel=1e-6)
    assert advantages[4:].tolist() == [0.0] * 4
    assert frac_zero_std(rewards, 4) == 0.5
    assert frac_zero_std(rewards, 2) == 0.5  # [0,1] [1,0] [1,1] [1,1]
    assert group_advantages(np.array([0.2, 0.7]), 1).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_the_answer_reward_fits_numbers_and_text() -> None:
    from utils.stages.grpo import answer

    assert answer("", " 11", {"answer": "11"}) == 1.0 and answer("", " 12", {"answer": "11"}) == 0
    assert answer("", " Paris.", {"answer": "Paris"}) == 1.0
    assert answer("", " Rome", {"answer": "Paris"}) == 0.0

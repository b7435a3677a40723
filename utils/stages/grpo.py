"""GRPO with verifiable rewards, the framework-neutral half: prompts, rewards, advantages.

* Data: JSONL lines ``{"prompt", "answer"}`` or the SFT question form ``{"question", "answer"}``
  (formatted exactly as the SFT stage formats it, so a model SFT-trained on
  ``data/examples/sft`` sees the prompt text it learned on). Extra fields are kept: the whole
  record goes to every reward function.
* Rewards: a registry of named functions ``reward(prompt, completion, example) -> float``
  (:data:`REWARDS`), plus an optional user module (``--reward-module path.py``).
* Advantages: each completion's reward against the other completions of its prompt's group,
  as TRL's GRPOTrainer computes them.

What happens to a micro-batch (prompt-major order: the G completions of prompt 0, then of
prompt 1, ...); ``utils/stages/step.py`` runs it, the engine only generates::

    batch = task.collate(examples)             # pad_prompts: left-padded prompts + "index"
    generated = engine.generate(batch, sample=True)  # G completions per prompt row
    # rollout(batch, generated), below:
    records = batch_examples(batch, task.examples)
    mask = completion_mask(generated, eos_id)  # tokens up to and including the first EOS
    completions = decode_completions(generated, eos_id, tokenizer.decode)
    prompts, fields = per_completion(records, G)
    total, per_reward = score(rewards, prompts, completions, fields)
    advantages = group_advantages(total, G)    # one per completion; the loss weights by them
    log(reward_metrics(total, per_reward, G))

numpy and the standard library only: both engines use exactly these arrays.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.errors import ConfigError, DataError, TrainingError, first_line
from utils.stages.examples import ENCODE_CHUNK, Encode, format_prompt, read_jsonl, text_field

Reward = Callable[[str, str, dict], float]  # (prompt text, completion text, record) -> reward
Batch = dict[str, np.ndarray]

# TRL's GRPOTrainer adds this to the group std before dividing (trl 1.16.0, grpo_trainer.py).
ADVANTAGE_EPS = 1e-4
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_NUMBER_WORD = re.compile(r"[-+]?\d+(?:\.\d+)?\b")  # a number not glued to letters ("11abc")
_SHOWN = 60  # characters of a prompt quoted in an error
# Rewards become float32 (advantages, the loss, metrics): 1e39 is finite in Python, inf there.
_REWARD_MAX = float(np.finfo(np.float32).max)


@dataclass
class GrpoExample:
    """One prompt to sample completions for, and what the rewards check them against."""

    prompt: str                 # the text the model continues (a question already templated)
    answer: str                 # the verifiable answer, as written in the data
    prompt_ids: np.ndarray      # int32 token ids of ``prompt``, no special tokens
    fields: dict = field(default_factory=dict)  # the whole JSON record, passed to rewards
    index: int = -1             # position in the loaded list: pad_prompts records it per row


# ---------------------------------------------------------------------------------- data


def grpo_prompt(record: dict, where: str) -> tuple[str, str]:
    """(prompt, answer) of a GRPO line; one-line DataError naming ``where`` otherwise.

    ``question`` lines get the SFT stage's question template (``format_prompt``), so the
    prompt's tokens are those the SFT stage trained on. ``prompt`` wins over ``question`` when
    a line has both.
    """
    if "prompt" in record:
        prompt = text_field(record, "prompt", where)
    elif "question" in record:
        prompt = format_prompt(text_field(record, "question", where), "question")
    else:
        found = ", ".join(sorted(record)) or "no keys"
        raise DataError(f"{where}: not a GRPO example: expected 'prompt' + 'answer' or "
                        f"'question' + 'answer', found {found}")
    return prompt, text_field(record, "answer", where)


def load_grpo(files: Sequence[Path], encode: Encode,
              max_prompt_tokens: int) -> list[GrpoExample]:
    """Every prompt of ``files``, validated line by line, then tokenized.

    A prompt longer than ``max_prompt_tokens`` (the caller passes --seq-len minus
    --grpo-max-new-tokens, so prompt and completion fit a sequence) is an error naming its
    line rather than cut from the left: a cut prompt loses its template or its question, and
    the rewards would then score answers to a question the model never saw.
    """
    if max_prompt_tokens < 1:
        raise ConfigError(f"no room for prompts ({max_prompt_tokens} tokens): raise --seq-len "
                          f"above --grpo-max-new-tokens")
    parsed = [(where, record, *grpo_prompt(record, where)) for path in files
              for where, record in read_jsonl(path)]
    if not parsed:
        raise DataError(f"no examples in {', '.join(map(str, files))}; add JSONL lines")
    texts = [prompt for _, _, prompt, _ in parsed]
    ids: list[list[int]] = []
    for start in range(0, len(texts), ENCODE_CHUNK):
        ids += encode(texts[start:start + ENCODE_CHUNK])
    out = []
    for index, ((where, record, prompt, answer), tokens) in enumerate(zip(parsed, ids,
                                                                          strict=True)):
        if len(tokens) > max_prompt_tokens:
            raise DataError(f"{where}: the prompt takes {len(tokens)} tokens, over the "
                            f"{max_prompt_tokens} that leave room for the completion; shorten "
                            f"it or raise --seq-len (prompt + --grpo-max-new-tokens must fit)")
        out.append(GrpoExample(prompt=prompt, answer=answer,
                               prompt_ids=np.asarray(tokens, dtype=np.int32), fields=record,
                               index=index))
    return out


def pad_prompts(examples: Sequence[GrpoExample], pad_id: int) -> Batch:
    """LEFT-padded ``input_ids``/``attention_mask`` (int64), so generation appends on the right.

    ``index`` holds each row's position in the loaded list (``GrpoExample.index``): batches
    must be numeric arrays (both engines turn every value into a tensor, the torch one in
    DataLoader workers), so the rollout finds the records again with :func:`batch_examples`.
    """
    length = max(len(e.prompt_ids) for e in examples)
    input_ids = np.full((len(examples), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), length), dtype=np.int64)
    for i, example in enumerate(examples):
        n = len(example.prompt_ids)
        input_ids[i, length - n:] = example.prompt_ids
        mask[i, length - n:] = 1
    return {"input_ids": input_ids, "attention_mask": mask,
            "index": np.array([e.index for e in examples], dtype=np.int64)}


def batch_examples(batch: Batch, examples: Sequence[GrpoExample]) -> list[GrpoExample]:
    """The examples a collated batch was made of (``examples`` is the Task's list)."""
    return [examples[int(i)] for i in np.asarray(batch["index"]).reshape(-1)]


def prompt_lengths(examples: Sequence[GrpoExample]) -> np.ndarray:
    """Prompt tokens per example: the sampler groups batches of similar lengths."""
    return np.array([len(e.prompt_ids) for e in examples])


def per_completion(examples: Sequence[GrpoExample],
                   group_size: int) -> tuple[list[str], list[dict]]:
    """Prompts and records repeated ``group_size`` times, in prompt-major order for score()."""
    prompts = [e.prompt for e in examples for _ in range(group_size)]
    records = [e.fields for e in examples for _ in range(group_size)]
    return prompts, records


def _first_eos(generated: np.ndarray, eos_id: int) -> np.ndarray:
    """Per row, the position of its first EOS, or its length when it has none."""
    is_eos = generated == eos_id
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), generated.shape[1])


def completion_mask(generated: np.ndarray, eos_id: int) -> np.ndarray:
    """int64 [N, T]: 1 on each row's tokens up to and including its first EOS, 0 after.

    ``generated`` holds the new tokens only. The EOS stays in the loss so the model learns to
    stop; what follows it is padding. As TRL's GRPOTrainer masks completions.
    """
    generated = np.asarray(generated)
    first = _first_eos(generated, eos_id)
    return (np.arange(generated.shape[1])[None, :] <= first[:, None]).astype(np.int64)


def decode_completions(generated: np.ndarray, eos_id: int,
                       decode: Callable[[list[int]], str]) -> list[str]:
    """Each row's completion text: its tokens before the first EOS (``tokenizer.decode``).

    Rewards must see only what the model wrote before stopping: text decoded past the EOS
    (padding, or a continuation) would earn or lose rewards the model did not choose.
    """
    generated = np.asarray(generated)
    first = _first_eos(generated, eos_id)
    return [decode([int(t) for t in row[:n]]) for row, n in zip(generated, first, strict=True)]


# ------------------------------------------------------------------------------- rewards


def _first_number(text: str) -> float | None:
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


def _answer_number(answer: str) -> float:
    """The answer as a number; ValueError (score() makes it one line) if it is not one."""
    text = answer.strip()
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"answer {answer!r} is not a number; use a text reward such as 'exact'")
    return float(text)


def numeric(prompt: str, completion: str, example: dict) -> float:
    """1.0 if the completion's first number equals the answer numerically ("11.0" == "11")."""
    target = _answer_number(example["answer"])
    value = _first_number(completion)
    return float(value is not None and math.isclose(value, target, rel_tol=1e-9, abs_tol=1e-9))


def numeric_partial(prompt: str, completion: str, example: dict) -> float:
    """Credit for being close: 1 - min(1, |x - answer| / max(1, |answer|)), 0 without a number.

    A tiny model rarely hits a sum exactly at first; with 0/1 rewards most groups are all-zero
    and teach nothing. Here 12 for 11 earns 0.91 and 5 earns 0.45, so nearer answers win
    within a group.
    """
    target = _answer_number(example["answer"])
    value = _first_number(completion)
    if value is None:
        return 0.0
    return 1.0 - min(1.0, abs(value - target) / max(1.0, abs(target)))


def _line(text: str) -> str:
    """First non-blank line, stripped, trailing full stops dropped ("Paris." == "Paris")."""
    stripped = text.strip()
    return stripped.splitlines()[0].strip().rstrip(".").rstrip() if stripped else ""


def exact(prompt: str, completion: str, example: dict) -> float:
    """1.0 if the completion's first line equals the answer (stripped, case-sensitive).

    Trailing full stops are ignored on both sides, since the SFT capitals data ends its
    answers with one (" Paris."). Text after the answer on the same line fails: a model that
    does not stop does not earn it.
    """
    return float(_line(completion) == _line(example["answer"]))


def answer_format(prompt: str, completion: str, example: dict) -> float:
    """1.0 if the completion starts (after whitespace) with an answer of the expected form.

    Numeric answers: a number not glued to letters ("11", "-3.5", "11." but not "11abc").
    Other answers: a capitalised word (first character an upper-case letter). A shaping
    reward: it pays for answering in the right shape, right or wrong.
    """
    text = completion.lstrip()
    if _NUMBER.fullmatch(example["answer"].strip()):
        return float(_NUMBER_WORD.match(text) is not None)
    return float(bool(text) and text[0].isalpha() and text[0].isupper())


def answer(prompt: str, completion: str, example: dict) -> float:
    """``numeric`` where the answer is a number, ``exact`` otherwise: one reward that fits
    every topic of a curriculum (sums and capitals alike)."""
    is_number = _NUMBER.fullmatch(example["answer"].strip()) is not None
    return (numeric if is_number else exact)(prompt, completion, example)


REWARDS: dict[str, Reward] = {
    "answer": answer,
    "numeric": numeric,
    "numeric_partial": numeric_partial,
    "exact": exact,
    "format": answer_format,
}


def load_rewards(names: str, module_path: str = "") -> list[tuple[str, Reward]]:
    """The rewards ``--reward`` names (comma-separated), in order, plus ``--reward-module``'s.

    The module is Python code the user trusts: it is imported and run as is. It must define
    ``reward(prompt, completion, example) -> float`` and is registered under its file stem
    (``my_reward.py`` -> ``my_reward``). It is always used: appended after the named rewards
    unless ``--reward`` names it (to use it alone: ``--reward my_reward``).
    """
    available = dict(REWARDS)
    custom = _load_module(Path(module_path)) if module_path else None
    if custom is not None:
        available[custom[0]] = custom[1]
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    if not wanted and custom is None:
        raise ConfigError(f"--reward is empty; name one or more of {', '.join(available)}")
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise ConfigError(f"unknown reward {', '.join(map(repr, unknown))}; available: "
                          f"{', '.join(available)} (or --reward-module path.py)")
    chosen = list(dict.fromkeys(wanted))  # a name given twice counts once
    if custom is not None and custom[0] not in chosen:
        chosen.append(custom[0])
    return [(name, available[name]) for name in chosen]


def _load_module(path: Path) -> tuple[str, Reward]:
    """(file stem, its ``reward`` function); ConfigError naming the file on any failure."""
    name = path.stem
    if name in REWARDS:
        raise ConfigError(f"--reward-module {path}: its name {name!r} is a built-in reward; "
                          f"rename the file")
    if not path.is_file():
        raise ConfigError(f"--reward-module {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"grpo_reward_{name}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--reward-module {path}: not a Python file; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up there
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - any failure of user code becomes one line
        del sys.modules[spec.name]
        raise ConfigError(f"--reward-module {path}: import failed: {type(err).__name__}: "
                          f"{first_line(err)}") from None
    reward = getattr(module, "reward", None)
    if not callable(reward):
        raise ConfigError(f"--reward-module {path}: defines no function "
                          f"reward(prompt, completion, example) -> float; add one")
    return name, reward


def score(rewards: Sequence[tuple[str, Reward]], prompts: Sequence[str],
          completions: Sequence[str],
          records: Sequence[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total reward per completion, each reward's values), float32.

    The total is the MEAN of the rewards (TRL sums them, unweighted by default): the built-ins
    then stay in [0, 1] in the logs, and the group-normalised advantages are the same either
    way (up to the 1e-4 added to the std). A reward that raises or returns anything but a
    number finite in float32 (the dtype training uses: 1e39 is inf there) stops the run with a
    TrainingError naming the reward, the completion's index and its prompt.
    """
    if not rewards:
        raise ValueError("score() needs at least one reward")
    if not len(prompts) == len(completions) == len(records):
        raise ValueError(f"score(): {len(prompts)} prompts, {len(completions)} completions, "
                         f"{len(records)} records; give one of each per completion")
    per_reward: dict[str, np.ndarray] = {}
    for name, fn in rewards:
        values = np.empty(len(completions), dtype=np.float64)
        for i, (prompt, completion, record) in enumerate(zip(prompts, completions, records,
                                                             strict=True)):
            shown = prompt[:_SHOWN]
            try:
                value = fn(prompt, completion, record)
            except Exception as err:  # noqa: BLE001 - any failure of a reward becomes one line
                raise TrainingError(f"reward {name!r} failed on prompt {shown!r}: "
                                    f"{type(err).__name__}: {first_line(err)}") from None
            checked = _float32_reward(value)
            if checked is None:
                raise TrainingError(f"reward {name!r} returned {_short(value)} for completion "
                                    f"{i} of prompt {shown!r}; return a finite float within "
                                    f"+-{_REWARD_MAX:.3g} (rewards are float32 in training)")
            values[i] = checked
        per_reward[name] = values
    # The mean in float64: a float32 sum of in-range rewards can itself overflow.
    total = np.mean(np.stack([per_reward[name] for name, _ in rewards]), axis=0)
    return total.astype(np.float32), {k: v.astype(np.float32) for k, v in per_reward.items()}


def _float32_reward(value: object) -> float | None:
    """``value`` as a float if it is a real number (not a bool) that float32 holds finitely;
    None otherwise (nan, inf, 1e39, an int of 400 digits, a string, an array)."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value)
    except (OverflowError, ValueError):
        return None
    return number if abs(number) <= _REWARD_MAX else None


def _short(value: object) -> str:
    """A value's repr on one line, at most _SHOWN characters (a returned array, a long text)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


# ---------------------------------------------------------------------------- advantages


def _groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """[num_prompts, group_size] view of prompt-major rewards; ValueError if they do not tile."""
    values = np.asarray(rewards, dtype=np.float64)
    if group_size < 1 or values.ndim != 1 or len(values) % group_size:
        raise ValueError(f"{values.shape} rewards do not make groups of {group_size}")
    return values.reshape(-1, group_size)


def _group_std(grouped: np.ndarray) -> np.ndarray:
    """Unbiased (Bessel) std per group, as TRL's ``nanstd``; 0 for groups of one, as TRL."""
    if grouped.shape[1] < 2:
        return np.zeros((len(grouped), 1))
    return grouped.std(axis=1, ddof=1, keepdims=True)


def group_advantages(rewards: np.ndarray, group_size: int,
                     eps: float = ADVANTAGE_EPS) -> np.ndarray:
    """(r - group mean) / (group std + eps) per completion, float32, in the rewards' order.

    Groups are consecutive: the ``group_size`` completions of prompt 0, then of prompt 1, ...
    This is TRL's GRPOTrainer default (trl 1.16.0, ``_generate_and_score_completions`` with
    ``scale_rewards="group"``, ``multi_objective_aggregation="sum_then_normalize"``): the std
    is unbiased (``nanstd`` applies Bessel's correction) and ``eps`` is 1e-4. A group whose
    rewards are all equal gets zero advantages: nothing in it is better than the rest.
    """
    grouped = _groups(rewards, group_size)
    advantages = (grouped - grouped.mean(axis=1, keepdims=True)) / (_group_std(grouped) + eps)
    return advantages.reshape(-1).astype(np.float32)


def frac_zero_std(rewards: np.ndarray, group_size: int) -> float:
    """The fraction of groups whose rewards are all equal (TRL's ``frac_reward_zero_std``).

    Those groups teach nothing (zero advantages); near 1.0 means the task is too hard (all
    wrong) or already learnt (all right) for the current model and rewards.
    """
    std = _group_std(_groups(rewards, group_size))
    return float(np.isclose(std, 0.0).mean())


def reward_metrics(total: np.ndarray, per_reward: dict[str, np.ndarray],
                   group_size: int) -> dict[str, float]:
    """What both engines log per batch: the total's mean and std, the share of groups that
    teach nothing (all rewards equal), and each reward's mean (``reward_<name>``)."""
    values = np.asarray(total, dtype=np.float64)
    out = {"reward_mean": float(values.mean()),
           "reward_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
           "frac_zero_std_groups": frac_zero_std(values, group_size)}
    out.update({f"reward_{name}": float(np.mean(v)) for name, v in per_reward.items()})
    return out


@dataclass(frozen=True)
class Sampling:
    """How completions are sampled (both engines read it; the rollout's pad and EOS too)."""

    group_size: int
    temperature: float
    max_new_tokens: int
    eos_id: int
    pad_id: int


def rollout(batch: Batch, generated: np.ndarray, *, examples: Sequence[GrpoExample],
            rewards: Sequence[tuple[str, Reward]], decode: Callable[[list[int]], str],
            sampling: Sampling) -> tuple[Batch, dict[str, float]]:
    """A prompt batch and its generated completions -> the batch the GRPO loss trains on, and
    the statistics to log.

    ``generated`` holds the new tokens, ``len(batch) * G`` rows in prompt-major order (G = 1:
    greedy evaluation). The training batch is each prompt (left-padded) followed by its
    completion (right-padded with the pad id after the first EOS): ``input_ids``,
    ``attention_mask``, ``completion_mask`` (the completion's tokens up to and including
    its EOS: the tokens the loss counts) and one ``advantages`` value per row.
    """
    generated = np.asarray(generated, dtype=np.int64)
    group = len(generated) // len(batch["input_ids"])
    mask = completion_mask(generated, sampling.eos_id)
    prompts, fields = per_completion(batch_examples(batch, examples), group)
    total, per_reward = score(rewards, prompts,
                              decode_completions(generated, sampling.eos_id, decode), fields)
    prompt_mask = np.repeat(batch["attention_mask"], group, axis=0)
    train = {
        "input_ids": np.concatenate([np.repeat(batch["input_ids"], group, axis=0),
                                     np.where(mask == 1, generated, sampling.pad_id)], axis=1),
        "attention_mask": np.concatenate([prompt_mask, mask], axis=1),
        "completion_mask": np.concatenate([np.zeros_like(prompt_mask), mask], axis=1),
        "advantages": group_advantages(total, group),
    }
    stats = {**reward_metrics(total, per_reward, group),
             "completion_len": float(mask.sum(axis=1).mean())}
    return train, stats

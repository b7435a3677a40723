"""Downstream tasks as data, scored by log-likelihood the way lm-evaluation-harness does.

A task is a JSONL file, one example per line, of one of two kinds:

* multiple choice (HellaSwag, ARC, PIQA style):
  ``{"context": "...", "choices": ["...", "..."], "gold": 0}``
* cloze / last word (LAMBADA style): ``{"context": "...", "target": "..."}``

Either may set ``"delimiter"`` (default ``" "``, lm-eval's ``target_delimiter``): the text
scored is ``delimiter + choice`` after ``context``. A multiple-choice example reports ``acc``
(the choice of highest summed log-probability is the gold one) and ``acc_norm`` (the same
after dividing each choice's log-probability by its length in characters, delimiter
excluded: lm-eval's ``acc_norm``); a cloze example reports ``acc`` (every target token is
the model's greedy choice) and ``ppl`` (``exp`` of minus the mean per-example log-likelihood
of the target: lm-eval's ``perplexity`` for LAMBADA).

Everything here is framework-neutral: files -> examples -> token requests (lm-eval's
context/continuation split and left truncation) -> padded numpy batches, and the engines'
per-row scores -> metrics. An engine only runs the forward pass (``Engine.score``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.errors import ConfigError, DataError
from utils.stages.examples import read_jsonl, text_field

TASKS_DIR = Path(__file__).resolve().parents[2] / "data" / "eval_tasks"
CHOICE, CLOZE = "multiple_choice", "cloze"
METRICS = {CHOICE: ("acc", "acc_norm"), CLOZE: ("acc", "ppl")}

RowScore = tuple[float, bool, int]  # (summed log-prob of the continuation, all greedy, tokens)
Score = Callable[[dict[str, np.ndarray]], list[RowScore]]  # an engine's forward, one batch


@dataclass(frozen=True)
class Example:
    where: str                 # file:line, for errors
    context: str
    choices: tuple[str, ...]   # cloze: (target,)
    gold: int                  # cloze: 0
    delimiter: str = " "


@dataclass
class DownstreamTask:
    name: str      # the file's stem: metrics are eval/<name>/<metric>
    kind: str      # CHOICE or CLOZE
    examples: list[Example]

    @property
    def rows(self) -> int:
        """Forward rows (sequences) one evaluation of the task scores."""
        return sum(len(e.choices) for e in self.examples)


@dataclass(frozen=True)
class Request:
    example: int       # index into the task's examples
    choice: int
    tokens: np.ndarray  # context + continuation ids, left-truncated to max_len + 1
    n_target: int       # the last n_target tokens are the continuation (scored)


# ------------------------------------------------------------------ files


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.jsonl"))


def task_files(spec: str) -> list[Path]:
    """``--eval-tasks``: comma-separated shipped names (data/eval_tasks/NAME.jsonl) or paths."""
    files: list[Path] = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        path = Path(item)
        if item.endswith(".jsonl") or "/" in item or path.is_file():
            if not path.is_file():
                raise ConfigError(f"--eval-tasks {item!r}: no such file; give a .jsonl task "
                                  f"file or a shipped task ({', '.join(shipped_tasks())})")
        else:
            path = TASKS_DIR / f"{item}.jsonl"
            if not path.is_file():
                raise ConfigError(f"--eval-tasks {item!r}: no shipped task of that name; "
                                  f"choose from {', '.join(shipped_tasks())} or give a "
                                  f".jsonl path")
        if any(f.stem == path.stem for f in files):
            raise ConfigError(f"--eval-tasks: two tasks named {path.stem!r} (metrics are "
                              f"keyed by the file name); rename one")
        files.append(path)
    return files


def parse_example(record: dict, where: str) -> tuple[str, Example]:
    """(kind, example) of one line; a DataError naming the line for anything malformed."""
    context = text_field(record, "context", where, allow_empty=True)
    delimiter = record.get("delimiter", " ")
    if not isinstance(delimiter, str):
        raise DataError(f"{where}: 'delimiter' must be a string, got {type(delimiter).__name__}")
    if "choices" in record:
        choices, gold = record["choices"], record.get("gold")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c for c in choices)):
            raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty "
                            f"strings")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise DataError(f"{where}: 'gold' must be the index (0 to {len(choices) - 1}) of "
                            f"the right choice, got {gold!r}")
        return CHOICE, Example(where, context, tuple(choices), gold, delimiter)
    if "target" in record:
        return CLOZE, Example(where, context, (text_field(record, "target", where),), 0,
                              delimiter)
    raise DataError(f"{where}: not a task example: expected 'context' with 'choices' + 'gold' "
                    f"(multiple choice) or 'target' (cloze), found "
                    f"{', '.join(sorted(record)) or 'no keys'}")


def load_task(path: Path, limit: int = 0) -> DownstreamTask:
    """The task in ``path``: its first ``limit`` examples (0 = all), one kind per file."""
    kind, examples = "", []
    for where, record in read_jsonl(path):
        line_kind, example = parse_example(record, where)
        if kind and line_kind != kind:
            raise DataError(f"{where}: a {line_kind.replace('_', ' ')} example in a "
                            f"{kind.replace('_', ' ')} task; one kind per file")
        kind = line_kind
        examples.append(example)
        if limit and len(examples) == limit:
            break
    if not examples:
        raise DataError(f"{path}: no examples; add JSONL lines (see data/eval_tasks/)")
    return DownstreamTask(path.stem, kind, examples)


# ------------------------------------------------------------------ requests


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                prefix_id: int) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing whitespace of the context moves to the continuation, the
    whole text is encoded once and the continuation is what follows the context's tokens;
    an empty context becomes ``prefix_id`` (BOS, else EOS)."""
    if not context:
        return [prefix_id], encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = encode(context + continuation), encode(context)
    return head, whole[len(head):]


def build_requests(task: DownstreamTask, encode: Callable[[str], list[int]], prefix_id: int,
                   max_len: int) -> list[Request]:
    """One request per (example, choice): tokens cut from the left to ``max_len + 1`` (the
    model sees at most ``max_len``), as lm-eval truncates."""
    requests = []
    for i, example in enumerate(task.examples):
        for j, choice in enumerate(example.choices):
            context, target = encode_pair(encode, example.context, example.delimiter + choice,
                                          prefix_id)
            if not target:
                raise DataError(f"{example.where}: choice {j} encodes to no tokens")
            tokens = np.array((context + target)[-(max_len + 1):], dtype=np.int64)
            requests.append(Request(i, j, tokens, min(len(target), len(tokens) - 1)))
    return requests


def pad_requests(requests: Sequence[Request], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded rows for one forward pass: ``input_ids`` (B, T), and the scored positions
    as flat index arrays (``rows``, ``cols``: position cols predicts ``targets``), so an engine
    takes log-probabilities only where they count."""
    width = max(len(r.tokens) for r in requests) - 1
    input_ids = np.full((len(requests), width), pad_id, dtype=np.int64)
    rows, cols, targets = [], [], []
    for i, request in enumerate(requests):
        length = len(request.tokens) - 1
        input_ids[i, :length] = request.tokens[:-1]
        positions = np.arange(length - request.n_target, length)
        rows.append(np.full(len(positions), i))
        cols.append(positions)
        targets.append(request.tokens[positions + 1])
    return {"input_ids": input_ids, "rows": np.concatenate(rows).astype(np.int64),
            "cols": np.concatenate(cols).astype(np.int64),
            "targets": np.concatenate(targets).astype(np.int64)}


def plan_batches(requests: Sequence[Request], world: int,
                 token_budget: int) -> list[list[list[int]]]:
    """Per process, its batches (request indices): examples dealt round-robin (a process
    scores whole examples), longest rows first, at most ``token_budget`` padded tokens a
    batch. Every process gets as many batches as the busiest (repeats, whose scores are
    dropped): under FSDP each forward gathers the weights from all processes."""
    plans = []
    for rank in range(world):
        mine = sorted((i for i, r in enumerate(requests) if r.example % world == rank),
                      key=lambda i: -len(requests[i].tokens))
        batches: list[list[int]] = []
        for i in mine:  # a batch's first row is its longest: it sets the padded width
            if batches and (len(batches[-1]) + 1) * (len(requests[batches[-1][0]].tokens)
                                                     - 1) <= token_budget:
                batches[-1].append(i)
            else:
                batches.append([i])
        plans.append(batches)
    return plans


def run_requests(requests: Sequence[Request], score: Score, pad_id: int, rank: int, world: int,
                 token_budget: int) -> dict[int, RowScore]:
    """This process's share of the requests scored: request index -> its row score."""
    plans = plan_batches(requests, world, token_budget)
    mine, most = plans[rank], max(len(p) for p in plans)
    filler = [0]  # a process with fewer batches repeats a small one, scores dropped
    results: dict[int, RowScore] = {}
    for k in range(most):
        batch = mine[k] if k < len(mine) else filler
        scores = score(pad_requests([requests[i] for i in batch], pad_id))
        if k < len(mine):
            results.update(zip(batch, scores, strict=True))
    return results


# ------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class ExampleResult:
    lls: tuple[float, ...]   # per choice (cloze: the target's)
    greedy: tuple[bool, ...]
    tokens: int              # cloze: the target's tokens
    pred: int                # argmax of lls (the first on ties, as numpy)
    pred_norm: int           # argmax of lls / len(choice) in characters
    correct: bool            # MC: pred == gold; cloze: the target is the greedy continuation
    correct_norm: bool


def example_results(task: DownstreamTask, requests: Sequence[Request],
                    results: dict[int, RowScore]) -> dict[int, ExampleResult]:
    """Per example scored here (example index -> result), lm-eval's rules."""
    by_example: dict[int, list[tuple[int, RowScore]]] = {}
    for i, score in results.items():
        by_example.setdefault(requests[i].example, []).append((requests[i].choice, score))
    out = {}
    for index, scored in by_example.items():
        scored.sort()
        example = task.examples[index]
        lls = np.array([s[1][0] for s in scored])
        lengths = np.array([float(len(c)) for c in example.choices])
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lengths))
        greedy = tuple(bool(s[1][1]) for s in scored)
        correct = greedy[0] if task.kind == CLOZE else pred == example.gold
        out[index] = ExampleResult(tuple(lls.tolist()), greedy, sum(s[1][2] for s in scored),
                                   pred, pred_norm, correct,
                                   correct if task.kind == CLOZE else pred_norm == example.gold)
    return out


def local_sums(task: DownstreamTask, results: dict[int, ExampleResult]) -> list[float]:
    """This process's share as sums the processes add up: [examples, acc, acc_norm, ll]."""
    values = results.values()
    return [float(len(results)), float(sum(r.correct for r in values)),
            float(sum(r.correct_norm for r in values)), float(sum(r.lls[0] for r in values))]


def task_metrics(task: DownstreamTask, sums: Sequence[float]) -> dict[str, float]:
    """``eval/<task>/<metric>`` from the summed ``local_sums`` of every process."""
    n, correct, correct_norm, ll = sums
    n = max(n, 1.0)
    values = {"acc": correct / n}
    if task.kind == CHOICE:
        values["acc_norm"] = correct_norm / n
    else:
        values["ppl"] = math.exp(min(-ll / n, 700.0))  # exp overflows past ~709
    return {f"eval/{task.name}/{key}": value for key, value in values.items()}


def evaluate_task(task: DownstreamTask, requests: Sequence[Request], score: Score,
                  all_sum: Callable[[list[float]], list[float]], pad_id: int, rank: int,
                  world: int, token_budget: int) -> dict[str, float]:
    """Score this process's share, add up every process's sums, return the task's metrics
    (the same on every process, whatever the number of processes)."""
    results = run_requests(requests, score, pad_id, rank, world, token_budget)
    return task_metrics(task, all_sum(local_sums(task, example_results(task, requests,
                                                                       results))))


def cost_line(tasks: Sequence[DownstreamTask], requests: Sequence[Sequence[Request]]) -> str:
    """What one evaluation costs: forward rows (tasks x examples x choices) and tokens."""
    parts = [f"{t.name} ({len(t.examples)} x {t.rows / len(t.examples):g})" for t in tasks]
    tokens = sum(len(r.tokens) - 1 for rs in requests for r in rs)
    return (f"{', '.join(parts)}: {sum(t.rows for t in tasks):,} rows, {tokens:,} tokens "
            f"forward per evaluation (examples x choices), shared by the processes")

"""Build the shipped downstream tasks (``data/eval_tasks/*.jsonl``) from data this repo has.

    python -m data.eval_tasks.build            # rewrites the five files, deterministically

* ``python-lines`` (multiple choice, HellaSwag style): a few lines of Python code, then which
  of 4 lines comes next: the real one, or a line from another file.
* ``python-syntax`` (multiple choice, BLiMP style): a line or two of Python code, then the
  real next line among 3 reorderings of its own words (the easiest: it rises first).
* ``python-cloze`` (LAMBADA style): Python code up to an identifier that already appeared in
  it; the target is that identifier (copying it back needs the context).
* ``arithmetic`` (multiple choice): ``Question: What is a + b?\\nAnswer:`` with the sum and 3
  near misses, for the a + b (digits) that no shipped SFT/DPO/GRPO file asks.
* ``capitals`` (multiple choice): ``The capital of X is`` and 4 capitals, from
  ``data/examples/topics/02-capitals`` (the very facts the SFT examples teach).

The Python tasks come from the standard library files the bundled sample leaves out:
``data.prepare`` takes the first 4 MB (its default ``--max-mb``, the smoke preset's data) in
path order; these come from after that point, so the smoke model never trained on them (the
test fixtures' 1 MB samples neither). Another Python version ships other files: rebuild here.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from data.prepare import MB, stdlib_files

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
SAMPLE_MB = 4.0  # data.prepare's default --max-mb: what the smoke preset trains on
SKIP = {"test", "tests", "idlelib", "lib2to3", "encodings", "turtledemo", "pydoc_data",
        "ensurepip", "unittest"}
CONTEXT_CHARS = 240  # at most this much code before the scored text
SYNTAX_CONTEXT_CHARS = 120
PYTHON_EXAMPLES = 250
IDENT = re.compile(r"(?<= )[A-Za-z_][A-Za-z0-9_]{2,}\b")


def held_out_sources() -> list[str]:
    """Texts of the stdlib files after the sample's 4 MB, minus tests and data tables."""
    sample = len(stdlib_files(int(SAMPLE_MB * MB))[0])
    everything, _ = stdlib_files(10**12)
    root = Path(everything[0]).parent
    kept = [p for p in everything[sample:] if not SKIP & set(p.relative_to(root).parts)]
    return [p.read_text(encoding="utf-8", errors="replace") for p in kept]


def _code_line(line: str) -> bool:
    body = line.strip()
    return 12 <= len(body) <= 70 and not body.startswith(("#", '"', "'")) and body.isascii()


def _context(lines: list[str], end: int, chars: int = 0) -> str | None:
    """Whole lines before ``end``, at most ``chars`` (CONTEXT_CHARS), at least 2 of them."""
    picked: list[str] = []
    for line in reversed(lines[max(0, end - 40):end]):
        if sum(len(x) + 1 for x in picked) + len(line) + 1 > (chars or CONTEXT_CHARS):
            break
        picked.insert(0, line)
    return "\n".join(picked) + "\n" if len(picked) >= 2 else None


def python_lines(sources: list[str], rng: random.Random) -> list[dict]:
    """Context, then the real next line among 3 lines of other files (delimiter "")."""
    pool = [(k, line.rstrip()) for k, text in enumerate(sources)
            for line in text.splitlines() if _code_line(line)]
    out: list[dict] = []
    while len(out) < PYTHON_EXAMPLES:
        k = rng.randrange(len(sources))
        lines = sources[k].splitlines()
        if len(lines) < 10:
            continue
        end = rng.randrange(5, len(lines))
        context = _context(lines, end)
        if context is None or not _code_line(lines[end]):
            continue
        gold = lines[end].rstrip()
        others = list(dict.fromkeys(line for j, line in rng.sample(pool, 12)
                                    if j != k and line != gold))[:3]
        choices = [gold, *others]
        rng.shuffle(choices)
        out.append({"context": context, "choices": choices, "gold": choices.index(gold),
                    "delimiter": ""})
    return out


def _shuffles(line: str, rng: random.Random, n: int) -> list[str] | None:
    """``n`` distinct reorderings of the line's space-separated words (indentation kept)."""
    indent, words = line[:len(line) - len(line.lstrip())], line.split()
    found: set[str] = set()
    for _ in range(50):
        if len(found) == n:
            return sorted(found)
        order = rng.sample(words, len(words))
        if order != words:
            found.add(indent + " ".join(order))
    return None


def python_syntax(sources: list[str], rng: random.Random) -> list[dict]:
    """Context, then the real next line among 3 reorderings of its own words (BLiMP-style
    minimal pairs: same characters, same length; only the order says which is Python)."""
    out: list[dict] = []
    while len(out) < PYTHON_EXAMPLES:
        lines = sources[rng.randrange(len(sources))].splitlines()
        if len(lines) < 10:
            continue
        end = rng.randrange(5, len(lines))
        gold = lines[end].rstrip()
        context = _context(lines, end, SYNTAX_CONTEXT_CHARS)
        if context is None or not _code_line(gold) or len(gold.split()) < 4:
            continue
        others = _shuffles(gold, rng, 3)
        if others is None:
            continue
        choices = [gold, *others]
        rng.shuffle(choices)
        out.append({"context": context, "choices": choices, "gold": choices.index(gold),
                    "delimiter": ""})
    return out


def python_cloze(sources: list[str], rng: random.Random) -> list[dict]:
    """Code up to (not including) ' NAME', where NAME occurred earlier: the target."""
    out: list[dict] = []
    while len(out) < PYTHON_EXAMPLES:
        text = sources[rng.randrange(len(sources))]
        if len(text) < 2 * CONTEXT_CHARS:
            continue
        cut = rng.randrange(CONTEXT_CHARS, len(text) - 40)
        match = IDENT.search(text, cut, cut + 200)
        if match is None:
            continue
        start = match.start()
        context = text[max(0, start - CONTEXT_CHARS):start - 1]  # the space is the delimiter
        name = match.group()
        if re.search(rf"\b{name}\b", context) and context.isascii() and "\n" in context:
            out.append({"context": context, "target": name})
    return out


def _examples(topic: str, kind: str) -> list[dict]:
    path = EXAMPLES / "topics" / topic / f"{kind}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def arithmetic(rng: random.Random) -> list[dict]:
    """The digit sums no shipped SFT/DPO/GRPO file asks about, 4 choices each."""
    asked = set(re.findall(r"What is (\d) \+ (\d)\?", "".join(
        p.read_text() for p in EXAMPLES.rglob("*.jsonl"))))
    out = []
    for a in range(10):
        for b in range(10):
            if (str(a), str(b)) in asked:
                continue
            total = a + b
            wrong = rng.sample([n for n in range(max(0, total - 4), total + 5) if n != total], 3)
            choices = [str(n) for n in [total, *wrong]]
            rng.shuffle(choices)
            out.append({"context": f"Question: What is {a} + {b}?\nAnswer:",
                        "choices": choices, "gold": choices.index(str(total))})
    rng.shuffle(out)
    return out


def capitals(rng: random.Random) -> list[dict]:
    """Each ``The capital of X is`` with its capital and 3 others."""
    facts = [(e["prompt"], e["completion"].strip()) for e in _examples("02-capitals", "sft")]
    names = sorted({capital for _, capital in facts})
    out = []
    for prompt, capital in facts:
        choices = [capital, *rng.sample([n for n in names if n != capital], 3)]
        rng.shuffle(choices)
        out.append({"context": prompt, "choices": choices, "gold": choices.index(capital)})
    return out


def write(name: str, records: list[dict]) -> None:
    with (HERE / f"{name}.jsonl").open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"{HERE / name}.jsonl: {len(records)} examples")


def main() -> None:
    sources = held_out_sources()
    write("python-lines", python_lines(sources, random.Random(1)))
    write("python-cloze", python_cloze(sources, random.Random(2)))
    write("python-syntax", python_syntax(sources, random.Random(5)))
    write("arithmetic", arithmetic(random.Random(3)))
    write("capitals", capitals(random.Random(4)))


if __name__ == "__main__":
    main()

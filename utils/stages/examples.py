"""SFT and DPO examples: JSONL formats, validation, tokenizing, answer-only labels, padding.

* SFT: JSONL lines ``{"messages": [{"role", "content"}, ...]}``, ``{"prompt", "completion"}``
  or ``{"question", "answer"}``.
* DPO: JSONL lines ``{"prompt", "chosen", "rejected"}``.

Every example becomes ``input_ids`` plus ``labels`` that are -100 on prompt tokens, so the loss
covers only answer tokens (and the EOS that ends each answer: the model learns to stop).
Batches are right-padded: labels -100 and attention_mask 0 on padding. Plain Python + numpy:
both engines train on exactly these arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from utils.errors import DataError, json_object

IGNORE = -100  # label of a token that is not trained on (prompt, padding)
# How prompts are written around the user's text; generate.py uses the same templates.
TEMPLATES = {"raw": "{}", "question": "Question: {}\nAnswer:", "chat": "User: {}\nAssistant:"}
_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
ENCODE_CHUNK = 1024  # texts per tokenizer call
# Longest JSONL line read (bytes, newline excluded): an example is a few KB of text and a
# sequence at most a few thousand tokens; a longer line is a broken file (a whole corpus
# on one line), refused before it is held in memory whole.
MAX_LINE_BYTES = 1 << 20

Segment = tuple[str, bool]  # (text, is_answer)
Encode = Callable[[list[str]], list[list[int]]]  # a batch of texts -> token ids, no specials
Example = dict[str, np.ndarray]


def format_prompt(text: str, template: str = "raw") -> str:
    """The prompt the model was fine-tuned on for ``text`` (``question``/``chat`` data)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template].format(text)


def data_files(data_dir: str | Path) -> list[Path]:
    """A .jsonl file, or every .jsonl file directly in a folder (sorted: a stable order)."""
    path = Path(data_dir)
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else []
    if not files:
        raise DataError(f"no .jsonl files at {path}: point --data-dir at a .jsonl file or a "
                        f"folder of them (see data/examples/)")
    return files


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, record) for every non-blank line; one-line errors name file and line.

    Nothing a line holds escapes as a traceback: a line over :data:`MAX_LINE_BYTES`, bytes
    that are not UTF-8, and every decoder failure (malformed JSON, an integer of thousands
    of digits, arrays nested a hundred thousand deep) are DataErrors naming the line.
    """
    with path.open("rb") as f:
        # Room for the longest line and its "\r\n": no line ending is split off a line.
        lines = iter(partial(f.readline, MAX_LINE_BYTES + 2), b"")
        for number, raw in enumerate(lines, 1):
            where = f"{path}:{number}"
            if len(raw.rstrip(b"\r\n")) > MAX_LINE_BYTES:
                raise DataError(f"{where}: line longer than {MAX_LINE_BYTES:,} bytes; write one "
                                f"example per line (a long line is usually a file without "
                                f"line breaks)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start} of "
                                f"the line); save it as UTF-8") from None
            if line.strip():
                yield where, json_object(line, where, "write one JSON object per line")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def text_field(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in record:
        found = ", ".join(sorted(record)) or "no keys"
        raise DataError(f"{where}: missing key {key!r} (found {found}); add it")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {_kind(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: {key!r} is empty; give it text or remove the line")
    return value


def sft_segments(record: dict, where: str) -> list[Segment]:
    """The example as prompt and answer pieces, whichever of the three SFT formats it uses."""
    if "messages" in record:
        return _chat_segments(record["messages"], where)
    if "prompt" in record or "completion" in record:
        return [(text_field(record, "prompt", where, allow_empty=True), False),
                (text_field(record, "completion", where), True)]
    if "question" in record or "answer" in record:
        return [(format_prompt(text_field(record, "question", where), "question"), False),
                (" " + text_field(record, "answer", where), True)]
    raise DataError(f"{where}: not an SFT example: expected 'messages', 'prompt' + 'completion' "
                    f"or 'question' + 'answer', found {', '.join(sorted(record)) or 'no keys'}")


def _chat_segments(messages: Any, where: str) -> list[Segment]:
    """System/user turns are prompt; every assistant turn is an answer (trained)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        f"{{\"role\", \"content\"}} objects, got {_kind(messages)}")
    segments: list[Segment] = []
    for i, message in enumerate(messages):
        here = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{here} must be an object with 'role' and 'content', "
                            f"got {_kind(message)}")
        role = message.get("role")
        if role not in _ROLES:
            raise DataError(f"{here}: role must be one of {', '.join(_ROLES)}, got {role!r}")
        content = text_field(message, "content", here)
        if role == "assistant":
            segments += [("Assistant:", False), (" " + content, True)]
        else:
            segments.append((f"{_ROLES[role]}: {content}\n", False))
    if not any(answer for _, answer in segments):
        raise DataError(f"{where}: no 'assistant' message, so nothing to train on; add one")
    return segments


def dpo_triple(record: dict, where: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected); the answers must be non-empty strings."""
    return (text_field(record, "prompt", where, allow_empty=True),
            text_field(record, "chosen", where), text_field(record, "rejected", where))


def _merged(segments: list[Segment]) -> list[Segment]:
    """Adjacent prompt pieces joined: tokenized as one text, as at generation time."""
    out: list[Segment] = []
    for text, answer in segments:
        if out and not answer and not out[-1][1]:
            out[-1] = (out[-1][0] + text, False)
        else:
            out.append((text, answer))
    return out


def tokenize(examples: list[tuple[str, list[Segment]]], encode: Encode, eos_id: int,
             seq_len: int) -> list[Example]:
    """``input_ids``/``labels`` per example: labels -100 on prompt tokens, EOS after answers.

    An example longer than ``seq_len`` is cut at the end; one left without any answer token to
    predict is an error naming its line (a silently untrained example hides a data problem).
    """
    pieces = [_merged(segments) for _, segments in examples]
    texts = [text for segments in pieces for text, _ in segments]
    ids: list[list[int]] = []
    chunks = range(0, len(texts), ENCODE_CHUNK)
    for start in tqdm(chunks, desc="tokenizing", unit="chunk", disable=len(chunks) < 10):
        ids += encode(texts[start:start + ENCODE_CHUNK])
    out, k = [], 0
    for (where, _), segments in zip(examples, pieces, strict=True):
        tokens: list[int] = []
        labels: list[int] = []
        for _, answer in segments:
            piece = ids[k] + [eos_id] if answer else ids[k]
            k += 1
            tokens += piece
            labels += piece if answer else [IGNORE] * len(piece)
        if len(tokens) > seq_len:
            tokens, labels = tokens[:seq_len], labels[:seq_len]
        if all(label == IGNORE for label in labels[1:]):
            raise DataError(f"{where}: no answer token left within --seq-len {seq_len} (the "
                            f"prompt takes {len(tokens)} tokens); raise --seq-len or shorten it")
        out.append({"input_ids": np.array(tokens, dtype=np.int64),
                    "labels": np.array(labels, dtype=np.int64)})
    return out


def load_sft(files: Sequence[Path], encode: Encode, eos_id: int, seq_len: int) -> list[Example]:
    """Every SFT example of ``files``, validated line by line, then tokenized."""
    parsed = [(where, sft_segments(record, where)) for path in files
              for where, record in read_jsonl(path)]
    if not parsed:
        raise DataError(f"no examples in {', '.join(map(str, files))}; add JSONL lines")
    return tokenize(parsed, encode, eos_id, seq_len)


def load_dpo(files: Sequence[Path], encode: Encode, eos_id: int, seq_len: int) -> list[Example]:
    """Every preference pair of ``files``: chosen_* and rejected_* input_ids/labels."""
    triples = [(where, dpo_triple(record, where)) for path in files
               for where, record in read_jsonl(path)]
    if not triples:
        raise DataError(f"no examples in {', '.join(map(str, files))}; add JSONL lines")
    flat = [(where, [(prompt, False), (answer, True)])
            for where, (prompt, chosen, rejected) in triples for answer in (chosen, rejected)]
    tokens = tokenize(flat, encode, eos_id, seq_len)
    return [{"chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
             "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]}
            for chosen, rejected in zip(tokens[::2], tokens[1::2], strict=True)]


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad (input_ids, labels) rows to the longest: labels -100, attention_mask 0 there."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, :len(ids)] = ids
        labels[i, :len(ids)] = row_labels
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def pad_sft(examples: list[Example], pad_id: int) -> dict[str, np.ndarray]:
    return pad_rows([(e["input_ids"], e["labels"]) for e in examples], pad_id)


def pad_dpo(examples: list[Example], pad_id: int) -> dict[str, np.ndarray]:
    """2B rows, chosen first then rejected: one forward pass scores both halves."""
    rows = [(e[f"{side}_input_ids"], e[f"{side}_labels"])
            for side in ("chosen", "rejected") for e in examples]
    return pad_rows(rows, pad_id)


def example_lengths(examples: list[Example]) -> np.ndarray:
    """Tokens per example as a batch pads it: a DPO pair takes its longer answer's row."""
    return np.array([max(len(v) for k, v in e.items() if k.endswith("input_ids"))
                     for e in examples])

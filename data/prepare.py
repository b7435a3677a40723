"""Text files -> tokenizer -> token shards, so training runs without downloading anything.

``python -m data.prepare`` tokenizes ~4 MB of the Python standard library's own sources (real
text present on every machine) with a byte-level BPE trained on the spot, in seconds. Pass
``--input PATH ...`` for your own .txt/.md/.py/.jsonl files, ``--tokenizer NAME_OR_PATH`` for an
existing tokenizer, and ``--push URL`` to upload the result to a bucket.

Layout: ``--out`` gets ``shard_00000.npy ...`` plus ``dataset.json`` (written last: it marks
the output complete); ``--tokenizer-out`` gets the tokenizer, which train.py loads with
``AutoTokenizer``. Documents are separated by the EOS token.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from tqdm import tqdm

from configs.cli import OneLineParser, Range, count, number, run_main
from utils.data import META_NAME, SHARD_SUFFIXES
from utils.errors import DataError, first_line

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
SHARD_RE = re.compile(r"shard_(\d{5})\.npy")
MB = 1_000_000
ENCODE_BATCH_BYTES = 4 * MB  # text per tokenizer call: big enough for its thread pool, bounded RAM
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
MAX_MB = Range(0, 1e6, low_open=True, note="MB of Python sources")
# 256 bytes + the 2 special tokens; ids must fit the uint32 shards.
VOCAB_SIZE = Range(258, 2**32 - 1, note="256 bytes + 2 special tokens at least")


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


def stdlib_files(max_bytes: int) -> tuple[list[Path], str]:
    """The standard library's .py files in sorted order until ``max_bytes``, and a description.

    Read from ``sys.base_prefix`` so a venv's (or the system's) third-party packages never leak
    in and the selection is the same for every environment on one Python build.
    """
    root = Path(sysconfig.get_path("stdlib", vars={"installed_base": sys.base_prefix}))
    candidates = sorted(
        (p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).parts,
    )
    files, total = [], 0
    for p in candidates:
        if total >= max_bytes:
            break
        files.append(p)
        total += p.stat().st_size
    if not files:
        raise DataError(
            f"no Python sources under {root} (this Python ships none); pass --input PATH with "
            "your own .txt/.md/.py/.jsonl files"
        )
    return files, f"stdlib {root} ({len(files)} files, {total / MB:.1f} MB)"


def collect_inputs(inputs: list[str], max_mb: float) -> tuple[list[Path], list[str]]:
    """Resolve ``--input`` entries (``stdlib``, files, folders) to text files and descriptions."""
    files: list[Path] = []
    sources: list[str] = []
    for entry in inputs:
        if entry == "stdlib":
            found, desc = stdlib_files(int(max_mb * MB))
            files += found
            sources.append(desc)
            continue
        path = Path(entry)
        if path.is_dir():
            found = sorted(
                (p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()),
                key=lambda p: p.relative_to(path).parts,
            )
            if not found:
                raise DataError(
                    f"--input {path}: no {'/'.join(TEXT_SUFFIXES)} files in this folder"
                )
            files += found
        elif path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                raise DataError(
                    f"--input {path}: unsupported file type; use {'/'.join(TEXT_SUFFIXES)} "
                    "(.jsonl lines need a \"text\" field)"
                )
            files.append(path)
        else:
            raise DataError(f"--input {path}: no such file or folder (or use 'stdlib')")
        sources.append(str(path))
    return files, sources


def _jsonl_documents(path: Path) -> Iterator[str]:
    """The "text" of each line, streamed: a jsonl corpus can be far larger than RAM."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line).get("text")
            except (ValueError, RecursionError, AttributeError):  # a 5,000-digit int, deep nesting
                doc = None
            if not isinstance(doc, str):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object with a string \"text\" field"
                )
            if doc:
                yield doc


def iter_documents(files: Iterable[Path], progress: tqdm | None = None) -> Iterator[str]:
    """One document per text file, one per line of a .jsonl file (its "text" field)."""
    for path in files:
        try:
            if path.suffix == ".jsonl":
                yield from _jsonl_documents(path)
            elif text := path.read_text(encoding="utf-8", errors="replace"):
                yield text
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e})") from e
        if progress is not None:
            progress.update(path.stat().st_size)


def train_tokenizer(files: list[Path], vocab_size: int) -> PreTrainedTokenizerBase:
    """Byte-level BPE trained here: any text encodes (no unknown tokens), nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_documents(files), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise DataError(
            f"--tokenizer {name}: cannot load it ({first_line(e)}); give a local folder or a "
            "cached Hugging Face name"
        ) from e
    if tok.eos_token_id is None:
        raise DataError(f"--tokenizer {name}: it has no eos_token to separate documents")
    return tok


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write via a hidden temporary file and rename, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _ShardWriter:
    """Cuts the token stream into shards of ``shard_tokens``, each written atomically."""

    def __init__(self, out: Path, shard_tokens: int, dtype: np.dtype) -> None:
        self.out, self.shard_tokens, self.dtype = out, shard_tokens, dtype
        self.pending: list[np.ndarray] = []
        self.pending_len = self.num_tokens = self.num_shards = 0

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_len += len(ids)
        self.num_tokens += len(ids)
        if self.pending_len >= self.shard_tokens:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        """Write every full shard pending (and the partial last one when ``final``)."""
        stream, pos = np.concatenate(self.pending or [np.empty(0, self.dtype)]), 0
        while len(stream) - pos >= self.shard_tokens or (final and pos < len(stream)):
            chunk = stream[pos : pos + self.shard_tokens]
            _atomic_write(self.out / shard_name(self.num_shards), partial(np.save, arr=chunk))
            self.num_shards += 1
            pos += len(chunk)
        self.pending, self.pending_len = [stream[pos:]], len(stream) - pos


def write_shards(
    tok: PreTrainedTokenizerBase, files: list[Path], out: Path, shard_tokens: int,
    dtype: np.dtype,
) -> tuple[int, int]:
    """Tokenize all documents (EOS after each) into shards of ``shard_tokens``; (tokens, shards)."""
    eos = np.array([tok.eos_token_id], dtype=dtype)
    writer = _ShardWriter(out, shard_tokens, dtype)

    def encode(batch: list[str]) -> None:
        for ids in tok(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            writer.add(np.concatenate([np.asarray(ids, dtype=dtype), eos]))

    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=None) as bar:
        batch: list[str] = []
        batch_bytes = 0
        for doc in iter_documents(files, bar):
            batch.append(doc)
            batch_bytes += len(doc)
            if batch_bytes >= ENCODE_BATCH_BYTES:
                encode(batch)
                batch, batch_bytes = [], 0
        if batch:
            encode(batch)
    writer.flush(final=True)
    return writer.num_tokens, writer.num_shards


def existing_output(out: Path, tokenizer_out: Path) -> dict[str, Any] | None:
    """The dataset.json of a complete earlier output (all its shards and tokenizer present)."""
    try:
        meta = json.loads((out / META_NAME).read_text(encoding="utf-8"))
        n = int(meta["num_shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    complete = all((out / shard_name(i)).is_file() for i in range(n))
    return meta if complete and (tokenizer_out / "tokenizer_config.json").is_file() else None


def check_out_dir(out: Path) -> None:
    """Refuse an --out holding other shards: training reads every shard below the data root."""
    foreign = sorted(
        p for p in out.rglob("*")
        if p.suffix in SHARD_SUFFIXES and not (p.parent == out and SHARD_RE.fullmatch(p.name))
    ) if out.is_dir() else []
    if foreign:
        raise DataError(
            f"--out {out} already holds other shard files (e.g. {foreign[0]}); training would "
            "mix them in: choose an empty --out"
        )


def prepare(
    inputs: list[str], out: Path, tokenizer_out: Path, tokenizer: str | None, vocab_size: int,
    shard_tokens: int, max_mb: float, force: bool,
) -> tuple[dict[str, Any], bool]:
    """Build (or find complete) shards + tokenizer + dataset.json; (metadata, built_now).

    The numbers are checked when the flags are parsed (:func:`parse_args`).
    """
    files, sources = collect_inputs(inputs, max_mb)  # bad inputs fail even if output exists
    if not force and (meta := existing_output(out, tokenizer_out)) is not None:
        return meta, False
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_NAME).unlink(missing_ok=True)  # the old output is incomplete from here on
    if tokenizer is None:
        tok = train_tokenizer(files, vocab_size)
        origin = f"byte-level BPE trained here (vocab {vocab_size})"
    else:
        tok = load_tokenizer(tokenizer)
        origin = tokenizer
    tok.save_pretrained(str(tokenizer_out))
    vocab = len(tok)
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)
    num_tokens, num_shards = write_shards(tok, files, out, shard_tokens, dtype)
    if num_tokens == 0:
        raise DataError(f"the inputs {', '.join(sources)} hold no text to tokenize")
    for p in out.iterdir():  # shards of an earlier, larger build of this command
        m = SHARD_RE.fullmatch(p.name)
        if m and int(m.group(1)) >= num_shards:
            p.unlink()
    meta = {
        "tokenizer": str(tokenizer_out),
        "tokenizer_origin": origin,
        "vocab_size": vocab,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
        "dtype": dtype.name,
        "num_tokens": num_tokens,
        "num_shards": num_shards,
        "source": sources,
    }
    _atomic_write(out / META_NAME, lambda f: f.write(json.dumps(meta, indent=2).encode() + b"\n"))
    return meta, True


def push(out: Path, tokenizer_out: Path, url: str, prefix: str,
         billing_project: str | None = None) -> None:
    """Upload shards to PREFIX/training/<out name> and the tokenizer to PREFIX/tokenizer.

    billing_project pays for a requester-pays bucket's requests (HARNESS_BILLING_PROJECT
    when None).
    """
    from utils.storage import StorageError, open_store, sync_up

    prefix = prefix.strip("/")
    try:
        store = open_store(url, billing_project=billing_project)
        sync_up(out, store, f"{prefix}/training/{out.name}")
        sync_up(tokenizer_out, store, f"{prefix}/tokenizer")
    except StorageError as e:
        raise DataError(f"--push {url}: {e}") from e


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="python -m data.prepare", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", nargs="+", default=["stdlib"], metavar="PATH",
                   help="'stdlib' (Python's own sources) and/or .txt/.md/.py/.jsonl files/folders")
    p.add_argument("--max-mb", type=number(float, MAX_MB), default=4.0,
                   help="how much of the stdlib corpus to use (MB of source)")
    p.add_argument("--out", type=Path, default=Path("data/training/sample"))
    p.add_argument("--tokenizer-out", type=Path, default=Path("data/tokenizer"))
    p.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                   help="use this tokenizer (AutoTokenizer) instead of training one")
    p.add_argument("--vocab-size", type=number(int, VOCAB_SIZE), default=2048,
                   help="for the trained tokenizer")
    p.add_argument("--shard-tokens", type=number(int, count(1)), default=1_000_000,
                   help="tokens per shard")
    p.add_argument("--force", action="store_true", help="rebuild even if the output is complete")
    p.add_argument("--push", metavar="URL", help="also upload to this bucket (gs://... or a dir)")
    p.add_argument("--push-prefix", default="data", help="path prefix inside the bucket")
    p.add_argument("--billing-project", metavar="PROJECT",
                   help="project billed for a requester-pays --push bucket; "
                        "$HARNESS_BILLING_PROJECT when not given")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        meta, built = prepare(
            args.input, args.out, args.tokenizer_out, args.tokenizer, args.vocab_size,
            args.shard_tokens, args.max_mb, args.force,
        )
        secs = time.perf_counter() - start
        summary = (
            f"{meta['num_tokens']:,} tokens in {meta['num_shards']} shard(s) ({meta['dtype']}) "
            f"at {args.out}, tokenizer {args.tokenizer_out} (vocab {meta['vocab_size']})"
        )
        if built:
            print(f"prepared {summary} in {secs:.1f} s")
        else:
            print(f"already prepared: {summary}; left alone (--force rebuilds)")
        if args.push:
            push(args.out, args.tokenizer_out, args.push, args.push_prefix,
                 args.billing_project)
            print(f"pushed to {args.push} under {args.push_prefix.strip('/')}/")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main, "python -m data.prepare")

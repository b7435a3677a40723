"""`python -m data.prepare` as a real subprocess: stdlib corpus -> tokenizer + shards."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import finish

from data.prepare import stdlib_files
from utils.data import TokenWindows, find_shards, read_dataset_meta

REPO = Path(__file__).resolve().parents[1]


def prepare(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = finish(
        [sys.executable, "-m", "data.prepare", *map(str, args)],
        cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def all_tokens(out: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in find_shards(out)])


@pytest.fixture(scope="module")
def stdlib_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    base = tmp_path_factory.mktemp("prep")
    out, tok = base / "training" / "sample", base / "tokenizer"
    t0 = time.perf_counter()
    prepare("--max-mb", "1", "--shard-tokens", "100000", "--out", out, "--tokenizer-out", tok)
    return out, tok, time.perf_counter() - t0


def test_stdlib_corpus_gives_shards_tokenizer_and_metadata(stdlib_run: tuple[Path, Path, float]):
    from transformers import AutoTokenizer

    out, tok_dir, seconds = stdlib_run
    assert seconds < 30  # "prepared in seconds" (about 3 s here, imports included)
    meta = json.loads((out / "dataset.json").read_text())
    assert read_dataset_meta(out.parent) == meta  # found from the data root
    shards = find_shards(out)
    assert [p.name for p in shards] == [f"shard_{i:05d}.npy" for i in range(meta["num_shards"])]
    assert all(np.load(p).dtype == np.uint16 for p in shards) and meta["dtype"] == "uint16"
    assert all(len(np.load(p)) == 100_000 for p in shards[:-1])
    stream = all_tokens(out)
    assert len(stream) == meta["num_tokens"] > 200_000

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) == meta["vocab_size"] == 2048
    assert (tok.eos_token_id, tok.pad_token_id) == (meta["eos_token_id"], meta["pad_token_id"])
    assert stream.max() < len(tok)
    # one EOS after each source file: documents stay separated
    n_files = int(re.search(r"\((\d+) files", meta["source"][0]).group(1))
    assert int((stream == tok.eos_token_id).sum()) == n_files
    assert stream[-1] == tok.eos_token_id

    # a window decodes to a verbatim stretch of the standard library's source
    corpus = "".join(
        p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(1_000_000)[0]
    )
    ds = TokenWindows(shards, 256)
    for i in (0, len(ds) // 2, len(ds) - 1):
        piece = max(tok.decode(ds[i]).split(tok.eos_token), key=len)
        assert len(piece) > 300 and piece[1:-1] in corpus, piece
    assert tok.decode(all_tokens(out)[:20]).startswith('"""Record of phased-in')  # __future__.py


def test_second_run_without_force_leaves_files_alone(stdlib_run: tuple[Path, Path, float]):
    out, tok_dir, _ = stdlib_run
    files = sorted(p for d in (out, tok_dir) for p in d.iterdir())
    before = {p: p.stat().st_mtime_ns for p in files}
    proc = prepare("--max-mb", "1", "--out", out, "--tokenizer-out", tok_dir)
    assert "already prepared" in proc.stdout and "--force" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert sorted(p for d in (out, tok_dir) for p in d.iterdir()) == files


def test_own_files_existing_tokenizer_and_force_rebuild(
    tmp_path: Path, stdlib_run: tuple[Path, Path, float]
):
    _, trained, _ = stdlib_run
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    docs = ["first doc: hello", "second doc\nwith two lines", "third ✓\u2028same doc", "fourth"]
    (corpus / "a.txt").write_text(docs[0])
    (corpus / "sub" / "b.md").write_text(docs[1])
    (corpus / "c.jsonl").write_text(
        "\n".join(json.dumps({"text": d, "id": i}, ensure_ascii=False)
                  for i, d in enumerate(docs[2:])) + "\n\n"
    )
    (corpus / "ignored.csv").write_text("not text input")
    out, tok_out = tmp_path / "out", tmp_path / "tok"
    prepare("--input", corpus, "--tokenizer", trained, "--shard-tokens", "8",
            "--out", out, "--tokenizer-out", tok_out)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["tokenizer_origin"] == str(trained) and meta["tokenizer"] == str(tok_out)
    assert meta["num_shards"] > 3
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_out))
    eos = tok.eos_token
    # sorted folder walk: a.txt, c.jsonl (two documents), sub/b.md
    want = eos.join([docs[0], docs[2], docs[3], docs[1]]) + eos
    assert tok.decode(all_tokens(out)) == want

    proc = prepare("--input", corpus, "--tokenizer", trained, "--shard-tokens", "1000",
                   "--out", out, "--tokenizer-out", tok_out, "--force")
    assert proc.stdout.startswith("prepared")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["num_shards"] == 1 and len(find_shards(out)) == 1  # stale shards removed
    assert tok.decode(all_tokens(out)) == want


BAD_INPUTS = {  # file to create (None: leave it missing), its content, expected words
    "missing": (None, "", "no such file"),
    "x.csv": ("x.csv", "a,b", "unsupported file type"),
    "x.jsonl": ("x.jsonl", '{"text": "ok"}\n{"body": 1}\n', "x.jsonl:2"),
    # The decoder's ValueError (a 5,000-digit integer) and RecursionError were tracebacks.
    "big.jsonl": ("big.jsonl", '{"text": "ok"}\n{"n": ' + "9" * 5000 + "}\n", "big.jsonl:2"),
    "deep.jsonl": ("deep.jsonl", '{"text": "ok"}\n' + "[" * 100_000 + "\n", "deep.jsonl:2"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_error(tmp_path: Path, name: str) -> None:
    create, content, needle = BAD_INPUTS[name]
    bad = tmp_path / name
    if create:
        bad.write_text(content)
    proc = prepare("--input", bad, "--out", tmp_path / "out", "--tokenizer-out", tmp_path / "t",
                   check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and name in lines[0], proc.stderr
    assert not (tmp_path / "out" / "dataset.json").exists()


@pytest.mark.parametrize(("args", "problem"), [
    (["--max-mb", "nan"], "argument --max-mb: must be a finite number > 0"),
    (["--max-mb", "inf"], "argument --max-mb: must be a finite number > 0"),
    (["--max-mb", "0"], "argument --max-mb: must be > 0 and <= 1000000 (MB of Python sources), "
                        "got 0.0"),
    (["--vocab-size", "100"], "argument --vocab-size: must be >= 258"),
    (["--shard-tokens", "0"], "argument --shard-tokens: must be >= 1, got 0"),
])
def test_bad_numbers_are_one_line_at_parse_time(args: list[str], problem: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from data.prepare import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and problem in err, err


def test_refuses_out_dir_with_foreign_shards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "mine.npy", np.arange(10, dtype=np.uint16))
    proc = prepare("--max-mb", "0.1", "--out", out, "--tokenizer-out", tmp_path / "t",
                   check=False)
    assert proc.returncode == 2 and "mine.npy" in proc.stderr and "empty --out" in proc.stderr
    np.testing.assert_array_equal(np.load(out / "mine.npy"), np.arange(10))  # untouched

"""bench/bench_gpu.py: its plan (micro-batch ramp, fp8 refusal, time budget) and a real
``--smoke`` run on the CPU with google.cloud unimportable, as on the GPU image."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from helpers import finish

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "bench_gpu.py")
assert _spec and _spec.loader
bench_gpu = importlib.util.module_from_spec(_spec)
sys.modules["bench_gpu"] = bench_gpu  # dataclasses look their module up while being defined
_spec.loader.exec_module(bench_gpu)

# Installed as sitecustomize in every Python process of the run (the bench's workers too): an
# import of google.cloud fails, as on the GPU image, and is written down so the test sees it
# even where a caller swallows the ImportError.
BLOCKER = '''
import importlib.abc, os, sys

class _NoGoogleCloud(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "google.cloud" or name.startswith("google.cloud."):
            with open(os.environ["BLOCKED_IMPORTS_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ImportError(f"{name} is not installed on the GPU image (blocked by the test)")
        return None

sys.meta_path.insert(0, _NoGoogleCloud())
'''


class FakeBench:
    """Stands in for ``Bench``: answers each variant from a table instead of a process."""

    def __init__(self, outcomes: dict[str, str]) -> None:
        self.outcomes = outcomes
        self.rows: list = []

    def run(self, variant):
        status = self.outcomes.get(variant.name, "ok")
        result = {"tokens_per_s": 1000.0 * variant.micro_batch} if status == "ok" else None
        row = bench_gpu.Row(variant, status, "" if status == "ok" else status, result)
        self.rows.append(row)
        return row

    def skip(self, variant, note: str) -> None:
        self.rows.append(bench_gpu.Row(variant, "skipped", note))


def test_the_micro_batch_ramp_stops_at_the_first_oom_and_fp8_says_why_not():
    bench = FakeBench({"mb8": "OOM"})
    bench_gpu.plan_and_run(bench, "float8 training needs a CUDA GPU ...; this run is on cpu",
                           only=set())
    by_name = {row.variant.name: row for row in bench.rows}
    assert [row.variant.name for row in bench.rows] == list(bench_gpu.ALL_NAMES)
    assert by_name["mb8"].status == "OOM"
    assert by_name["mb16"].status == "skipped" and "out of memory" in by_name["mb16"].note
    assert by_name["fp8"].status == "skipped" and "CUDA" in by_name["fp8"].note
    assert by_name["baseline"].variant.compile_scope == "model"
    assert by_name["baseline"].variant.attention == "sdpa"
    assert by_name["baseline"].variant.loss_chunk_tokens == 0


def test_fp8_runs_at_the_fastest_bf16_micro_batch_when_available():
    bench = FakeBench({})
    bench_gpu.plan_and_run(bench, None, only={"regional", "mb8", "mb16", "fp8"})
    fp8 = bench.rows[-1]
    assert fp8.variant.name == "fp8" and fp8.variant.fp8 and fp8.variant.micro_batch == 16
    assert fp8.status == "ok"


def test_summary_gives_the_speedup_over_the_baseline_and_the_flags():
    bench = FakeBench({})
    bench_gpu.plan_and_run(bench, "no", only={"baseline", "mb16"})
    text, found = bench_gpu.summary(bench.rows, 16)
    assert found["best"] == "mb16" and found["speedup_over_baseline"] == pytest.approx(4.0)
    assert "--per-device-train-batch-size 16 --gradient-accumulation-steps 1" in found["flags"]
    assert "--compile-scope layers --attention causal" in found["flags"]
    assert "4.00x" in text
    table = bench_gpu.table(bench.rows, 16)
    assert "| mb16 |" in table and "16,000" in table


def test_an_oom_wrapped_by_the_compiler_is_still_an_oom():
    import torch

    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.cuda.OutOfMemoryError as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as outer:
        assert bench_gpu._is_oom(outer)
    assert not bench_gpu._is_oom(ValueError("shape mismatch"))


def test_a_spent_budget_skips_variants_with_a_note(tmp_path):
    args = bench_gpu.parse_args(["--smoke", "--out", str(tmp_path), "--budget-s", "0",
                                 "--min-variant-s", "1"])
    bench = bench_gpu.Bench(args, tmp_path)
    row = bench.run(bench_gpu.BASELINE)
    assert row.status == "skipped" and "--only baseline" in row.note


@pytest.mark.slow
def test_smoke_run_on_the_cpu_without_google_cloud(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    blocked = tmp_path / "blocked.log"
    blocked.write_text("")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
           "BLOCKED_IMPORTS_LOG": str(blocked), "TMPDIR": str(tmp_path),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    result = finish([sys.executable, "bench/bench_gpu.py", "--smoke", "--out", str(out)],
                    cwd=REPO, env=env)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert blocked.read_text() == "", f"google.cloud was imported: {blocked.read_text()}"
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] in bench_gpu.ALL_NAMES:
            rows[cells[0]] = cells
    assert set(rows) == set(bench_gpu.ALL_NAMES), result.stdout
    for name, cells in rows.items():
        tokens_per_s = cells[3]
        if name == "fp8":  # no CUDA here: refused with the reason, or run if it could be
            assert re.fullmatch(r"[\d,]+", tokens_per_s) or (
                tokens_per_s == "skipped" and ("CUDA" in cells[7] or "torchao" in cells[7]))
        else:
            assert re.fullmatch(r"[\d,]+", tokens_per_s), (name, cells)
            assert float(tokens_per_s.replace(",", "")) > 0
    assert "speed-up over the baseline (production today, same run): " in result.stdout
    assert re.search(r"^flags: --(no-)?compile ", result.stdout, re.M), result.stdout
    record = json.loads((out / "bench_gpu.json").read_text())
    assert [r["variant"]["name"] for r in record["rows"]] == list(bench_gpu.ALL_NAMES)
    assert (out / "bench_gpu.md").read_text().count("| mb16 |") == 1
    assert elapsed < 600, f"the smoke run took {elapsed:.0f} s"


def test_a_failing_variant_is_one_row_with_its_error_not_a_crash(tmp_path):
    args = bench_gpu.parse_args(["--smoke", "--out", str(tmp_path / "out"), "--model", "nope"])
    bench = bench_gpu.Bench(args, tmp_path)
    bench_gpu.write_dataset(bench.data_dir, 4096, bench_gpu.SMOKE_VOCAB)
    row = bench.run(bench_gpu.EAGER)
    assert row.status == "error" and row.note.startswith("exit 1: ") and "nope" in row.note
    assert (tmp_path / "out" / "logs" / "eager.log").read_text().strip()

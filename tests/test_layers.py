"""The layering of utils/ holds (import-linter), and the MLX path needs no torch at all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_train
from helpers import finish

from utils.checkpoint import find_complete
from utils.mlx_engine.blas import openblas_preload

NO_TORCH = """\
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
"""


def test_import_contracts_hold():
    """pyproject.toml's contracts: layers, neutral layers free of torch/MLX, no cycles."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = finish([str(lint)], cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "0 broken" in result.stdout


@pytest.mark.slow
def test_mlx_pretraining_runs_with_torch_unimportable(sample_data, tmp_path):
    """Data, loop, checkpoints, metrics and TensorBoard on MLX, in a Python without torch."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_TORCH)
    out = tmp_path / "out"
    result = run_train(
        "--config", "smoke", "--data-dir", str(sample_data), "--bucket", str(tmp_path / "bkt"),
        "--output-dir", str(out), "--seq-len", "64", "--per-device-train-batch-size", "4",
        "--max-steps", "4", "--save-steps", "2", "--logging-steps", "2", "--eval-steps", "4",
        "--eval-windows", "4", tmp_path=tmp_path, script="mlx_train.py",
        env={**openblas_preload(), "PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr[-3000:]
    probe = subprocess.run([sys.executable, "-c", "import torch"], cwd=REPO, capture_output=True,
                           text=True, env={"PYTHONPATH": str(site)}, timeout=60)
    assert probe.returncode != 0 and "import of torch halted" in probe.stderr  # block in force
    assert [p.name for p in find_complete(out / "checkpoints")] == [
        "checkpoint-epoch0-step2-files1", "checkpoint-epoch0-step4-files1"]
    assert (tmp_path / "bkt" / "checkpoints" / "smoke" / "checkpoint-epoch0-step4-files1"
            / "COMPLETE.json").is_file()
    assert list((out / "logs" / "smoke").glob("events.out.tfevents.*"))
    assert "eval loss" in result.stdout

"""Shared fixtures: a real fake-gcs-server for the whole session and a fresh bucket per test."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests import the project from the repo root and helpers (gcs_emulator) from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gcs_emulator import GcsEmulator

_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    """One in-memory emulator process shared by all tests (buckets keep tests apart)."""
    emulator = GcsEmulator(tmp_path_factory.mktemp("gcs-emulator"))
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh empty bucket as a gs:// URL; STORAGE_EMULATOR_HOST points the client at it."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    return gcs_emulator.create_bucket(f"test-bucket-{next(_bucket_ids)}")


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~1 MB real-text corpus prepared once per session; returns its data directory."""
    import subprocess

    root = tmp_path_factory.mktemp("sample")
    subprocess.run([sys.executable, "-m", "data.prepare", "--out", str(root / "data"),
                    "--tokenizer-out", str(root / "tokenizer"), "--max-mb", "1"],
                   cwd=REPO, check=True, capture_output=True)
    return root / "data"


def run_train(*args: str, tmp_path: Path, timeout: float = 300, env: dict | None = None,
              script: str = "train.py"):
    """Run the real CLI as a subprocess (one OpenMP thread: tests share 2 cores)."""
    import os
    import subprocess

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def tiny_base(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30-step smoke checkpoint (config.json, model.safetensors, tokenizer, marker): the base
    of the LoRA tests on both backends."""
    from utils.checkpoint import find_complete

    tmp = tmp_path_factory.mktemp("base")
    result = run_train("--config", "smoke", "--data-dir", str(sample_data), "--bucket", "",
                       "--output-dir", str(tmp / "out"), "--seq-len", "64", "--max-steps", "30",
                       "--save-steps", "30", "--learning-rate", "3e-3", tmp_path=tmp)
    assert result.returncode == 0, result.stderr[-2000:]
    return find_complete(tmp / "out" / "checkpoints")[-1]


@pytest.fixture(scope="session")
def tokenizer(tiny_base: Path):
    from utils.stages.tokenizers import load_tokenizer, resolve_tokenizer

    return load_tokenizer(resolve_tokenizer(tiny_base))

"""Shared fixtures: a real fake-gcs-server for the whole session and a fresh bucket per test."""

from __future__ import annotations

import itertools
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Tests import the project from the repo root and helpers (gcs_emulator) from tests/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gcs_emulator import GcsEmulator
from helpers import end_leftovers

_bucket_ids = itertools.count()

# Focused sets by marker (`pytest -m mlx`, `-m "emulator and not slow"`), applied from what
# a test uses, so a new test is in the right set without remembering to mark it.
_DISTRIBUTED_FILES = {"test_distributed.py", "test_two_machines.py", "test_slurm.py"}


def pytest_configure(config: pytest.Config) -> None:
    for name, what in [("emulator", "uses the fake-gcs-server emulator"),
                       ("mlx", "runs the MLX engine"),
                       ("distributed", "runs two or more real processes that train together"),
                       ("slurm", "runs a real Slurm cluster")]:
        config.addinivalue_line("markers", f"{name}: {what} (applied by tests/conftest.py)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by what it uses and group the users of a module fixture, then order
    the files with the most slow tests first: with several workers
    the long runs start at once and the short tests fill the gaps at the end, instead of a
    long run starting last on one worker while the other idles."""
    for item in items:
        file = item.path.name
        if {"gcs_emulator", "gcs_bucket"} & set(getattr(item, "fixturenames", ())):
            item.add_marker("emulator")
        if "mlx" in file or "mlx" in item.name:
            item.add_marker("mlx")
        if file in _DISTRIBUTED_FILES or "two_processes" in item.name or "ranks" in item.name:
            item.add_marker("distributed")
        if file == "test_slurm.py":
            item.add_marker("slurm")
        if _uses_a_module_fixture(item):  # made once: its users share a worker
            item.add_marker(pytest.mark.xdist_group(file))
    slow: dict[Path, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    # Whole files, most slow tests first: a file's tests stay together, so its module
    # fixtures are made once (a file split up would make them again).
    items.sort(key=lambda item: -slow[item.path])


def _uses_a_module_fixture(item: pytest.Item) -> bool:
    """Whether the test needs a module-scoped fixture (a reference run, a prepared dataset):
    tests that share one go to one worker (``--dist loadgroup``), which makes it once."""
    info = getattr(item, "_fixtureinfo", None)  # pytest keeps no public accessor for this
    return info is not None and any(d.scope == "module" for defs in
                                    info.name2fixturedefs.values() for d in defs)


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """Each test starts its processes as a fresh shell would: Ctrl-C and SIGTERM at their
    defaults (an in-process run earlier in this worker may have left SIGINT ignored, which
    every child would inherit, and bash cannot trap a signal ignored at its start). Whatever
    a test started and left running ends with the test (helpers.Watched)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    end_leftovers()


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


def made_once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder made by ``make`` once per test run: the pytest-xdist workers share it (the
    first to ask makes it under a lock, the others wait for it) instead of each making its
    own."""
    import fcntl
    import os
    import shutil

    base = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's folder, above each worker's
    target, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            make(target)
            done.touch()
    return target


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~1 MB real-text corpus prepared once per test run; returns its data directory."""
    import subprocess

    def prepare(root: Path) -> None:
        subprocess.run([sys.executable, "-m", "data.prepare", "--out", str(root / "data"),
                        "--tokenizer-out", str(root / "tokenizer"), "--max-mb", "1"],
                       cwd=REPO, check=True, capture_output=True)

    return made_once(tmp_path_factory, "sample", prepare) / "data"


def run_train(*args: str, tmp_path: Path, env: dict | None = None, script: str = "train.py"):
    """Run the real CLI as a subprocess to its end (one OpenMP thread: tests share 2 cores);
    returns a CompletedProcess. A hang fails (helpers.STALL_S), a slow machine does not."""
    import os

    from helpers import finish

    return finish([sys.executable, script, *args], tmp_path,
                  {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path),
                   "TOKENIZERS_PARALLELISM": "false", **(env or {})}, name=Path(script).stem)


@pytest.fixture(scope="session")
def tiny_base(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30-step smoke checkpoint (config.json, model.safetensors, tokenizer, marker): the base
    of the LoRA tests on both backends; made once per test run."""
    from utils.checkpoint import find_complete

    def train(tmp: Path) -> None:
        result = run_train("--config", "smoke", "--data-dir", str(sample_data), "--bucket", "",
                           "--output-dir", str(tmp / "out"), "--seq-len", "64",
                           "--max-steps", "30", "--save-steps", "30", "--learning-rate", "3e-3",
                           tmp_path=tmp)
        assert result.returncode == 0, result.stderr[-2000:]

    return find_complete(made_once(tmp_path_factory, "base", train) / "out" / "checkpoints")[-1]


@pytest.fixture(scope="session")
def tokenizer(tiny_base: Path):
    from utils.stages.tokenizers import load_tokenizer, resolve_tokenizer

    return load_tokenizer(resolve_tokenizer(tiny_base))

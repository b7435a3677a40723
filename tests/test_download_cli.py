"""download_training_data.py as a real subprocess, against the emulator and a local directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from gcs_emulator import FaultProxy, GcsEmulator
from helpers import Watched, finish

from utils.storage import CACHE_FILE, open_store, sync_up

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "download_training_data.py"
FILES = {
    "corpus/a/part-000.txt": b"alpha " * 5000,
    "corpus/a/part-001.txt": b"beta " * 3000,
    "corpus/b/deep/part-000.txt": b"gamma " * 100,
    "README.txt": b"read me",
}

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_cli(tmp_path: Path) -> Run:
    """Run the CLI from an unrelated cwd with the current environment (emulator host included)."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return finish(
            [sys.executable, str(SCRIPT), "--no-progress", *args],
            cwd=tmp_path, env=env or dict(os.environ))

    return run


def _fill(root: Path) -> Path:
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _assert_synced(dest: Path) -> None:
    for name, data in FILES.items():
        assert (dest / name).read_bytes() == data
    assert not [p for p in dest.rglob("*") if ".part-" in p.name]


def test_cli_against_emulator(gcs_bucket: str, tmp_path: Path, run_cli: Run) -> None:
    sync_up(_fill(tmp_path / "src"), open_store(gcs_bucket), "datasets/v1", progress=False)
    dest = tmp_path / "dest"
    url = f"{gcs_bucket}/datasets/v1"
    first = run_cli("--bucket", url, "--dest", str(dest), "--workers", "3")
    assert first.returncode == 0, first.stderr
    total_mb = sum(len(d) for d in FILES.values()) / 1e6
    assert first.stdout.strip() == f"downloaded 4 ({total_mb:.1f} MB), skipped 0, failed 0"
    _assert_synced(dest)
    assert (dest / CACHE_FILE).is_file()

    second = run_cli("--bucket", url, "--dest", str(dest))
    assert second.returncode == 0 and second.stdout.strip() == (
        "downloaded 0 (0.0 MB), skipped 4, failed 0"
    )
    verify = run_cli("--bucket", url, "--dest", str(dest), "--verify")
    assert verify.stdout.strip() == "downloaded 0 (0.0 MB), skipped 4, failed 0"


def test_cli_prefix_max_files_dry_run(gcs_bucket: str, tmp_path: Path, run_cli: Run) -> None:
    sync_up(_fill(tmp_path / "src"), open_store(gcs_bucket), progress=False)
    dest = tmp_path / "dest"
    dry = run_cli("--bucket", gcs_bucket, "--dest", str(dest), "--prefix", "corpus/", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith("dry run: would have downloaded 3 ")
    assert not dest.exists()
    some = run_cli("--bucket", gcs_bucket, "--dest", str(dest), "--prefix", "corpus/",
                   "--max-files", "2")
    assert some.returncode == 0, some.stderr
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.txt"))
    assert got == ["corpus/a/part-000.txt", "corpus/a/part-001.txt"]


def test_cli_max_files_0_means_all_as_in_train_py(tmp_path: Path, run_cli: Run) -> None:
    dest = tmp_path / "dest"
    proc = run_cli("--bucket", str(_fill(tmp_path / "bucket")), "--dest", str(dest),
                   "--max-files", "0")
    assert proc.returncode == 0 and proc.stdout.startswith("downloaded 4 "), proc.stderr
    _assert_synced(dest)


@pytest.mark.parametrize("form", ["path", "file_url"])
def test_cli_against_local_directory(form: str, tmp_path: Path, run_cli: Run) -> None:
    bucket = _fill(tmp_path / "bucket")
    url = str(bucket) if form == "path" else f"file://{bucket}"
    dest = tmp_path / "dest"
    first = run_cli("--bucket", url, "--dest", str(dest))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("downloaded 4 ")
    _assert_synced(dest)
    (dest / "README.txt").write_bytes(b"read me")  # rewritten, same content: hashed, skipped
    again = run_cli("--bucket", url, "--dest", str(dest))
    assert again.stdout.strip() == "downloaded 0 (0.0 MB), skipped 4, failed 0"


def test_cli_missing_bucket_one_line_and_local_files_untouched(
    gcs_bucket: str, tmp_path: Path, run_cli: Run
) -> None:
    dest = _fill(tmp_path / "dest")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in dest.rglob("*") if p.is_file()}
    proc = run_cli("--bucket", "gs://no-such-bucket-anywhere/x", "--dest", str(dest),
                   "--retry-deadline", "5")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "gs://no-such-bucket-anywhere" in lines[0] and "does not exist" in lines[0]
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in dest.rglob("*") if p.is_file()}
    assert after == before


def test_cli_access_denied_one_line(
    gcs_bucket: str, gcs_emulator: GcsEmulator, tmp_path: Path, run_cli: Run
) -> None:
    proxy = FaultProxy(gcs_emulator.url, ["403"], "/o")
    proxy.start()
    try:
        env = dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url)
        proc = run_cli("--bucket", gcs_bucket, "--dest", str(tmp_path / "d"), env=env)
    finally:
        proxy.stop()
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "access denied (403)" in lines[0] and gcs_bucket in lines[0]


def test_cli_failed_file_exits_1_and_finishes_the_rest(tmp_path: Path, run_cli: Run) -> None:
    bucket = _fill(tmp_path / "bucket")
    dest = tmp_path / "dest"
    (dest / "README.txt").mkdir(parents=True)  # in the way of one file
    proc = run_cli("--bucket", str(bucket), "--dest", str(dest))
    assert proc.returncode == 1
    assert proc.stdout.strip().endswith("skipped 0, failed 1")
    assert proc.stderr.startswith("failed: README.txt: ")
    assert (dest / "corpus/a/part-000.txt").read_bytes() == FILES["corpus/a/part-000.txt"]


def test_cli_bad_arguments(tmp_path: Path, run_cli: Run) -> None:
    for args, problem in [(["--workers", "0"], "argument --workers: must be >= 1, got 0"),
                          (["--max-files=-1"], "argument --max-files: must be >= 0 (0 = all), "
                                               "got -1"),
                          (["--retry-deadline", "nan"], "argument --retry-deadline: must be a "
                                                        "finite number > 0"),
                          (["--retry-deadline", "1e12"], "at most a week), got 1000000000000.0")]:
        proc = run_cli("--bucket", str(tmp_path), *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and problem in lines[0], proc.stderr
    proc = run_cli("--bucket", "gs://some-bucket", "--credentials", "missing-key.json")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert "missing-key.json (from --credentials) not found" in lines[0]


def test_cli_without_any_credentials(tmp_path: Path, run_cli: Run) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")}
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="True")
    proc = run_cli("--bucket", "gs://some-bucket", "--dest", str(tmp_path / "d"), env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert "no usable Google credentials" in lines[0] and "--credentials" in lines[0]


def test_cli_mistyped_prefix_fails_and_names_what_exists(
    gcs_bucket: str, tmp_path: Path, run_cli: Run
) -> None:
    sync_up(_fill(tmp_path / "src"), open_store(gcs_bucket), "datasets/v1", progress=False)
    dest = tmp_path / "dest"
    proc = run_cli("--bucket", f"{gcs_bucket}/datasets/v2", "--dest", str(dest))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {gcs_bucket}/datasets/v2: no objects under this prefix")
    assert "check the bucket URL and prefix" in lines[0]
    assert f"found instead: {gcs_bucket}/datasets/v1/" in lines[0]
    assert not dest.exists()

    typo = run_cli("--bucket", f"{gcs_bucket}/datasts", "--dest", str(dest))
    assert typo.returncode == 2 and f"found instead: {gcs_bucket}/datasets/)" in typo.stderr

    mine = _fill(tmp_path / "mine")  # a full local folder: still an error, nothing touched
    before = {p: p.stat().st_mtime_ns for p in mine.rglob("*")}
    again = run_cli("--bucket", f"{gcs_bucket}/datasets/v1", "--prefix", "corpsu/",
                    "--dest", str(mine))
    assert again.returncode == 2 and f"{gcs_bucket}/datasets/v1/corpsu/" in again.stderr
    assert f"{gcs_bucket}/datasets/v1/corpus/" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in mine.rglob("*")} == before


def test_cli_sigterm_leftovers_are_removed_by_the_next_sync(
    gcs_bucket: str, gcs_emulator: GcsEmulator, tmp_path: Path, run_cli: Run
) -> None:
    """A sync killed mid-download keeps its temporaries; the next one removes them."""
    src = _fill(tmp_path / "src")
    for name in ("big/a.bin", "big/b.bin"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(os.urandom(4 * 2**20))
    sync_up(src, open_store(gcs_bucket), "data", progress=False)
    dest = tmp_path / "dest"
    # Both big downloads get half their bytes, then the connection stalls.
    proxy = FaultProxy(gcs_emulator.url, ["stall", "stall"], match="%2Fbig%2F")
    proxy.start()
    try:
        proc = Watched(
            [sys.executable, str(SCRIPT), "--no-progress", "--bucket", f"{gcs_bucket}/data",
             "--dest", str(dest), "--workers", "2"],
            tmp_path, "download", dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url),
            cwd=tmp_path)
        # Half of each file has arrived (all but the writer's last unflushed buffer).
        proc.wait_for(lambda: _part_bytes(dest) >= 2 * (2 * 2**20 - 2**16), "half of each file",
                      poll_s=0.1)
        proc.signal(signal.SIGTERM)
        assert proc.wait() == -signal.SIGTERM
    finally:
        proxy.stop()
    left = _part_bytes(dest)
    assert left >= 2 * (2 * 2**20 - 2**16), "the interrupted sync should have left temporaries"

    full = run_cli("--bucket", f"{gcs_bucket}/data", "--dest", str(dest))
    assert full.returncode == 0, full.stderr
    assert full.stdout.strip().endswith(
        f"removed 2 stale temporary file(s) of interrupted syncs ({left / 1e6:.1f} MB freed)"
    )
    _assert_synced(dest)  # every file in place and no .part- file anywhere
    assert (dest / "big/a.bin").read_bytes() == (src / "big/a.bin").read_bytes()


def _part_bytes(root: Path) -> int:
    """Bytes in .part- temporaries under root (ones renamed away meanwhile count 0)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if ".part-" in name:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except FileNotFoundError:
                    pass
    return total

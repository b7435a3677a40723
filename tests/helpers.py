"""Shared by the checkpoint tests: train.py as a real process, and checks of what it left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from utils import checkpoint
from utils.storage import Store

REPO = Path(__file__).resolve().parent.parent
TINY = ["--config", "smoke", "--seq-len", "64", "--per-device-train-batch-size", "4",
        "--eval-steps", "1000", "--eval-windows", "8", "--logging-steps", "1"]


@contextmanager
def tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (mount's -o size=, e.g. "160k") at ``mount``: a disk that
    fills up on demand. Skips the test where mounting needs a root this process lacks."""
    import pytest

    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


class Run:
    """One ``train.py`` process; output goes to files so a test can watch it while it runs."""

    def __init__(self, tmp: Path, name: str, args: list[str], env: dict[str, str] | None = None):
        self.out_path = tmp / f"{name}.stdout"
        self.err_path = tmp / f"{name}.stderr"
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp),
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "train.py", *TINY, *args], cwd=REPO,
                                         env=full_env, stdout=out, stderr=err)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"train.py still running after {timeout} s:\n"
                                 f"{self.stderr[-3000:]}") from None

    def signal(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 120,
                 poll_s: float = 0.01) -> None:
        """Poll until condition() holds; fail naming ``what`` if the process ended first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"train.py exited ({self.proc.returncode}) before {what}:"
                                     f"\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.stderr[-3000:]}")
            time.sleep(poll_s)


def train(tmp: Path, name: str, args: list[str], env: dict[str, str] | None = None,
          timeout: float = 240) -> Run:
    """Run train.py to the end and return the finished Run."""
    run = Run(tmp, name, args, env)
    run.wait(timeout)
    return run


def kill_and_resume(tmp: Path, out: Path, args: list[str], kill_at: int,
                    new_machine: Callable[[], None] = lambda: None) -> Run:
    """Run train.py until step ``kill_at`` is logged and a checkpoint is complete, SIGKILL it,
    call ``new_machine()`` (e.g. delete local data), then run it again with ``--resume
    latest`` to its end. (Marking runs at a low priority: on a loaded machine the steps can
    outrun it, so the kill waits for the work, not for a step count alone.)"""
    first = Run(tmp, "first", args)
    first.wait_for(lambda: last_step(out) >= kill_at
                   and bool(checkpoint.find_complete(out / "checkpoints")),
                   f"step {kill_at} and a complete checkpoint")
    first.signal(signal.SIGKILL)
    first.wait()
    new_machine()
    second = train(tmp, "second", [*args, "--resume", "latest"])
    assert second.proc.returncode == 0, second.stderr[-3000:]
    return second


def assert_same_records(out: Path, reference: Path, keys: tuple[str, ...], steps: int) -> None:
    """``out`` logged steps 1..steps with the same ``keys`` values as ``reference``."""
    expected, got = metrics(reference), metrics(out)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for key in keys:
        assert [r[key] for r in got] == [r[key] for r in expected], key


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """What `tensorboard --logdir log_dir` plots for ``tag``: step -> value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def metrics(out: Path, event: str | None = None) -> list[dict]:
    """The run's per-step records, or its ``event`` records (e.g. "checkpoint")."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r for r in records if r.get("event") == event]


def last_step(out: Path) -> int:
    records = metrics(out)
    return records[-1]["step"] if records else 0


def remote_problems(store: Store, prefix: str) -> dict[str, str]:
    """For every checkpoint with a marker in the bucket: what is wrong with it ('' if nothing)."""
    objects = {o.name: o for o in store.child(prefix).list()}
    found = {}
    for name in checkpoint.remote_complete(store, prefix):
        manifest = json.loads(store.child(prefix).read_bytes(f"{name}/{checkpoint.MARKER}"))
        bad = [f for f, info in manifest["files"].items()
               if (o := objects.get(f"{name}/{f}")) is None or o.size != info["size"]
               or o.crc32c != info["crc32c"]]
        found[name] = ", ".join(bad)
    return found

"""Shared by the checkpoint tests: train.py as a real process, and checks of what it left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

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


# A process that has used no CPU time and written no output for this long is hung. Waits end
# when the work ends (the process exits or reaches what the test waits for); this only bounds
# a hang. A loaded machine slows a process down, it does not stop it, so no wait below is a
# clock set for a quiet machine.
STALL_S = 120.0


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's fresh shell: no launcher or rank variables leaked from the
    test runner, no credentials, one OpenMP thread (tests share 2 cores), a private TMPDIR."""
    (tmp / "tmpdir").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE",
                        "RANK", "LOCAL_RANK", "GOOGLE_APPLICATION_CREDENTIALS")}
    env.update({"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp / "tmpdir"),
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def ring_ports() -> list[str]:
    """``--starting-port P`` for ``mlx.launch --backend ring -n 2`` with P and P + 1 free: its
    default port is fixed, and two ring jobs at once (test workers) would meet on it."""
    import socket

    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return ["--starting-port", str(port)]


_STARTED: list[Watched] = []  # the running test's processes (conftest ends what is left)


def end_leftovers() -> None:
    """Kill the running test's processes that are still running, with all they started: a
    failed assert skips the test's own kill, and a leftover train.py would load the machine
    for the rest of the suite. (A process already reaped is skipped: its id may be reused.)"""
    while _STARTED:
        started = _STARTED.pop()
        if started.proc.poll() is None:
            started.kill()


class Watched:
    """A real process in its own session (a failed test ends it and all it started), output
    to files so a test can watch it while it runs. ``merge_output`` sends stderr to stdout."""

    def __init__(self, cmd: list[str], tmp: Path, name: str, env: dict[str, str],
                 cwd: Path = REPO, merge_output: bool = False):
        self.out_path = tmp / f"{name}.stdout"
        self.err_path = self.out_path if merge_output else tmp / f"{name}.stderr"
        with open(self.out_path, "wb") as out, open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out,
                                         stderr=subprocess.STDOUT if merge_output else err,
                                         start_new_session=True)
        _STARTED.append(self)
        self._progress: tuple[float, int] = (-1.0, -1)
        self._progress_at = self._checked_at = time.monotonic()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def family(self) -> list[psutil.Process]:
        """The process and everything it started that still runs."""
        try:
            me = psutil.Process(self.proc.pid)
            return [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the whole session (launchers, ranks, shells)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stalled(self) -> bool:
        """True once neither CPU time nor output has grown for STALL_S (checked each second)."""
        now = time.monotonic()
        if now - self._checked_at < 1.0:
            return False
        self._checked_at = now
        cpu = 0.0
        for p in self.family():
            try:
                times = p.cpu_times()
                cpu += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        written = sum(p.stat().st_size for p in {self.out_path, self.err_path} if p.exists())
        progress = (round(cpu, 1), written)
        if progress != self._progress:
            self._progress, self._progress_at = progress, now
        return now - self._progress_at > STALL_S

    def wait_for(self, condition: Callable[[], bool], what: str, within: float | None = None,
                 poll_s: float = 0.02, others: tuple[Watched, ...] = ()) -> None:
        """Poll until condition() holds. Fails naming ``what`` if this process (or one of
        ``others`` started with it) ends first, if it stalls, or past ``within`` seconds
        where the test claims a bound (a stop that must be quick); everything is then
        killed."""
        group = (self, *others)
        deadline = None if within is None else time.monotonic() + within
        while not condition():
            ended = [w for w in group if w.proc.poll() is not None]
            late = deadline is not None and time.monotonic() > deadline
            stuck = [w for w in group if w.stalled()]
            if (ended or late or stuck) and not condition():  # it may hold by now
                for w in group:
                    w.kill()
                why = (f"exited ({ended[0].proc.returncode})" if ended else
                       f"still running after {within} s" if late else
                       f"stalled (no CPU time or output for {STALL_S:.0f} s)")
                logs = "\n".join(w.stderr[-3000:] for w in group)
                raise AssertionError(f"{self.proc.args[:3]} {why} before {what}:\n{logs}")
            time.sleep(poll_s)

    def wait(self, within: float | None = None) -> int:
        """Wait for the exit (a hang fails, see STALL_S; ``within``: a claimed bound)."""
        def ended() -> bool:
            try:
                self.proc.wait(0.2)  # sleeps in the kernel, unlike a poll loop
            except subprocess.TimeoutExpired:
                return False
            return True

        if self.proc.poll() is None:
            self.wait_for(ended, "its end", within, poll_s=0.0)
        return self.proc.returncode


def finish(cmd: list[str], tmp: Path | None = None, env: dict[str, str] | None = None,
           cwd: Path = REPO, name: str = "run") -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``env`` (default: this process's) to its end and return what it printed,
    as subprocess.run(capture_output=True, text=True) would; its output files go to ``tmp``
    (default: a temporary folder, removed after). A hang fails (STALL_S), a slow machine does
    not."""
    with tempfile.TemporaryDirectory() as scratch:
        done = Watched(cmd, Path(scratch) if tmp is None else tmp, name,
                       dict(os.environ) if env is None else env, cwd=cwd)
        done.wait()
        return subprocess.CompletedProcess(cmd, done.proc.returncode, done.stdout, done.stderr)


class Run(Watched):
    """One ``train.py`` process with the tiny smoke settings (TINY) before ``args``."""

    def __init__(self, tmp: Path, name: str, args: list[str], env: dict[str, str] | None = None):
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp),
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {})}
        super().__init__([sys.executable, "train.py", *TINY, *args], tmp, name, full_env)


def train(tmp: Path, name: str, args: list[str], env: dict[str, str] | None = None) -> Run:
    """Run train.py to the end and return the finished Run."""
    run = Run(tmp, name, args, env)
    run.wait()
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

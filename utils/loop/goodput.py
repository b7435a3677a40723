"""Goodput: how much of a run's wall-clock time trained, across all its sessions.

A run on spot VMs lives through restarts; what it loses is rarely step time but everything
around it. Each session (one process start to its end, or its kill) keeps its own account in
``goodput.json`` next to ``metrics.jsonl`` — rewritten at every log step and at the end, so a
session killed with ``kill -9`` keeps what it had recorded — and the log mirror copies it to
``BUCKET/logs/<run>/`` with the logs (restored from there on a fresh machine).

A session's wall time splits into categories that add up to it exactly (``other`` is what no
category claims: the loop's own bookkeeping):

- ``productive``: optimizer steps that moved the run forward, data waits excluded;
- ``startup``: process start (imports, data sync, model build) to the first step, less:
- ``restore``: choosing, downloading and loading the checkpoint to resume;
- ``first_step``: each session's first step (``torch.compile`` / ``mx.compile`` included);
- ``checkpoints``: the loop blocked by saves, and the end's wait for uploads;
- ``eval``: held-out and downstream evaluation; ``logging``: the other callbacks;
- ``data_wait``: steps waiting for their batches (a streaming cache behind);
- ``redone``: steps trained again because an earlier session trained them and died before
  its next checkpoint (counted at this session's mean step time);
- between sessions, ``lost``: from a session's last record to the next one's start (the end of
  a killed session, the restart).

``python -m utils.loop.goodput OUTPUT_DIR_OR_LOGS_URL`` prints the run's line, e.g.
``goodput 91.4% over 6 sessions: startup 2.1%, first step 0.8%, ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from utils.errors import HarnessError, StorageError, first_line, json_object
from utils.fs import atomic_write
from utils.loop.callbacks import Callback
from utils.loop.log_mirror import GOODPUT

if TYPE_CHECKING:
    from utils.loop.trainer import Trainer

# The report's order; "productive" is goodput itself.
CATEGORIES = ("productive", "startup", "restore", "first_step", "checkpoints", "eval", "logging",
              "data_wait", "redone", "lost", "other")
LABELS = {"first_step": "first step", "data_wait": "data waits", "redone": "redone work",
          "lost": "lost between sessions"}
EVAL_CALLBACKS = ("Evaluation", "DownstreamEval")


_PROCESS_STARTED: list[float] = []  # the process start, once a session has claimed it


def session_start(trainer_created: float) -> float:
    """When this session began: the process's start for the first run in the process (its
    imports and launch are start-up), the Trainer's creation for later ones (the stages of a
    curriculum, tests)."""
    if _PROCESS_STARTED:
        return trainer_created
    _PROCESS_STARTED.append(process_started_at())
    return _PROCESS_STARTED[0]


def process_started_at() -> float:
    """The process's start on the wall clock, to the clock tick (10 ms) on Linux: psutil's
    ``create_time`` adds the start to a boot time rounded to the second, which would let a
    restarted session seem to begin before the killed one's last record."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = (time.clock_gettime(time.CLOCK_BOOTTIME)
               - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: start, in ticks
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        return psutil.Process().create_time()


class Goodput(Callback):
    """This session's account, kept in ``goodput.json`` with the earlier sessions'; its
    figures also join each logged record (``goodput/*``) for TensorBoard and W&B.

    First among the callbacks, so its ``pre_train`` marks the end of start-up before any
    evaluation runs; the loop times what it alone sees (``trainer.timings``: restore, data
    waits, checkpoints), the callbacks list times each callback (``seconds``)."""

    def __init__(self, trainer: Trainer) -> None:
        self.path = trainer.output_dir / GOODPUT
        # An --overwrite starts a new run under the same name: its sessions start afresh.
        self.sessions = [s for s in read_sessions(self.path)
                         if s.get("run_id") == trainer.state.run_id]
        self.started_at = session_start(trainer.created)
        self.start_step = trainer.state.step
        self.previous_step = max((s["step"] for s in self.sessions), default=0)
        self.line = ""  # the run's goodput line, once closed (the summary's)
        self.session = {"run_id": trainer.state.run_id, "host": socket.gethostname(),
                        "pid": os.getpid(),
                        "started_at": self.started_at, "start_step": self.start_step}
        self.step_s = self.first_step_s = 0.0
        self.steps = 0
        self._step_started = self._train_started = self._waited_before = 0.0

    def pre_train(self, trainer: Trainer) -> None:
        self._train_started = time.time()

    def pre_step(self, trainer: Trainer) -> None:
        self._step_started = time.perf_counter()
        self._waited_before = trainer.timings["data_wait"]

    def post_step(self, trainer: Trainer) -> None:
        """The step's time, less its wait for data (a category of its own)."""
        waited = trainer.timings["data_wait"] - self._waited_before
        took = time.perf_counter() - self._step_started - waited
        self.steps += 1
        if self.steps == 1:
            self.first_step_s = took
        else:
            self.step_s += took

    def log_metrics(self, trainer: Trainer, record: dict) -> None:
        if record["step"] == 0:  # the baseline before training: no step to account yet
            return
        account = self.update(trainer)
        record.update({f"goodput/{key}": value for key, value in fractions(account).items()})

    def close(self, trainer: Trainer) -> None:
        self.update(trainer)
        self.line = report([*self.sessions, self.session])

    def update(self, trainer: Trainer) -> dict:
        """Measure the session up to now and rewrite ``goodput.json`` (main process)."""
        now, timings = time.time(), trainer.timings
        seconds = trainer.callbacks.seconds
        eval_s = sum(seconds.get(name, 0.0) for name in EVAL_CALLBACKS)
        logging_s = sum(v for k, v in seconds.items() if k not in (*EVAL_CALLBACKS, "Goodput"))
        step = trainer.state.step
        stepping = self.step_s  # steps after the first, without their data waits
        # Steps an earlier session had trained already (it died before saving them).
        redone_steps = (max(0, min(self.previous_step, step) - self.start_step)
                        + trainer.rolled_back_steps)  # and steps a rollback discarded
        per_step = stepping / max(self.steps - 1, 1)
        redone = min(stepping, redone_steps * per_step)
        pre_train = (self._train_started or now) - self.started_at
        account = {
            "productive": stepping - redone, "redone": redone,
            "startup": max(0.0, pre_train - timings["restore"]),
            "restore": timings["restore"], "first_step": self.first_step_s,
            "checkpoints": timings["checkpoints"], "eval": eval_s, "logging": logging_s,
            "data_wait": timings["data_wait"],
        }
        wall = now - self.started_at
        account["other"] = max(0.0, wall - sum(account.values()))
        self.session.update(updated_at=now, wall_s=wall, step=step, redone_steps=redone_steps,
                            seconds=account)
        if trainer.main:
            atomic_write(self.path, json.dumps({"sessions": [*self.sessions, self.session]},
                                               indent=1))
        return self.session


def read_sessions(path: Path) -> list[dict]:
    """The earlier sessions' accounts ([] for a new run or an unreadable file)."""
    try:
        sessions = json_object(path.read_text(), str(path), "delete it").get("sessions", [])
    except (OSError, HarnessError):
        return []
    keys = ("started_at", "updated_at", "wall_s", "step", "seconds")
    return [s for s in sessions if isinstance(s, dict) and all(k in s for k in keys)]


def totals(sessions: list[dict]) -> tuple[float, dict[str, float]]:
    """The run's wall time (its sessions and the gaps between them) and the seconds of each
    category, the gaps as ``lost``."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    ordered = sorted((s for s in sessions if "seconds" in s), key=lambda s: s["started_at"])
    for previous, session in zip([None, *ordered], ordered, strict=False):
        for key, value in session["seconds"].items():
            seconds[key] = seconds.get(key, 0.0) + value
        if previous is not None:
            seconds["lost"] += max(0.0, session["started_at"] - previous["updated_at"])
    # The sessions and the gaps between them (not the clock's first and last reading: two
    # machines' clocks may disagree by a little).
    return sum(s["wall_s"] for s in ordered) + seconds["lost"], seconds


def fractions(session: dict) -> dict[str, float]:
    """One session's categories as fractions of its wall time (TensorBoard's numbers)."""
    wall = max(session["wall_s"], 1e-9)
    return {key: value / wall for key, value in session["seconds"].items()}


def report(sessions: list[dict]) -> str:
    """``goodput 91.4% over 6 sessions: startup 2.1%, ...`` (categories over 0.05%)."""
    wall, seconds = totals(sessions)
    if wall <= 0:
        return "goodput: no session recorded yet"
    count = sum(1 for s in sessions if "seconds" in s)
    parts = [f"{LABELS.get(key, key)} {100 * seconds[key] / wall:.1f}%"
             for key in CATEGORIES[1:] if seconds[key] / wall >= 0.0005]
    redone = sum(s.get("redone_steps", 0) for s in sessions)
    return (f"goodput {100 * seconds['productive'] / wall:.1f}% over {count} session"
            f"{'s' if count != 1 else ''} ({wall:,.0f} s): {', '.join(parts) or 'nothing else'}"
            + (f"; {redone} step(s) trained twice" if redone else ""))


def load(source: str) -> list[dict]:
    """The sessions of ``source``: an output folder, a logs folder, or a bucket URL of one
    (``gs://B/p/logs/RUN`` or a local bucket folder)."""
    path = Path(source)
    for candidate in (path / GOODPUT, path):
        if candidate.is_file():
            return read_sessions(candidate)
    if "://" not in source:
        raise HarnessError(f"{source}: no {GOODPUT} here; give a run's output folder or its "
                           f"logs folder in the bucket (gs://BUCKET/PREFIX/logs/RUN)")
    from utils.storage import open_store

    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / GOODPUT
        try:
            open_store(source).download_file(GOODPUT, local)
        except StorageError as err:
            raise HarnessError(f"{source}: could not read {GOODPUT} ({first_line(err)}); give "
                               f"the run's logs folder, gs://BUCKET/PREFIX/logs/RUN") from None
        return read_sessions(local)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m utils.loop.goodput",
        description="A run's goodput across all its sessions, from goodput.json.")
    parser.add_argument("source", help="the run's output folder, or its logs folder in the "
                                       "bucket (gs://BUCKET/PREFIX/logs/RUN)")
    args = parser.parse_args(argv)
    try:
        print(report(load(args.source)))
    except HarnessError as err:
        print(f"goodput: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

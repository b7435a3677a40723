"""Saving for the loop: a blocking snapshot, a background write, the publisher, a record each.

A save blocks training only while the engine copies the model, optimizer, scheduler and RNG
states into host memory (``Engine.snapshot``); a thread then writes the folder and hands it
to the publisher, which hashes, marks and uploads it. At most one snapshot is in flight:
a save that comes while the previous one is still being written waits for it (and says so),
so host memory holds one copy of the state. Every checkpoint gets one ``"event":
"checkpoint"`` record in metrics.jsonl once its upload is settled.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from utils.checkpoint import TrainState, checkpoint_name, find_complete, lineage, step_of
from utils.checkpoint.publisher import CheckpointPublisher, Published
from utils.errors import TrainingError, disk_full
from utils.loop.engine import Engine
from utils.loop.gce import PreemptionFacts, describe
from utils.loop.metrics import MetricsWriter
from utils.processes import lower_thread_priority
from utils.stages.tokenizers import copy_tokenizer


@dataclass
class SaveTimes:
    """One checkpoint's costs (seconds); upload_s stays None until it is uploaded."""

    step: int
    name: str
    blocking_s: float
    bytes: int = 0
    write_s: float | None = None
    upload_s: float | None = None
    run_id: str = ""

    def record(self) -> dict:
        return {"event": "checkpoint", "step": self.step, "name": self.name,
                "run_id": self.run_id,
                "bytes": self.bytes, "blocking_s": self.blocking_s, "write_s": self.write_s,
                "upload_s": self.upload_s}


@dataclass
class Saver:
    """The loop's checkpoints: snapshot, background write, publish, measure."""

    engine: Engine
    publisher: CheckpointPublisher
    root: Path
    tokenizer: Path | None
    metrics: MetricsWriter | None  # the main process's; None elsewhere
    say: Callable[[str], None]
    times: dict[str, SaveTimes] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None
    _error_name: str = ""
    _host_bytes_told: bool = False

    def __post_init__(self) -> None:
        self.publisher.on_finished = self._published

    def save(self, state: TrainState, config_dict: dict) -> Path:
        """Snapshot now (collective), write in the background; the checkpoint's final path."""
        waited = self.wait()
        if waited > 0.5:
            self.say(f"waited {waited:.1f} s for the previous checkpoint's write to finish")
        started = time.perf_counter()
        name = checkpoint_name(state)
        state.lineage = lineage.extend(state.lineage, name)  # the line this one continues
        snapshot = self.engine.snapshot(state, config_dict, self.root)
        if snapshot is None:  # not the main process: it writes nothing
            return self.root / name
        times = SaveTimes(state.step, name, time.perf_counter() - started, snapshot.nbytes,
                          run_id=state.run_id)
        self.times[name] = times
        if not self._host_bytes_told:
            self._host_bytes_told = True
            self.say(f"checkpoint snapshots hold {snapshot.nbytes / 2**30:.2f} GiB in host "
                     f"memory; saving blocked training for {times.blocking_s:.2f} s")
        self._error = None
        self._thread = threading.Thread(target=self._write, args=(snapshot, times),
                                        name="ckpt-write", daemon=True)
        self._thread.start()
        if not self.publisher.background:  # --no-background-upload: save and upload in line
            self.wait()
        return self.root / name

    def _write(self, snapshot, times: SaveTimes) -> None:
        if self.publisher.background:
            lower_thread_priority()  # serialising gigabytes must not slow the steps
        self.publisher.wait_marked()  # the previous checkpoint counts before this one writes
        started = time.perf_counter()
        try:
            path = snapshot.write()
            if self.tokenizer is not None:
                copy_tokenizer(self.tokenizer, path)
        except BaseException as err:  # noqa: BLE001 - raised in the loop by wait()
            self._error, self._error_name = err, times.name
            return
        times.write_s = time.perf_counter() - started
        self.publisher.submit(path)  # the marker is written after this, covering the copies

    def wait(self, timeout: float | None = None) -> float:
        """Wait for the checkpoint being written (seconds waited); its error is raised here."""
        started = time.perf_counter()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return time.perf_counter() - started
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            self._raise(err, self._error_name)
        return time.perf_counter() - started

    @property
    def writing(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _raise(self, err: BaseException, name: str) -> None:
        if not isinstance(err, (OSError, RuntimeError)) or not disk_full(err, self.root):
            raise err
        newest = find_complete(self.root)
        need = sum(f.stat().st_size for f in newest[-1].iterdir()) if newest else 0
        free = shutil.disk_usage(self.root).free
        raise TrainingError(
            f"no space left on the device of {self.root} while writing {name} (a checkpoint "
            f"takes about {need / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB are free): free "
            f"space or pass another --output-dir, then --resume latest; the partial folder was "
            f"removed and the earlier checkpoints are untouched") from None

    def _published(self, record: Published) -> None:
        """The publisher settled a checkpoint (any thread): its metrics record, once."""
        times = self.times.get(record.name)
        if times is None or self.metrics is None:
            return  # a catch-up of an earlier run's checkpoint, or not the main process
        if record.uploaded:
            times.upload_s = record.finished - record.started
        self.metrics.write(times.record())

    def totals(self) -> str:
        """The summary's line: what saving cost this run."""
        done = list(self.times.values())
        if not done:
            return "none"
        uploaded = [t.upload_s for t in done if t.upload_s is not None]
        written = sum(t.write_s or 0.0 for t in done)
        text = (f"{len(done)}, {sum(t.bytes for t in done) / 2**30:.2f} GiB; training blocked "
                f"{sum(t.blocking_s for t in done):.1f} s, writing took {written:.1f} s in the "
                f"background")
        if uploaded:
            text += f", uploading {sum(uploaded):.1f} s"
        return text


def preemption_report(step: int, name: str, saver: Saver, publisher: CheckpointPublisher,
                      budget_s: float, facts: PreemptionFacts | None) -> str:
    """What a signal's budget allowed, in one line (plus what the VM will do, on GCE)."""
    times = saver.times.get(name)
    record = next((r for r in reversed(publisher.history) if r.name == name), None)
    if times is None or times.write_s is None or record is None or not record.marked:
        local = (f"the checkpoint was not complete locally within the {budget_s:.0f} s budget "
                 f"(the newest complete one counts)")
    else:
        local = f"checkpoint written locally in {times.blocking_s + times.write_s:.1f} s"
    uploaded = [r for r in publisher.history if r.uploaded]
    if publisher.store is None:
        upload = "no bucket"
    elif record is not None and record.uploaded:
        upload = "uploaded"
    else:
        done = record.sent / record.size if record is not None and record.size else 0.0
        upload = (f"upload {done:.0%} done at the {budget_s:.0f} s budget; the bucket's newest "
                  f"complete checkpoint from this run is "
                  f"{f'step {step_of(uploaded[-1].name):,}' if uploaded else 'none'}; the rest "
                  f"uploads at the next start")
    line = f"preempted at step {step:,}: {local}; {upload}"
    return f"{line}\n{describe(facts)}" if facts is not None else line

"""Experiment trackers for both engines: TensorBoard event files and Weights & Biases.

``--report-to tensorboard,wandb`` (default ``tensorboard``; ``none`` for neither). Every
tracker gets the same scalars as ``metrics.jsonl`` at every logging step, and the run's
flattened configuration once at the start. Only the global main process logs.

* **TensorBoard**: tensorboard's own ``EventFileWriter`` (no torch), under
  ``OUTPUT_DIR/logs/<run_name>/``; ``tensorboard --logdir OUTPUT_DIR/logs`` shows it.
* **Weights & Biases**: what accelerate's ``WandBTracker`` does (``wandb.init(project,
  name=run_name, config=...)``, ``run.log(values, step=step)``, ``run.finish()``), but
  calling the ``wandb`` package directly: this loop is shared with the MLX engine, which has
  no accelerate, and the framework-neutral layers may not import it (pyproject's import
  contracts). The run's id is kept in ``TrainState.run_ids["wandb"]`` and so in every
  checkpoint; a resumed run passes it back to ``wandb.init(id=..., resume="allow")`` and its
  history continues the same W&B run. ``wandb`` is imported only when requested; a missing
  package or missing credentials stop the run at its start with one line
  (``check_trackers``), never mid-run.

Records may hold nested dicts (``{"tokens_by_source": {"web": 1}}``): trackers see them as
``tokens_by_source/web``; values that are not numbers are skipped.
"""

from __future__ import annotations

import importlib.util
import numbers
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from configs.training_config import TrainingConfig, report_to
from utils.checkpoint import TrainState
from utils.errors import ConfigError, HarnessError, first_line

WANDB_DEFAULT_PROJECT = "harness"
OFFLINE_MODES = ("offline", "dryrun", "disabled")


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``outer/inner`` keys; everything else as it is."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, flattened, without its ``step`` (the x axis)."""
    return {key: float(value) for key, value in flatten(record).items()
            if key != "step" and isinstance(value, numbers.Real)}


class TensorBoard:
    """Scalars per step under ``log_dir``; the config as hparams once at the start."""

    def __init__(self, log_dir: Path, hparams: dict) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self._writer = EventFileWriter(str(log_dir))
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in flatten(hparams).items()}
        self._writer.add_event(Event(wall_time=time.time(), summary=hparams_pb(flat)))

    def log(self, record: Mapping[str, Any], step: int) -> None:
        values = [Summary.Value(tag=key, simple_value=value)
                  for key, value in scalars(record).items()]
        self._writer.add_event(Event(wall_time=time.time(), step=step,
                                     summary=Summary(value=values)))

    def flush(self) -> None:
        """Everything logged so far on disk (thread-safe: the writer holds its own lock)."""
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def wandb_mode() -> str:
    """W&B's mode as it will run: WANDB_MODE, else its settings files (``wandb offline``)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        return mode
    try:
        import wandb

        return str(wandb.setup().settings.mode or "online").lower()
    except Exception:  # noqa: BLE001 - unreadable settings: wandb.init will say what is wrong
        return "online"


def wandb_problem() -> str:
    """Why ``--report-to wandb`` cannot work here ('' if it can): no package, no login.

    Cheap and offline: the credentials are looked up (environment, settings, .netrc) but not
    verified with the server, and not at all when W&B runs offline or disabled."""
    drop = "or drop wandb from --report-to"
    if importlib.util.find_spec("wandb") is None:
        return f"--report-to wandb needs the wandb package, which is not installed: " \
               f"pip install wandb ({drop})"
    try:
        import wandb
    except Exception as err:  # noqa: BLE001 - a broken install is one line too
        return f"--report-to wandb: the wandb package does not import ({first_line(err)}); " \
               f"reinstall it with pip install wandb ({drop})"
    if wandb_mode() in OFFLINE_MODES:
        return ""
    try:
        logged_in = wandb.login(prompt=False, verify=False)
    except Exception as err:  # noqa: BLE001 - whatever the reason, say it at the start
        return f"--report-to wandb: W&B credentials could not be read ({first_line(err)})"
    if not logged_in:
        return (f"--report-to wandb: not logged in to W&B: run `wandb login` or set "
                f"WANDB_API_KEY (WANDB_MODE=offline logs locally for a later `wandb sync`), "
                f"{drop}")
    return ""


def check_trackers(config: TrainingConfig, processes) -> None:
    """At the start of a run, before any data or model work: every process stops with the
    same one line when a requested tracker cannot work (the main process decides, since it is
    the one that logs)."""
    if "wandb" not in report_to(config.report_to):
        return
    verdict = [wandb_problem() if processes.is_main_process else ""]
    if processes.num_processes > 1:
        verdict = processes.broadcast_object(verdict)
    if verdict[0]:
        raise ConfigError(verdict[0])


class WandB:
    """One W&B run, as accelerate's ``WandBTracker`` would start it, resumable by id."""

    def __init__(self, config: TrainingConfig, run_id: str | None, output_dir: Path) -> None:
        import wandb

        project = (config.wandb_project or os.environ.get("WANDB_PROJECT")
                   or WANDB_DEFAULT_PROJECT)
        # The run's files go next to its other outputs unless WANDB_DIR says where.
        folder = None if os.environ.get("WANDB_DIR") else output_dir
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=project, entity=config.wandb_entity or None,
                                  name=config.run_name, config=flatten(config.record()),
                                  id=run_id or None, resume="allow",
                                  dir=str(folder) if folder else None)
        except Exception as err:  # noqa: BLE001 - any failure to start is one line at start
            raise ConfigError(f"--report-to wandb: W&B could not start the run "
                              f"({first_line(err)}); check `wandb login` and the network, set "
                              f"WANDB_MODE=offline, or drop wandb from --report-to") from None
        self.id = self.run.id

    def log(self, record: Mapping[str, Any], step: int) -> None:
        self.run.log(scalars(record), step=step)  # queued for W&B's own process: no wait

    def close(self, timeout: float | None = None) -> None:
        """``finish()``: waits for W&B to sync (online); ``timeout`` bounds that wait."""
        if timeout is None:
            self.run.finish()
            return
        worker = threading.Thread(target=self.run.finish, name="wandb-finish", daemon=True)
        worker.start()
        worker.join(timeout)


class Trackers:
    """The trackers ``--report-to`` names, logged to together (main process only)."""

    def __init__(self, config: TrainingConfig, state: TrainState, log_dir: Path,
                 output_dir: Path) -> None:
        names = report_to(config.report_to)
        self.tensorboard = (TensorBoard(log_dir, config.record()) if "tensorboard" in names
                            else None)
        self.wandb = None
        if "wandb" in names:
            self.wandb = WandB(config, state.run_ids.get("wandb"), output_dir)
            state.run_ids["wandb"] = self.wandb.id  # the next checkpoint holds it
        self._closed = False

    def log(self, record: Mapping[str, Any], step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.log(record, step)
        if self.wandb is not None:
            try:
                self.wandb.log(record, step)
            except Exception as err:  # noqa: BLE001 - a tracker never stops training
                print(f"W&B logging failed at step {step} ({first_line(err)}); W&B stops for "
                      f"this run, metrics.jsonl and TensorBoard go on", file=sys.stderr)
                self.wandb = None

    def flush(self) -> None:
        """Event files complete on disk (from any thread; a no-op once closed)."""
        if self.tensorboard is not None and not self._closed:
            try:
                self.tensorboard.flush()
            except OSError:
                pass  # closed meanwhile: close() flushed everything

    def close(self, timeout: float | None = None) -> None:
        self._closed = True
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.close(timeout)


def open_trackers(config: TrainingConfig, state: TrainState, processes, log_dir: Path,
                  output_dir: Path) -> Trackers | None:
    """The main process's trackers (None elsewhere); a tracker that fails to start stops every
    process with its one line, before the first step."""
    if not processes.is_main_process and "wandb" not in report_to(config.report_to):
        return None
    trackers, error = None, ""
    if processes.is_main_process:
        try:
            trackers = Trackers(config, state, log_dir, output_dir)
        except HarnessError as err:
            error = str(err)
    if processes.num_processes > 1 and "wandb" in report_to(config.report_to):
        error = processes.broadcast_object([error])[0]
    if error:
        raise ConfigError(error)
    return trackers

"""TensorBoard event files for both engines, written with tensorboard's own writer (no torch).

``tensorboard --logdir OUTPUT_DIR/logs`` shows every scalar of ``metrics.jsonl`` and the run's
configuration (as hparams), whichever backend trained.
"""

from __future__ import annotations

import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams.summary_v2 import hparams_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class TensorBoard:
    """Scalars per step under ``log_dir``; the config as hparams once at the start."""

    def __init__(self, log_dir: Path, hparams: dict) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(log_dir))
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in hparams.items()}
        self._writer.add_event(Event(wall_time=time.time(), summary=hparams_pb(flat)))

    def log(self, record: dict[str, float], step: int) -> None:
        values = [Summary.Value(tag=key, simple_value=float(value))
                  for key, value in record.items() if key != "step"]
        self._writer.add_event(Event(wall_time=time.time(), step=step,
                                     summary=Summary(value=values)))

    def close(self) -> None:
        self._writer.close()

"""The command line's contract around a run: one engine, one stage or a curriculum, one-line
errors (``error: ...`` on stderr) instead of tracebacks.

Exit status: 0 done (or stopped by a signal after saving); 2 a configuration error found at
start-up (``ConfigError``, like a bad flag value at parse time: running again unchanged
repeats it, so ``start_training.sh --max-restarts`` never retries it); 1 any other error,
one line or a traceback (a crash: a restart with ``--resume latest`` may get past it)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import partial

from configs.training_config import TrainingConfig
from utils.errors import ConfigError, HarnessError, disk_full
from utils.loop.engine import Engine
from utils.loop.preflight import run_preflight
from utils.loop.trainer import train
from utils.stages.curriculum import run_curriculum

# The exit status of a configuration error (the parser's for a bad flag value, too).
CONFIG_ERROR = 2


def _exit_now() -> None:
    """A signalled run has done what its preemption budget allowed: exit 0 at once rather
    than spend seconds of the VM's last ones tearing down Python, CUDA and the process group
    (nothing is left to flush: checkpoints are written or not, logs are closed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(config: TrainingConfig, make_engine: Callable[[TrainingConfig], Engine],
        validate: bool = False) -> int:
    """Train (or ``--validate``) with the engine ``make_engine`` builds; the exit status."""
    engine: Engine | None = None
    try:
        engine = make_engine(config)
        if validate:
            return run_preflight(config, engine)
        if config.topics:
            run_curriculum(config, partial(train, engine=engine), engine, engine.merge)
        elif train(config, engine)["stopped_early"]:
            _exit_now()
        engine.finish()  # after the last stage: it may end the process group
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return CONFIG_ERROR if isinstance(err, ConfigError) else 1
    except OSError as err:
        if not disk_full(err):
            raise
        print(f"error: no space left on the device writing {err.filename or 'a file'}: free "
              f"space or pass another --output-dir, then --resume latest (complete checkpoints "
              f"are untouched)", file=sys.stderr)
        return 1
    except Exception as err:
        line = engine.explain(err) if engine is not None else None
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    return 0

"""The loop's waits for checkpoint uploads: after a crash, at a normal end, after a signal.

Uploads run in the publisher's background threads; these bound how long the loop waits for
them (a spot VM is gone 30 s after its notice), so the exit never hangs on a bucket.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from configs.training_config import TrainingConfig


@contextmanager
def uploads_survive_an_abort(saver, publisher, config: TrainingConfig, say,
                             on_abort: Callable[[BaseException], None]) -> Iterator[None]:
    """Around the loop: a crash or Ctrl-C still waits, within --upload-timeout-s, for the
    checkpoint being written in the background (its snapshot was taken before the crash: a
    resume starts from it) and for earlier checkpoints' uploads before it propagates;
    ``on_abort`` (the callbacks' ``on_error``) runs first."""
    try:
        yield
    except BaseException as err:
        on_abort(err)
        say("run aborted: waiting for the writes and uploads of earlier checkpoints")
        deadline = time.monotonic() + config.upload_timeout_s
        with suppress(Exception):  # the crash is the error to report, not a failed write
            saver.wait(timeout=config.upload_timeout_s)
        publisher.close(timeout=max(0.0, deadline - time.monotonic()))
        raise


def finish_uploads(publisher, config: TrainingConfig, budget_left: Callable[[], float | None],
                   exit_s: float) -> bool:
    """At a normal end, wait up to --final-upload-timeout-s for the uploads. A SIGTERM cuts
    the wait to --upload-timeout-s and never past --preemption-budget-s less ``exit_s`` from
    the signal (a spot VM is gone 30 s after its notice): ``budget_left()`` is None until a
    signal, then the seconds its budget has left. True when every checkpoint reached the
    bucket. (A run stopped by a signal during training waits within its budget instead.)"""
    after_signal_s = max(0.0, min(config.upload_timeout_s, config.preemption_budget_s - exit_s))
    left = budget_left()
    if left is not None:  # the signal came before this wait, while the last save was written
        return publisher.close(timeout=min(left, after_signal_s))
    return publisher.close(timeout=config.final_upload_timeout_s,
                           interrupted=lambda: budget_left() is not None,
                           after_interrupt_s=after_signal_s)

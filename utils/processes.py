"""The processes of a run as every layer below the engines sees them: who is main, a barrier.

Each engine answers these for its own launcher (accelerate's processes for torch,
``mlx.launch`` ranks for MLX), so code that both backends run never asks accelerate: under
``mlx.launch`` every rank would be "main" to accelerate and all of them would write.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class Processes(Protocol):
    """Rank facts and the two collectives the shared layers need."""

    process_index: int
    num_processes: int
    is_main_process: bool        # rank 0 of the whole run: logs, writes checkpoints
    is_local_main_process: bool  # rank 0 of this machine: downloads into its local disk

    def wait_for_everyone(self) -> None: ...

    def broadcast_object(self, values: list) -> list:
        """Rank 0's JSON-able ``values`` on every rank."""
        ...


class OneProcess:
    """A run of one process (tools, preflight, tests): main everywhere, barriers are no-ops."""

    process_index = 0
    num_processes = 1
    is_main_process = True
    is_local_main_process = True

    def wait_for_everyone(self) -> None:
        return None

    def broadcast_object(self, values: list) -> list:
        return values


ONE_PROCESS = OneProcess()


def _silent(*_: object, **__: object) -> None:
    """What the processes that do not report print: nothing."""


def printer(speaks: bool) -> Callable[..., None]:
    """``print`` for the process that reports (every rank resolves and logs the same things),
    a no-op for the others, so a line appears once per run or per machine."""
    return print if speaks else _silent


@contextmanager
def local_main_first(processes: Processes) -> Iterator[None]:
    """Run the block on each machine's main process first, then on the others.

    For work that fills a machine's disk once (downloads, tokenizer copies): the others find
    it done. Every process must enter, or the barrier waits forever.
    """
    if not processes.is_local_main_process:
        processes.wait_for_everyone()
    yield
    if processes.is_local_main_process:
        processes.wait_for_everyone()


def lower_thread_priority(nice: int = 10) -> None:
    """Make the calling thread yield the CPU to training: on a busy machine an upload thread
    at normal priority slowed steps ~2x, at nice 10+ by a few percent (bench_checkpoint.py).

    Linux only, where niceness is per thread (elsewhere the call would renice the process).
    """
    if sys.platform != "linux" or nice <= 0:
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        pass  # not allowed here: the thread competes at normal priority

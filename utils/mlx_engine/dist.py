"""The MLX job's processes as the loop sees them: one, or the ranks ``mlx.launch`` started.

    mlx.launch --backend ring -n 2 python train.py --backend mlx ...   # data parallel

Each rank trains on its own slice of every global batch (the torch loop's sampler split) and
gradients are averaged before clipping, so N ranks x batch B train like one process with
batch N x B. Rank 0 syncs data, logs, saves and uploads (one machine: every rank reads the
same local folders).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class MlxProcesses:
    """The ranks as ``utils.processes.Processes``, plus the collectives the engine needs."""

    def __init__(self) -> None:
        self.group = mx.distributed.init()  # a group of one when not launched
        self.process_index = self.group.rank()
        self.num_processes = self.group.size()
        self.is_main_process = self.is_local_main_process = self.process_index == 0

    def _sum(self, value: mx.array) -> mx.array:
        return mx.distributed.all_sum(value, group=self.group)

    def wait_for_everyone(self) -> None:
        if self.num_processes > 1:
            mx.eval(self._sum(mx.array(1.0)))

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks (losses, metrics, flags), in fp32."""
        if self.num_processes == 1:
            return values
        return self._sum(mx.array(values, mx.float32)).tolist()

    def all_sum_later(self, values: list[float]) -> Callable[[], list[float]]:
        """``all_sum`` evaluated in the background (``mx.async_eval``); read it later."""
        if self.num_processes == 1:
            return lambda: values
        total = self._sum(mx.array(values, mx.float32))
        mx.async_eval(total)
        return total.tolist

    def average_gradients(self, grads: dict) -> dict:
        return grads if self.num_processes == 1 else nn.average_gradients(grads,
                                                                           group=self.group)

    def broadcast_object(self, values: list) -> list:
        """Rank 0's JSON-able ``values`` on every rank: its length first, then its bytes (as
        int32, summed with the others' zeros), so any size goes (a bucket's listing too)."""
        if self.num_processes == 1:
            return values
        data = json.dumps(values).encode() if self.is_main_process else b""
        size = int(self._sum(mx.array(len(data), mx.int32)).item())
        mine = np.frombuffer(data, np.uint8).astype(np.int32) if data else np.zeros(size,
                                                                                    np.int32)
        received = np.array(self._sum(mx.array(mine))).astype(np.uint8).tobytes()
        return json.loads(received.decode())

"""SIGTERM/SIGINT -> finish the step, save, upload, exit 0; a second signal exits at once
(the same signal again within ``REPEAT_S`` counts once: under Slurm both srun and torchrun
deliver the stop to every rank).

Spot VMs give 30-120 s of warning, so the first signal only sets a flag that the
loop checks between optimizer steps.
"""

from __future__ import annotations

import os
import signal
import sys
import time

# A repeat of the first signal this soon is one stop delivered twice, not a second request.
REPEAT_S = 2.0


class PreemptionHandler:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.at = 0.0  # time.monotonic() of the first signal
        self.name = ""
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.requested and self.name == signal.Signals(signum).name \
                and time.monotonic() - self.at < REPEAT_S:
            return  # the same stop delivered twice (Slurm signals the step, torchrun forwards)
        if self.requested:
            sys.stderr.write(f"\nsecond {signal.Signals(signum).name}: exiting now\n")
            os._exit(128 + signum)
        self.requested, self.at = True, time.monotonic()
        self.name = signal.Signals(signum).name
        sys.stderr.write(f"\n{self.name} received: finishing this step, saving and uploading "
                         f"what fits the preemption budget (send again to exit at once)\n")

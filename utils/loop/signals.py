"""SIGTERM/SIGINT -> finish the step, save, upload, exit 0; a second signal exits at once.

Spot VMs give 30-120 s of warning, so the first signal only sets a flag that the
loop checks between optimizer steps.
"""

from __future__ import annotations

import os
import signal
import sys
import time


class PreemptionHandler:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.at = 0.0  # time.monotonic() of the first signal
        self.name = ""
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.requested:
            sys.stderr.write(f"\nsecond {signal.Signals(signum).name}: exiting now\n")
            os._exit(128 + signum)
        self.requested, self.at = True, time.monotonic()
        self.name = signal.Signals(signum).name
        sys.stderr.write(f"\n{self.name} received: finishing this step, saving and uploading "
                         f"what fits the preemption budget (send again to exit at once)\n")

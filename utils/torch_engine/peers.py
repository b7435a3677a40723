"""A collective that failed because another process of the job went away, said in one line.

When a rank is killed, crashes or loses its machine, the survivors' next collective fails with
the backend's error: gloo's ``Read error [10.77.0.2]:29500: Connection reset by peer`` (or
``Connection closed by peer``), NCCL's aborted communicator or watchdog timeout, the
rendezvous store's ``DistNetworkError``; a rank that stalls (alive, not answering) ends the
same way once ``--collective-timeout-minutes`` has passed (gloo: ``Application timeout caused
pair closure``). Those are not bugs to debug from a traceback: the
user's action is to look at the other machine and restart (``start_training.sh
--max-restarts N`` does it from the newest checkpoint), so the survivor says that.
"""

from __future__ import annotations

import re

import torch.distributed as dist

# What the backends' messages say when the other end of a connection is gone.
_SIGNS = ("by peer", "Broken pipe", "Connection refused", "communicator was aborted",
          "Watchdog caught collective operation timeout", "failed to recv", "Socket Timeout",
          "Timed out waiting", "Application timeout")


def lost_peer(err: BaseException) -> str | None:
    """The one line for ``err`` if it is a collective's error from a lost process, else None."""
    text = str(err).strip()
    if not isinstance(err, RuntimeError) or not (
            isinstance(err, dist.DistError) or any(sign in text for sign in _SIGNS)):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", first)  # the source location
    first = first.split(". ")[0]  # the backend's advice follows; ours is below
    return (f"lost another process of this job ({first}): it crashed, stalled past "
            f"--collective-timeout-minutes, was killed or its machine went away; see its log, "
            f"then resume with --resume latest (start_training.sh --max-restarts N does that "
            f"by itself)")

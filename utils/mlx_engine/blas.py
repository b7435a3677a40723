"""MLX's Linux wheel ships a reference BLAS; Debian's OpenBLAS, preloaded, is 3-8x faster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
"""Debian's ``libopenblas0-pthread``: 3-8x faster MLX matmuls than the Linux wheel's own BLAS."""
OPENBLAS_OPT_OUT = "HARNESS_MLX_OPENBLAS"  # set to 0 to keep the wheel's reference BLAS


def openblas_preload() -> dict[str, str]:
    """``{"LD_PRELOAD": ...}`` putting OpenBLAS first, or ``{}`` (missing, opted out, loaded).

    Merge it into the environment of MLX processes only; torch brings its own BLAS.
    """
    preload = os.environ.get("LD_PRELOAD", "")
    if (sys.platform != "linux" or not OPENBLAS.is_file()
            or os.environ.get(OPENBLAS_OPT_OUT) == "0" or str(OPENBLAS) in preload.split(":")):
        return {}
    return {"LD_PRELOAD": f"{OPENBLAS}:{preload}" if preload else str(OPENBLAS)}


def reexec_with_openblas() -> None:
    """Restart this very process (same pid, same argv) with OpenBLAS preloaded, if it helps.

    LD_PRELOAD only works at process start, so a CLI calls this first thing; a no-op when
    OpenBLAS is missing, already loaded, or opted out.
    """
    preload = openblas_preload()
    if preload:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **preload})

"""Train GPT-NeoX with MLX: ``train.py``'s spine and loop on the MLX engine.

    python mlx_train.py --config smoke                   # same flags and presets as train.py
    python train.py --backend mlx --config smoke         # the same run through train.py
    mlx.launch --backend ring -n 2 python mlx_train.py --config smoke   # data parallel

``mlx.launch`` runs this file (its ``--backend`` flag would swallow ours); everything else is
shared with the torch engine: presets and flags, data, stages, schedule, the loop, checkpoint
layout and uploads.
"""

from __future__ import annotations

import os

from configs.cli import parse_args, run_main
from train import mlx_engine


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv, prog="mlx_train.py")
    from utils.loop.run import run

    return run(config, mlx_engine, validate=args.validate)


def _start() -> int:
    """Re-exec with OpenBLAS first (before the flags are even parsed), then the run."""
    from utils.mlx_engine.blas import reexec_with_openblas

    reexec_with_openblas()
    return main()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_main(_start, "mlx_train.py")

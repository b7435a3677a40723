"""Pretrain or fine-tune GPT-NeoX: parse -> engine -> sync data -> loop -> save/upload -> summary.

    python train.py --config smoke                       # debug, one process
    accelerate launch train.py --config production ...   # DDP / FSDP / multi-node
    ./start_training.sh --config production --gpus 8     # the same, set up for you
    python train.py --config sft --backend mlx           # the MLX engine (Apple Silicon)

The spine, in the order a run does it:

1. ``configs/``: a preset (``--config``) with every field overridable by its own flag.
2. An engine for ``--backend``: ``utils/torch_engine`` (accelerate: bf16, ``torch.compile``
   after ``prepare()``, DDP/FSDP) or ``utils/mlx_engine``. Each owns its tensors and
   processes behind one small surface (``utils/loop/engine.py``).
3. ``utils/loop/trainer.py``, the loop both engines share: sync the data from the bucket
   (skip-existing), build the stage (``utils/stages``: pretraining windows, or SFT/DPO
   examples on a LoRA base), resume from the newest good checkpoint, then per optimizer
   step accumulate, clip, step; log, evaluate, save as due; stop cleanly on SIGTERM.
4. Checkpoints (``utils/checkpoint``): written locally, marked complete and uploaded by a
   background thread, counted only once complete.
5. An end-of-run summary, the same numbers in ``metrics.jsonl`` and TensorBoard.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from configs.cli import parse_args, run_main

if TYPE_CHECKING:
    from configs.training_config import TrainingConfig
    from utils.loop.engine import Engine

# configs.cli is quick to import; the loop and the engines (torch, MLX) are imported inside
# main(), where run_main turns a Ctrl-C during their seconds of start-up into one line.


def torch_engine(config: TrainingConfig) -> Engine:
    from utils.torch_engine.engine import TorchEngine

    return TorchEngine(config)


def mlx_engine(config: TrainingConfig) -> Engine:
    from utils.mlx_engine.engine import MlxEngine

    return MlxEngine(config)


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    from utils.loop.run import run

    if config.backend == "mlx":
        from utils.mlx_engine.blas import reexec_with_openblas

        reexec_with_openblas()  # MLX's Linux wheel ships a slow BLAS; no-op elsewhere
        return run(config, mlx_engine, validate=args.validate)
    return run(config, torch_engine, validate=args.validate)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_main(main, "train.py")

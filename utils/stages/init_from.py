"""Where a LoRA stage starts (``--init-from``): its base model, resolved and checked, no framework.

``--init-from`` names a folder, or ``latest``/a checkpoint name of ``--init-run`` (downloaded
from the bucket when only it has the checkpoint). A LoRA checkpoint as base is traced to its
own base (engines fuse it on load). Each engine loads the resolved folder its own way;
the tokenizer that goes with it is found by ``utils.stages.tokenizers``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from configs.training_config import TrainingConfig
from utils import checkpoint
from utils.checkpoint.format import ADAPTER_CONFIG
from utils.errors import CheckpointError
from utils.processes import ONE_PROCESS, Processes, local_main_first, printer


def resolve_base(config: TrainingConfig, processes: Processes = ONE_PROCESS) -> Path:
    """The folder ``--init-from`` means: a path, or ``latest``/a checkpoint name of --init-run.

    Run checkpoints come from outputs/<init_run>/checkpoints or, when only the bucket has them,
    BUCKET/checkpoints/<init_run>/ (downloaded and checksummed first). A resumed run keeps the
    base it started on, even if --init-run has saved newer checkpoints since.
    """
    name = config.init_from
    if name != "latest" and checkpoint.step_of(name) is None:
        path = Path(name).expanduser()
        check_base(path)
        return path.resolve()
    pinned = _started_on(config, say=printer(processes.is_main_process))
    if pinned is not None:
        return pinned
    root = Path("outputs") / config.init_run / "checkpoints"
    store = None
    if config.bucket:
        from utils.storage import open_bucket

        store = open_bucket(config.bucket_settings)
    with local_main_first(processes):  # one download per node
        found = checkpoint.choose_resume(name, root, store, f"checkpoints/{config.init_run}")
    if found is None:
        where = f"{root}" + (f" or {store.url}/checkpoints/{config.init_run}" if store else "")
        raise CheckpointError(f"--init-from {name}: run {config.init_run!r} has no complete "
                              f"checkpoint in {where}; train it first (python train.py --config "
                              f"{config.init_run}), or pass --init-from PATH")
    return found.resolve()


def _started_on(config: TrainingConfig, say: Callable[[str], None]) -> Path | None:
    """When resuming, the base recorded in this run's newest local checkpoint (if still there)."""
    if not config.resume:
        return None
    done = checkpoint.find_complete(Path(config.effective_output_dir) / "checkpoints")
    if not done or not (done[-1] / ADAPTER_CONFIG).is_file():
        return None
    recorded = adapter_base(done[-1])
    if recorded.is_dir():
        return recorded
    say(f"note: {done[-1].name} was trained on {recorded}, which is gone; "
        f"resolving --init-from {config.init_from} again")
    return None


def adapter_base(adapter_dir: Path) -> Path:
    """The base a LoRA checkpoint was trained on (itself possibly a LoRA checkpoint)."""
    try:
        base = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: unreadable ({err!r}); "
                              f"use another checkpoint") from None
    if not base:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG} does not name its base model "
                              f"(base_model_name_or_path); load it with generate.py --model BASE "
                              f"--adapter {adapter_dir}")
    return Path(base)


def check_base(path: Path) -> None:
    """CheckpointError unless ``path`` holds a loadable model (full or LoRA adapter)."""
    if not path.is_dir():
        raise CheckpointError(f"base model {path} is not a folder: pass --init-from PATH to a "
                              f"checkpoint or Hugging Face folder, or --init-from latest")
    if (path / checkpoint.MARKER).exists():
        problem = checkpoint.verify(path)
        if problem:
            raise CheckpointError(f"base checkpoint {path} is not usable: {problem}; "
                                  f"pick another checkpoint")
    if (path / ADAPTER_CONFIG).is_file():
        check_base(adapter_base(path))
        return
    if not (path / "config.json").is_file():
        raise CheckpointError(f"base model {path} has no config.json: pass a checkpoint or a "
                              f"Hugging Face GPT-NeoX folder")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "gpt_neox":
        raise CheckpointError(f"base model {path} is a {model_type!r} model; only GPT-NeoX "
                              f"(model_type gpt_neox) bases are supported")



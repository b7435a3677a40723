"""Where a LoRA stage starts: its base model and tokenizer, resolved and checked, no framework.

``--init-from`` names a folder, or ``latest``/a checkpoint name of ``--init-run`` (downloaded
from the bucket when only it has the checkpoint). A LoRA checkpoint as base is traced to its
own base (engines fuse it on load). Each engine loads the resolved folder its own way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from configs.training_config import TrainingConfig
from utils import checkpoint
from utils.checkpoint.format import ADAPTER_CONFIG
from utils.errors import CheckpointError
from utils.processes import ONE_PROCESS, Processes, local_main_first, printer
from utils.stages.examples import Encode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_TOKENIZER = Path("data/tokenizer")
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model"}


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

        store = open_bucket(config)
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


def resolve_tokenizer(base: Path) -> Path:
    """The tokenizer folder for a base: its own, its adapter's base's, its data's, data/tokenizer.

    Checkpoints carry their tokenizer; older ones are traced through the data_dir in their
    trainer_state.json to the ``tokenizer`` named in that data's dataset.json.
    """
    if (base / "tokenizer.json").is_file():
        return base
    if (base / ADAPTER_CONFIG).is_file():
        return resolve_tokenizer(adapter_base(base))
    candidates = [DEFAULT_TOKENIZER]
    try:
        data_dir = Path(json.loads((base / "trainer_state.json").read_text())["config"]["data_dir"])
        name = json.loads((data_dir / "dataset.json").read_text())["tokenizer"]
        candidates = [Path(name), data_dir / name, *candidates]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no record of the base's data: only the default is left
    for candidate in candidates:
        if (candidate / "tokenizer.json").is_file():
            return candidate
    raise CheckpointError(f"no tokenizer for base model {base}: it has no tokenizer.json and "
                          f"neither its data's dataset.json nor {DEFAULT_TOKENIZER} leads to one; "
                          f"copy the tokenizer files into {base}")


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.eos_token_id is None:
        raise CheckpointError(f"tokenizer {folder} has no EOS token, so answers cannot end; "
                              f"set eos_token in its tokenizer_config.json")
    return tokenizer


def encoder(tokenizer: PreTrainedTokenizerBase) -> Encode:
    """Batch encoding without special tokens (templates and EOS are added explicitly)."""
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenizer_dir(meta: dict, data_dir: Path) -> Path | None:
    """The data's tokenizer folder (dataset.json names it relative to the cwd or the data)."""
    name = meta.get("tokenizer")
    if not name:
        return None
    for candidate in (Path(name), data_dir / name):
        if (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def copy_tokenizer(source: Path | None, checkpoint_dir: Path) -> None:
    """A checkpoint is a whole HF folder: model + tokenizer (before its marker is written)."""
    if source is None:
        return
    for file in source.iterdir():
        if file.name in TOKENIZER_FILES:
            shutil.copy2(file, checkpoint_dir / file.name)

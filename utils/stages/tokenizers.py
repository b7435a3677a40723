"""The tokenizer that goes with a base model or a dataset: found, loaded, copied with checkpoints.

A checkpoint is a whole Hugging Face folder, so it carries its tokenizer; older checkpoints and
bare model folders are traced to one through their data's ``dataset.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from utils.checkpoint.format import ADAPTER_CONFIG
from utils.errors import CheckpointError
from utils.stages.examples import Encode
from utils.stages.init_from import adapter_base

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_TOKENIZER = Path("data/tokenizer")
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model"}


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

"""LoRA on torch through peft: the base model, adapters on it, resume and merge.

A base is one of our checkpoints or any local Hugging Face GPT-NeoX folder (resolved by
``utils/stages/init_from.py``); a LoRA checkpoint as base is merged onto its own base on load. DPO's
reference is the same model with the adapters disabled: never a second copy of the weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import GPTNeoXForCausalLM
from transformers.utils import logging as hf_logging

from configs.training_config import TrainingConfig
from utils.checkpoint.format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from utils.errors import CheckpointError, first_line
from utils.fs import staged_dir
from utils.stages.init_from import adapter_base, check_base
from utils.stages.tokenizers import load_tokenizer, resolve_tokenizer

# peft 0.21 reads a property transformers 5 deprecated, once per model: noise in every run log.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                        category=FutureWarning)


def load_base(path: Path) -> GPTNeoXForCausalLM:
    """GPT-NeoX in fp32 from safetensors; a LoRA checkpoint is loaded onto its base and merged."""
    hf_logging.disable_progress_bar()
    path = Path(path)
    check_base(path)
    if (path / ADAPTER_CONFIG).is_file():
        return PeftModel.from_pretrained(load_base(adapter_base(path)), path).merge_and_unload()
    try:
        return GPTNeoXForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"base model {path} could not be loaded ({first_line(err)}); it "
                              f"needs config.json and model.safetensors") from None


def build_lora_model(base: GPTNeoXForCausalLM, config: TrainingConfig,
                     base_path: Path) -> PeftModel:
    """Frozen base + trainable LoRA adapters; the adapter config records where the base is.

    peft records the model's own ``name_or_path`` instead of ours; a base that is itself a
    LoRA checkpoint (DPO or GRPO after SFT) was loaded from ITS base, so peft would name that
    one, and a merge would then skip the earlier stage's adapters: name ``base_path`` first.
    """
    base.name_or_path = str(base_path)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout,
                      target_modules=config.lora_targets,
                      task_type="CAUSAL_LM", base_model_name_or_path=str(base_path))
    return get_peft_model(base, lora)


def load_adapter_weights(model, ckpt_dir: Path) -> None:
    """Load a checkpoint's adapter_model.safetensors into a LoRA model (exact resume)."""
    has_adapter = (ckpt_dir / ADAPTER_WEIGHTS).is_file()
    if isinstance(model, PeftModel) != has_adapter:
        held = "LoRA adapters" if has_adapter else "full model weights"
        raise CheckpointError(f"checkpoint {ckpt_dir} holds {held} but this run trains "
                              f"{'LoRA adapters' if not has_adapter else 'a full model'}; resume "
                              f"with the --stage that wrote it, or start a new --run-name")
    result = set_peft_model_state_dict(model, load_file(ckpt_dir / ADAPTER_WEIGHTS))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise CheckpointError(f"checkpoint {ckpt_dir}: adapters do not match this model "
                              f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected, "
                              f"e.g. {(missing + result.unexpected_keys)[0]}); resume with the "
                              f"same --lora-target-modules as the run that wrote it")


def merge_adapter(ckpt_dir: Path, out_dir: Path) -> Path:
    """Write base + adapters merged as a plain Hugging Face folder (with tokenizer) at out_dir.

    Written under a hidden name and renamed: out_dir is either the old or the new model.
    """
    model = load_base(ckpt_dir)
    tokenizer = load_tokenizer(resolve_tokenizer(ckpt_dir))
    with staged_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir

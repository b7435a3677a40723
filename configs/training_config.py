"""One ``TrainingConfig`` dataclass and its presets: recipes as data.

Every field is also a command-line flag under its own name with dashes
(``configs/cli.py``), so a preset is only a set of defaults.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Literal

QUANT_BITS = (4, 8)  # QLoRA: the frozen base's linear layers in 4 or 8 bits
# A run name is one path component everywhere it is used (outputs/<name>,
# BUCKET/checkpoints/<name>, BUCKET/logs/<name>, shell commands): ".." or "a/b" would put a
# run's checkpoints (and --overwrite's deletions) outside its own folder.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RUN_NAME_RULE = ("use one name of letters, digits, '.', '_' and '-' starting with a letter or "
                 "digit, at most 100 characters (nested names are not supported)")


def run_name_problem(flag: str, name: str) -> str | None:
    """The one-line error for a run name that breaks :data:`RUN_NAME`, None if it is fine."""
    return None if RUN_NAME.fullmatch(name) else f"{flag} {name!r}: {RUN_NAME_RULE}"


@dataclass
class TrainingConfig:
    # What to train: pretraining from scratch, or a LoRA stage on a base model.
    stage: Literal["pretrain", "sft", "dpo", "grpo"] = "pretrain"
    model: str = "tiny"
    seq_len: int = 256
    init_from: str = ""  # sft/dpo base: a checkpoint or HF folder, or "latest" (of --init-run)
    init_run: str = "smoke"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: str = "query_key_value,dense"
    dpo_beta: float = 0.1
    # GRPO: per prompt, sample a group of completions, reward them, push towards the better.
    reward: str = "answer"  # comma-separated names from utils/stages/grpo.py's registry
    reward_module: str = ""  # path.py defining reward(prompt, completion, example) -> float
    grpo_group_size: int = 8
    grpo_temperature: float = 1.0
    grpo_max_new_tokens: int = 8
    grpo_beta: float = 0.04  # KL penalty to the base (the model with its adapters off)
    grpo_epsilon: float = 0.2  # PPO-style clipping of the probability ratio
    grpo_epochs: int = 1  # optimisation passes over each batch of generations
    group_by_length: bool = True  # LoRA stages: batches of similar lengths (less padding)
    quantize_bits: int = 0  # LoRA on a 4- or 8-bit frozen base (QLoRA; MLX backend); 0 = off
    topics: str = ""  # curriculum: a folder of topics, each with sft.jsonl and dpo.jsonl
    merge: bool = False  # also write a merged Hugging Face model at the end of a LoRA stage
    # Where things live. ``bucket`` is a gs:// URL or a local directory ("" = none).
    data_dir: str = "data/training"
    bucket: str = ""
    data_prefix: str = "training"
    sync_data: bool = False
    max_files: int = 0
    # A weighted mixture of sub-folders of data_dir (and of the bucket's data prefix):
    # "web=0.7,code=0.3", or a JSON file {"web": 0.7, "code": 0.3}; "" = one source.
    data_mix: str = ""
    # Stream shards from the bucket while training instead of syncing them all first.
    stream: bool = False
    prefetch_shards: int = 4  # streaming: shards fetched ahead of the one being read
    shuffle_block_shards: int = 8  # streaming: windows shuffle within blocks of this many shards
    cache_limit_gb: float = 0.0  # streaming: keep the local shards under this (0 = no limit)
    credentials: str = ""
    billing_project: str = ""  # requester-pays buckets: the project billed for requests
    output_dir: str = ""
    run_name: str = ""
    # Optimisation.
    max_steps: int = 200
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    # Precision and speed.
    mixed_precision: Literal["bf16", "fp16", "no"] = "no"
    compile: bool = False
    # What torch.compile wraps: each transformer layer ("layers": regional, fullgraph, quick to
    # compile) or the whole model ("model").
    compile_scope: Literal["layers", "model"] = "layers"
    # Pretraining attention: "causal" (no mask, flash/cuDNN eligible) or "sdpa" (transformers'
    # own, which builds a dense mask under compile; kept for benchmarks).
    attention: Literal["causal", "sdpa"] = "causal"
    # The LM head and cross-entropy run over this many tokens at a time, so full fp32 logits
    # never exist (0 = all at once, the plain transformers path).
    loss_chunk_tokens: int = 4096
    fp8: bool = False  # torchao float8 training of the transformer's linear layers (sm89+ GPUs)
    backend: Literal["torch", "mlx"] = "torch"
    num_workers: int = 0
    prefetch_factor: int = 2
    # Logging, evaluation, checkpoints.
    report_to: str = "tensorboard"  # comma-separated: tensorboard, wandb; or none
    wandb_project: str = ""  # default: the project named in the environment, else "harness"
    wandb_entity: str = ""
    log_upload_minutes: float = 5.0  # with a bucket: mirror logs to BUCKET/logs/<run_name>
    logging_steps: int = 10
    eval_steps: int = 100
    eval_windows: int = 64
    save_steps: int = 100
    save_interval_minutes: float = 0.0  # also save when this much time passed (0 = off)
    save_total_limit: int = 3
    remote_keep: int = 0  # complete checkpoints kept in the bucket (0 = all)
    keep_every_steps: int = 0  # ...plus, forever, every checkpoint whose step is a multiple
    # On SIGTERM/SIGINT: finish the step, save, upload what fits, exit 0 within this many
    # seconds of the signal (Compute Engine gives Spot VMs 30 s).
    preemption_budget_s: float = 25.0
    background_upload: bool = True
    upload_timeout_s: float = 60.0  # a SIGTERM during the end-of-run upload wait cuts it to this
    final_upload_timeout_s: float = 3600.0  # at the normal end of training
    resume: str = ""
    # A run name that already has checkpoints is refused without --resume; --overwrite
    # deletes them (locally and in the bucket) and starts over.
    overwrite: bool = False
    allow_seed_change: bool = False  # resume with another --seed (order and eval split change)
    peak_tflops: float = 0.0

    @property
    def effective_output_dir(self) -> str:
        return self.output_dir or f"outputs/{self.run_name}"

    def record(self) -> dict:
        """The config as checkpoints and TensorBoard record it: never a credentials value
        (a pasted key would otherwise be written into every checkpoint and event file)."""
        return {**asdict(self), "credentials": "(set)" if self.credentials else ""}

    @property
    def lora_targets(self) -> list[str]:
        """``lora_target_modules`` as a list of module names."""
        return [name.strip() for name in self.lora_target_modules.split(",") if name.strip()]


PRESETS: dict[str, TrainingConfig] = {
    # Tiny GPT-NeoX on the bundled sample, a local directory as the bucket:
    # the whole harness end to end in about two minutes on 2 CPU cores.
    "smoke": TrainingConfig(
        run_name="smoke", data_dir="data/training/sample", bucket="bucket", overwrite=True,
        max_steps=150, per_device_train_batch_size=8, learning_rate=2e-3, warmup_steps=15,
        logging_steps=10, eval_steps=50, eval_windows=32, save_steps=50,
    ),
    # LoRA SFT on the newest smoke checkpoint (train smoke first) with the bundled examples;
    # under a minute on 2 CPU cores. Writes outputs/sft/merged.
    "sft": TrainingConfig(
        stage="sft", run_name="sft", init_from="latest", init_run="smoke",
        data_dir="data/examples/sft", bucket="bucket", seq_len=64, max_steps=100,
        per_device_train_batch_size=8, learning_rate=3e-3, warmup_steps=10, lora_dropout=0.05,
        lora_target_modules="query_key_value,dense,dense_h_to_4h,dense_4h_to_h",
        logging_steps=10, eval_steps=50, eval_windows=8, save_steps=50, merge=True,
    ),
    # LoRA DPO on the newest sft checkpoint; the reference is that model with adapters off.
    "dpo": TrainingConfig(
        stage="dpo", run_name="dpo", init_from="latest", init_run="sft",
        data_dir="data/examples/dpo", bucket="bucket", seq_len=64, max_steps=60,
        per_device_train_batch_size=8, learning_rate=2e-3, warmup_steps=6, lora_dropout=0.0,
        dpo_beta=0.1, logging_steps=10, eval_steps=30, eval_windows=8, save_steps=30,
        merge=True,
    ),
    # LoRA GRPO on the newest sft checkpoint: "which is smaller" of two digits, rewarded by
    # the number the model writes (partial credit for near misses, plus exact hits);
    # eval_reward = greedy completions' reward on held-out prompts. The SFT base answers " 11"
    # to them all (reward ~0.02); 60 steps move its greedy answers to small digits (no KL
    # penalty: with --grpo-beta 0.04 the MLX run's greedy answers had not moved by step 60).
    "grpo": TrainingConfig(
        stage="grpo", run_name="grpo", init_from="latest", init_run="sft",
        data_dir="data/examples/grpo", bucket="bucket", seq_len=64, max_steps=60,
        per_device_train_batch_size=8, learning_rate=5e-3, warmup_steps=4, lora_dropout=0.0,
        reward="numeric_partial,numeric", grpo_group_size=8, grpo_max_new_tokens=3,
        grpo_beta=0.0,
        logging_steps=5, eval_steps=20, eval_windows=32, save_steps=20, merge=True,
    ),
    # The seed's TestConfig: the 1.2B model on a few files.
    "test": TrainingConfig(
        run_name="test", model="neox-1.2b", seq_len=2048, sync_data=True, max_files=5,
        max_steps=1000, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=2e-4, warmup_steps=100, save_steps=200, logging_steps=25,
        eval_steps=200, mixed_precision="bf16", compile=True,
    ),
    # The seed's ProductionConfig: all files, bucket from a flag or $HARNESS_BUCKET.
    "production": TrainingConfig(
        run_name="production", model="neox-1.2b", seq_len=2048, sync_data=True,
        max_steps=10000, per_device_train_batch_size=4, gradient_accumulation_steps=4,
        learning_rate=2e-4, warmup_steps=500, save_steps=500, logging_steps=100,
        eval_steps=500, mixed_precision="bf16", compile=True, num_workers=4, prefetch_factor=4,
    ),
}


def preset(name: str, **overrides) -> TrainingConfig:
    """A copy of a preset with overrides applied (``KeyError`` for an unknown name)."""
    return replace(PRESETS[name], **overrides)


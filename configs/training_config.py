"""One ``TrainingConfig`` dataclass and its presets: recipes as data.

Every field is also a command-line flag under its own name with dashes
(``configs/cli.py``), so a preset is only a set of defaults. Each field carries its help text
and its section (:class:`Section`), from which ``--help`` and the README's flag reference are
rendered.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal, TypeVar

from utils.errors import ConfigError

T = TypeVar("T")
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


TRACKERS = ("tensorboard", "wandb")  # what --report-to may list (or "none")


def report_to(value: str) -> list[str]:
    """``--report-to`` as a list of trackers (``none`` or nothing: []); ConfigError naming the
    valid ones for anything else."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in (*TRACKERS, "none")]
    if unknown or ("none" in names and len(names) > 1):
        what = (f"unknown tracker {', '.join(map(repr, unknown))}" if unknown
                else "none cannot be combined with a tracker")
        raise ConfigError(f"--report-to {value!r}: {what}; valid: {', '.join(TRACKERS)} "
                          f"(comma-separated), or none")
    return [name for name in dict.fromkeys(names) if name != "none"]


@dataclass(frozen=True)
class Section:
    """A group of flags, in ``--help`` and in the README's flag reference.

    Calling a section makes a field: its default and its help text, written once here, next
    to the field, so the parser (``configs/cli.py``) and the README's tables
    (``configs/flag_table.py``) render the same words. The text says what the flag does and
    its unit; the parser adds the default and the accepted range, so the text never repeats
    them.
    """

    title: str

    def __call__(self, default: T, help: str) -> T:
        return field(default=default, metadata={"help": help, "section": self.title})


RUN = Section("run and launch")
MODEL = Section("model and precision")
DATA = Section("data and streaming")
BUCKET = Section("bucket and credentials")
OPTIM = Section("optimisation")
CHECKPOINTS = Section("checkpoints and uploads")
LOGGING = Section("logging, evaluation and tracking")
STAGES = Section("fine-tuning stages: LoRA SFT, DPO and GRPO")
SECTIONS = (RUN, MODEL, DATA, BUCKET, OPTIM, CHECKPOINTS, LOGGING, STAGES)  # --help's order


@dataclass(frozen=True)
class BucketSettings:
    """What opens the run's bucket: all that the storage layer is handed
    (``utils.storage.open_bucket``), so it never sees the rest of a run's settings."""

    bucket: str
    credentials: str
    billing_project: str
    upload_streams: int


@dataclass(frozen=True)
class RetentionSettings:
    """What the checkpoint publisher keeps (locally and in the bucket), uploads in the
    background, and how long an exit waits for it (``CheckpointPublisher.for_run``)."""

    background_upload: bool
    save_total_limit: int
    remote_keep: int
    keep_every_steps: int
    upload_timeout_s: float


S = TypeVar("S")


def settings_of(config: TrainingConfig, kind: type[S]) -> S:
    """The section ``kind`` (a dataclass named after the config's fields) of ``config``."""
    return kind(**{f.name: getattr(config, f.name) for f in fields(kind)})


@dataclass
class TrainingConfig:
    """Every setting of a run; each field is the flag of the same name with dashes.

    Sections and help texts live in the fields' metadata only: checkpoints and trackers still
    record the flat dict (``record()``), so ``TrainingConfig(**recorded)`` reads back any
    checkpoint, including those written before the help texts existed.
    """

    stage: Literal["pretrain", "sft", "dpo", "grpo"] = STAGES(
        "pretrain", "pretrain a model from scratch, or train LoRA adapters on --init-from")
    model: str = MODEL(
        "tiny", "GPT-NeoX size (configs/model_config.py), built from config, never downloaded")
    seq_len: int = MODEL(
        256, "the pretraining window; longer SFT/DPO examples are cut, a GRPO prompt and its "
             "completion fit in it")
    init_from: str = STAGES(
        "", "the LoRA base: a checkpoint or Hugging Face GPT-NeoX folder, or latest (or a "
            "checkpoint name) of --init-run")
    init_run: str = STAGES(
        "smoke", "the run whose checkpoints --init-from latest picks from "
                 "(outputs/RUN/checkpoints, else BUCKET/checkpoints/RUN)")
    lora_r: int = STAGES(16, "LoRA rank of each adapter")
    lora_alpha: int = STAGES(32, "LoRA scale numerator: adapter updates are scaled by alpha / r")
    lora_dropout: float = STAGES(0.1, "dropout probability on the adapters' input")
    lora_target_modules: str = STAGES(
        "query_key_value,dense", "the GPT-NeoX linear layers that get adapters")
    dpo_beta: float = STAGES(
        0.1, "DPO beta: how far the policy may move from the reference (the base, adapters "
             "off); larger = closer")
    reward: str = STAGES(
        "answer", "GRPO: comma-separated rewards (REWARDS in utils/stages/grpo.py, or "
                  "--reward-module's file stem), averaged per completion")
    reward_module: str = STAGES(
        "", "GRPO: a .py file defining reward(prompt, completion, example) -> float, used too "
            "(trusted code: it is run as is)")
    grpo_group_size: int = STAGES(8, "GRPO: completions sampled per prompt")
    grpo_temperature: float = STAGES(1.0, "GRPO: sampling temperature of the completions")
    grpo_max_new_tokens: int = STAGES(8, "GRPO: longest completion, in tokens")
    grpo_beta: float = STAGES(
        0.04, "GRPO: weight of the KL penalty to the base (the model with its adapters off)")
    grpo_epsilon: float = STAGES(
        0.2, "GRPO: PPO-style clipping of the probability ratio to 1 +- epsilon")
    grpo_epochs: int = STAGES(
        1, "GRPO: optimizer updates on each batch of generations (TRL's num_iterations)")
    group_by_length: bool = STAGES(
        True, "LoRA stages: batch examples of similar length (less padding)")
    quantize_bits: int = STAGES(
        0, "QLoRA: the frozen base's linear layers in 4 or 8 bits (MLX backend only)")
    topics: str = STAGES(
        "", "curriculum: a folder of topics, each with sft.jsonl, dpo.jsonl (and grpo.jsonl), "
            "trained in turn; empty = off")
    merge: bool = STAGES(
        False, "also write a merged Hugging Face model (OUTPUT_DIR/merged) at the end of a "
               "LoRA stage")
    data_dir: str = DATA(
        "data/training", "local data: pretraining shards (.npy/.npz/.bin, nested) or the "
                         "stage's .jsonl files; where --sync-data and --stream write")
    bucket: str = BUCKET(
        "", "gs://NAME/PREFIX or a local folder: data source, checkpoint and log destination; "
            "empty = none ($HARNESS_BUCKET with --sync-data)")
    data_prefix: str = DATA("training", "where the data lives in the bucket: BUCKET/DATA_PREFIX")
    sync_data: bool = DATA(
        False, "download BUCKET/DATA_PREFIX into --data-dir before training (skips files "
               "already there)")
    max_files: int = DATA(0, "use only the first N data files, in path order")
    data_mix: str = DATA(
        "", "pretraining mixture of --data-dir sub-folders: web=0.7,code=0.3 or a JSON file of "
            "the same; empty = one source")
    stream: bool = DATA(
        False, "pretraining: fetch shards from the bucket while training instead of syncing "
               "them first")
    prefetch_shards: int = DATA(4, "streaming: shards fetched ahead of the one being read")
    shuffle_block_shards: int = DATA(
        8, "streaming: windows shuffle within blocks of this many shards (more = more mixing, "
           "more disk)")
    cache_limit_gb: float = DATA(0.0, "streaming: keep the local shards under this size")
    credentials: str = BUCKET(
        "", "service-account JSON key file (a bare name is looked up in credentials/); empty = "
            "$GOOGLE_APPLICATION_CREDENTIALS, then Application Default Credentials")
    billing_project: str = BUCKET(
        "", "requester-pays buckets: the GCP project billed for requests; empty = "
            "$HARNESS_BILLING_PROJECT")
    output_dir: str = RUN(
        "", "local folder for checkpoints, logs and metrics.jsonl; empty = outputs/RUN_NAME")
    run_name: str = RUN(
        "", "the run's name: outputs/RUN_NAME, BUCKET/checkpoints/RUN_NAME, BUCKET/logs/RUN_NAME")
    max_steps: int = OPTIM(200, "optimizer steps to train; the learning rate decays to it")
    per_device_train_batch_size: int = OPTIM(
        8, "sequences per process per micro-batch (GRPO: prompts, each sampled "
           "--grpo-group-size times); auto = --auto-micro-batch")
    gradient_accumulation_steps: int = OPTIM(
        1, "micro-batches accumulated into each optimizer step")
    auto_micro_batch: bool = OPTIM(
        False, "torch pretraining: run each step's sequences (per device x accumulation, "
               "what the data position counts) in the largest micro-batches that fit the "
               "device: a start-up probe on CUDA, an estimate elsewhere; printed in the "
               "banner. --per-device-train-batch-size auto turns it on, a number off")
    learning_rate: float = OPTIM(
        3e-4, "peak learning rate, reached after --warmup-steps, then cosine decay")
    min_lr_ratio: float = OPTIM(
        0.1, "the learning rate at --max-steps, as a fraction of --learning-rate")
    warmup_steps: int = OPTIM(20, "optimizer steps of linear warmup")
    weight_decay: float = OPTIM(0.1, "AdamW weight decay of the matrices (not biases or norms)")
    adam_beta1: float = OPTIM(0.9, "AdamW beta1: decay of the gradient's running mean")
    adam_beta2: float = OPTIM(0.95, "AdamW beta2: decay of the squared gradient's running mean")
    adam_epsilon: float = OPTIM(1e-8, "AdamW epsilon, added to the update's denominator")
    max_grad_norm: float = OPTIM(1.0, "clip the gradients' global L2 norm to this")
    max_skipped_steps: int = OPTIM(
        10, "updates whose loss or gradient norm is not finite are skipped on the device (no "
            "weight, moment or step count changes, counted as skipped_steps); more than this "
            "many in a row roll the run back (--max-rollbacks), then stop it, unsaved")
    spike_zscore: float = OPTIM(
        6.0, "a logged loss or gradient norm this many standard deviations above its last 20 "
             "logged values is reported as a spike (a line, metrics.jsonl, TensorBoard); 0 = "
             "off")
    max_rollbacks: int = OPTIM(
        2, "in-process rollbacks to the newest checkpoint of the run's line, the windows read "
           "since skipped, when updates keep failing (--max-skipped-steps); 0 = stop instead")
    rollback_lr_factor: float = OPTIM(
        1.0, "after a rollback, the learning rate is multiplied by this for "
             "--rollback-lr-steps steps (kept across a resume); 1 = unchanged")
    rollback_lr_steps: int = OPTIM(
        100, "how many steps after a rollback the learning rate stays lowered "
             "(--rollback-lr-factor)")
    seed: int = RUN(
        42, "seeds the model's initialisation, the data order and the held-out split")
    mixed_precision: Literal["bf16", "fp16", "no"] = MODEL(
        "no", "compute precision over fp32 weights: bf16, fp16 (torch only) or no (fp32)")
    compile: bool = MODEL(False, "compile the model (torch.compile) or the step (mx.compile)")
    compile_scope: Literal["layers", "model"] = MODEL(
        "layers", "what torch.compile wraps: each transformer layer (quick to compile) or the "
                  "whole model")
    attention: Literal["causal", "sdpa"] = MODEL(
        "causal", "pretraining attention (torch): causal SDPA with no mask (flash/cuDNN "
                  "eligible), or transformers' sdpa (a dense mask under compile; benchmarks)")
    loss_chunk_tokens: int = MODEL(
        4096, "torch: the LM head and cross-entropy run over this many tokens at a time, so "
              "full fp32 logits never exist")
    fp8: bool = MODEL(
        False, "torchao float8 training of the transformer's linear layers (pretraining; "
               "sm89+ GPUs)")
    backend: Literal["torch", "mlx"] = RUN(
        "torch", "training engine: torch (accelerate: CPU, CUDA, DDP/FSDP) or mlx (MLX)")
    collective_timeout_minutes: float = RUN(
        60.0, "torch, several processes: how long one waits in a collective for the others "
              "(another machine's data sync or checkpoint download, a stalled rank) before "
              "the job stops with one line; torch's own default is 10 (NCCL), too short for a "
              "large --sync-data")
    num_workers: int = DATA(0, "torch DataLoader worker processes per training process")
    prefetch_factor: int = DATA(
        2, "batches each DataLoader worker reads ahead (with --num-workers above 0)")
    report_to: str = LOGGING(
        "tensorboard", "trackers besides metrics.jsonl")
    callbacks: str = LOGGING(
        "", "your own loop callbacks, FILE.py:ClassName comma-separated: classes answering the "
            "events of utils.loop.callbacks.Callback, made with no arguments; trusted code, run "
            "in every process")
    wandb_project: str = LOGGING(
        "", "W&B project; empty = $WANDB_PROJECT, else harness")
    wandb_entity: str = LOGGING("", "W&B team or user; empty = your default entity")
    log_upload_minutes: float = LOGGING(
        5.0, "with a bucket: copy the logs and metrics.jsonl to BUCKET/logs/RUN_NAME this "
             "often, in minutes")
    logging_steps: int = LOGGING(10, "log metrics every this many optimizer steps, and at the last")
    eval_steps: int = LOGGING(
        100, "evaluate on the held-out data every this many optimizer steps, and at the last")
    eval_windows: int = LOGGING(
        64, "held-out windows for evaluation (LoRA stages: examples, at most a tenth of them)")
    eval_tasks: str = LOGGING(
        "", "downstream tasks scored on eval steps (and before the first): shipped names "
            "(data/eval_tasks/NAME.jsonl) or .jsonl paths, comma-separated; logged as "
            "eval/TASK/acc, acc_norm or ppl; empty = none")
    eval_task_examples: int = LOGGING(
        100, "--eval-tasks: the first this many examples of each task (0 = all)")
    save_steps: int = CHECKPOINTS(
        100, "save a checkpoint every this many optimizer steps, and at the last")
    save_interval_minutes: float = CHECKPOINTS(
        0.0, "also save when this many minutes passed since the last save")
    save_total_limit: int = CHECKPOINTS(
        3, "complete checkpoints kept locally (an older one goes once a newer one is in the "
           "bucket)")
    remote_keep: int = CHECKPOINTS(0, "complete checkpoints kept in the bucket")
    keep_every_steps: int = CHECKPOINTS(
        0, "keep forever every checkpoint whose step is a multiple of this (in the bucket, "
           "else locally)")
    preemption_budget_s: float = CHECKPOINTS(
        25.0, "on SIGTERM/SIGINT: finish the step, save, upload what fits and exit 0 within "
              "this budget")
    background_upload: bool = CHECKPOINTS(
        True, "upload checkpoints on a background thread while training goes on")
    upload_streams: int = CHECKPOINTS(
        16, "parallel connections to the bucket: a file over 12 MiB moves as that many "
            "slices (uploads, resume downloads and data sync)")
    upload_timeout_s: float = CHECKPOINTS(
        60.0, "the longest wait for uploads after a signal or a crash")
    final_upload_timeout_s: float = CHECKPOINTS(
        3600.0, "the longest wait for uploads at the normal end of training")
    resume: str = CHECKPOINTS(
        "", "latest (the newest good checkpoint, local or bucket) or a checkpoint name; "
            "empty = start fresh")
    overwrite: bool = CHECKPOINTS(
        False, "a run name that has checkpoints: delete them (locally and in the bucket) and "
               "start over")
    allow_seed_change: bool = CHECKPOINTS(
        False, "resume with another --seed (the data order and held-out split change)")
    peak_tflops: float = LOGGING(0.0, "the device's dense peak in TFLOP/s, the MFU denominator")

    @property
    def effective_output_dir(self) -> str:
        return self.output_dir or f"outputs/{self.run_name}"

    def record(self) -> dict:
        """The config as checkpoints and TensorBoard record it: never a credentials value
        (a pasted key would otherwise be written into every checkpoint and event file)."""
        return {**asdict(self), "credentials": "(set)" if self.credentials else ""}

    @property
    def bucket_settings(self) -> BucketSettings:
        return settings_of(self, BucketSettings)

    @property
    def retention(self) -> RetentionSettings:
        return settings_of(self, RetentionSettings)

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
        auto_micro_batch=True,  # 16 sequences per step as before, 8 x 2 on an H100
        learning_rate=2e-4, warmup_steps=500, save_steps=500, logging_steps=100,
        eval_steps=500, mixed_precision="bf16", compile=True, num_workers=4, prefetch_factor=4,
    ),
}


def preset(name: str, **overrides) -> TrainingConfig:
    """A copy of a preset with overrides applied (``KeyError`` for an unknown name)."""
    return replace(PRESETS[name], **overrides)


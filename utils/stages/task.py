"""A stage as the shared loop sees it: examples, their split, collate and token count.

Pretraining, LoRA SFT, DPO and GRPO differ here and in their loss (``utils/stages/step.py``
picks it; the math is per engine: ``utils/torch_engine/losses.py``,
``utils/mlx_engine/losses.py``). Everything in a Task is framework-neutral: batches are numpy
arrays, which each engine turns into its own tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from configs.model_config import hf_config_for
from configs.training_config import TrainingConfig
from utils.data import (
    ConcatWindows,
    DataPosition,
    MixtureBatchSampler,
    MixturePosition,
    Source,
    TokenWindows,
    WindowBatchSampler,
    find_shards,
    read_dataset_meta,
    source_weights,
    split_count,
    train_eval_split,
)
from utils.errors import CheckpointError
from utils.processes import ONE_PROCESS, Processes, local_main_first
from utils.stages.examples import (
    IGNORE,
    data_files,
    example_lengths,
    load_dpo,
    load_sft,
    pad_dpo,
    pad_sft,
)
from utils.stages.grpo import (
    Sampling,
    load_grpo,
    load_rewards,
    pad_prompts,
    prompt_lengths,
    rollout,
)
from utils.stages.init_from import resolve_base
from utils.stages.tokenizers import encoder, load_tokenizer, resolve_tokenizer
from utils.streaming.sources import StreamFeed, open_source

Batch = dict[str, np.ndarray]


@dataclass
class Task:
    stage: str                      # pretrain, sft, dpo or grpo: its loss (step.STAGE_LOSSES)
    examples: Sequence              # map-style; indexed by the WindowBatchSampler
    train_idx: np.ndarray
    eval_idx: np.ndarray
    num_files: int
    collate: Callable[[list], Batch]
    count_tokens: Callable[[Batch], int]  # real (non-padding) tokens of a batch
    # SFT: the answer tokens a batch trains on. The loss of an optimizer step is their mean
    # over the whole step (all micro-batches, all processes), not a mean of per-batch means.
    count_targets: Callable[[Batch], int] | None = None
    lengths: np.ndarray | None = None  # per example: the sampler groups batches by length
    meta: dict = field(default_factory=dict)  # dataset.json; "tokenizer" names its folder
    base_path: Path | None = None   # LoRA stages: the model the adapters train on
    vocab_size: int = 0             # LoRA stages: the tokenizer's (the base must cover it)
    # GRPO: how the engine samples completions of a prompt batch, and what turns the prompts
    # and completions into a scored training batch (+ statistics). None for other stages.
    sampling: Sampling | None = None
    rollout: Callable[[Batch, np.ndarray], tuple[Batch, dict[str, float]]] | None = None
    passes: int = 1  # optimizer updates per step's batches (GRPO: --grpo-epochs per rollout)
    # The held-out number's name in metrics and logs (GRPO's is the mean reward of greedy
    # completions, which the run raises), and whether the loop records it before the first
    # step too (GRPO: the base's reward, the baseline the run improves on).
    eval_metric: str = "eval_loss"
    eval_before_training: bool = False
    # --data-mix: the weighted sources the training windows are drawn from (None: one source).
    sources: list[Source] | None = None
    # --stream: each source's epoch order (block-shuffled, in global ids) and the caches.
    orders: list[Callable[[int], np.ndarray]] | None = None
    feed: StreamFeed | None = None

    def start_position(self) -> DataPosition | MixturePosition:
        """Where a fresh run starts in the data."""
        if self.sources is None:
            return DataPosition()
        return MixturePosition.start([source.name for source in self.sources])

    def sampler(self, per_device_batch: int, rank: int, world: int, seed: int,
                position: DataPosition | MixturePosition
                ) -> WindowBatchSampler | MixtureBatchSampler:
        """The order this rank trains on from ``position`` (of :meth:`start_position`'s kind:
        the loop refuses a checkpoint with the other kind)."""
        if isinstance(position, MixturePosition):
            return MixtureBatchSampler(self.sources, per_device_batch, rank, world, seed,
                                       position, self.orders)
        return WindowBatchSampler(self.train_idx, per_device_batch, rank, world, seed,
                                  position, self.lengths,
                                  order=self.orders[0] if self.orders else None)

    def check_vocab(self, model_vocab: int) -> None:
        """CheckpointError if the tokenizer has ids the base model cannot embed."""
        if self.vocab_size > model_vocab:
            raise CheckpointError(
                f"the tokenizer of {self.base_path} has {self.vocab_size} tokens but the model "
                f"only {model_vocab}: they do not belong together; pass the base's own tokenizer")


def build_task(config: TrainingConfig, processes: Processes) -> Task:
    """The task for ``config.stage``."""
    if config.stage == "pretrain":
        return pretrain_task(config, processes)
    return finetune_task(config, processes)


def pretrain_task(config: TrainingConfig, processes: Processes = ONE_PROCESS) -> Task:
    """Shards under ``data_dir`` (or its ``--data-mix`` sub-folders; with ``--stream``, of
    the bucket's data prefix) as fixed windows, split into training and held-out ones.

    Every token id must fit the model's vocabulary (another tokenizer's shards would fail deep
    in the model, on a GPU as a device-side assert): each machine's main process scans the
    shards once (cached), the others then read the cache. Streamed shards are not local yet:
    the cache checks each one as it arrives.
    """
    root = Path(config.data_dir)
    weights = source_weights(config.data_mix)
    held_out = split_count(config.eval_windows, list(weights.values()))
    parts, sources, eval_idx, orders, streamed, num_files = [], [], [], [], [], 0
    for (name, weight), n_eval in zip(weights.items(), held_out, strict=True):
        start = sum(len(p) for p in parts)
        if config.stream:
            source = open_source(config, name, n_eval, processes)
            windows, train, held = source.windows, source.train, source.held_out
            orders.append(lambda epoch, source=source, start=start: source.order(epoch) + start)
            streamed.append(source)
            num_files += len(source.shards)
        else:
            shards = find_shards(root / name, config.max_files or None)
            windows = TokenWindows(shards, config.seq_len, root=root / name)
            train, held = train_eval_split(len(windows), n_eval, config.seed)
            num_files += len(shards)
        parts.append(windows)
        sources.append(Source(name, weight, train + start))
        eval_idx.append(held + start)
    examples = parts[0] if len(parts) == 1 and not config.data_mix else ConcatWindows(parts)
    meta = read_dataset_meta(root / next(iter(weights))) or read_dataset_meta(root) or {}
    vocab_size = hf_config_for(config.model, meta).vocab_size
    if not config.stream:
        with local_main_first(processes):
            examples.check_vocab(vocab_size)
    return Task(stage="pretrain", examples=examples,
                train_idx=np.concatenate([s.indices for s in sources]),
                eval_idx=np.concatenate(eval_idx), num_files=num_files,
                collate=_stack_windows,
                count_tokens=lambda batch: len(batch["input_ids"]) * config.seq_len,
                meta=meta, sources=sources if config.data_mix else None,
                orders=orders or None,
                feed=StreamFeed(streamed, config, vocab_size) if streamed else None)


def _stack_windows(windows: list[np.ndarray]) -> Batch:
    return {"input_ids": np.stack(windows)}


def _real_tokens(batch: Batch) -> int:
    return int(batch["attention_mask"].sum())


def _answer_targets(batch: Batch) -> int:
    """Positions that predict an answer token (position t predicts label t+1)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def finetune_task(config: TrainingConfig, processes: Processes) -> Task:
    """Resolve the base and its tokenizer, then read, check and tokenize the stage's data."""
    base_path = resolve_base(config, processes)
    tokenizer = load_tokenizer(resolve_tokenizer(base_path))
    files = data_files(config.data_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    if config.stage == "grpo":
        examples = load_grpo(files, encoder(tokenizer),
                             config.seq_len - config.grpo_max_new_tokens)
        collate, lengths = partial(pad_prompts, pad_id=pad_id), prompt_lengths(examples)
    else:
        load = load_dpo if config.stage == "dpo" else load_sft
        examples = load(files, encoder(tokenizer), tokenizer.eos_token_id, config.seq_len)
        collate = partial(pad_dpo if config.stage == "dpo" else pad_sft, pad_id=pad_id)
        lengths = example_lengths(examples)
    # Held out: --eval-windows examples, at most a tenth of the data (small datasets).
    n_eval = min(config.eval_windows, max(1, len(examples) // 10)) if len(examples) > 1 else 0
    train_idx, eval_idx = train_eval_split(len(examples), n_eval, config.seed)
    # The loop copies every file of meta["tokenizer"] into each checkpoint: give it a folder
    # with the tokenizer alone (the base's folder also holds weights and training state).
    own_tokenizer = Path(config.effective_output_dir) / "tokenizer"
    with local_main_first(processes):
        if processes.is_local_main_process:
            tokenizer.save_pretrained(own_tokenizer)
    task = Task(stage=config.stage, examples=examples, train_idx=train_idx, eval_idx=eval_idx,
                num_files=len(files), collate=collate, count_tokens=_real_tokens,
                count_targets=_answer_targets if config.stage == "sft" else None,
                lengths=lengths if config.group_by_length else None,
                meta={"tokenizer": str(own_tokenizer)}, base_path=base_path,
                vocab_size=len(tokenizer))
    if config.stage == "grpo":
        _make_grpo(task, config, tokenizer, pad_id)
    return task


def _make_grpo(task: Task, config: TrainingConfig, tokenizer, pad_id: int) -> None:
    """GRPO's sampling and rollout on a Task (the rewards are loaded, so checked, at start)."""
    task.sampling = Sampling(config.grpo_group_size, config.grpo_temperature,
                             config.grpo_max_new_tokens, tokenizer.eos_token_id, pad_id)
    task.rollout = partial(rollout, examples=task.examples,
                           rewards=load_rewards(config.reward, config.reward_module),
                           decode=partial(tokenizer.decode, skip_special_tokens=True),
                           sampling=task.sampling)
    task.passes = config.grpo_epochs
    task.eval_metric, task.eval_before_training = "eval_reward", True

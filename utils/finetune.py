"""LoRA fine-tuning stages on the shared loop: SFT and DPO data, collate, losses, peft model.

Data (plain Python + numpy, so the MLX mirror can share it):

* SFT: JSONL lines ``{"messages": [{"role", "content"}, ...]}``, ``{"prompt", "completion"}``
  or ``{"question", "answer"}``.
* DPO: JSONL lines ``{"prompt", "chosen", "rejected"}``.

Every example becomes ``input_ids`` plus ``labels`` that are -100 on prompt tokens, so the loss
covers only answer tokens (and the EOS that ends each answer: the model learns to stop).
Batches are right-padded: labels -100 and attention_mask 0 on padding.

Model: a GPT-NeoX base (one of our checkpoints, the newest checkpoint of a run, any local
Hugging Face GPT-NeoX folder, or a LoRA checkpoint, merged onto its own base on load) wrapped
in peft's LoRA; only the adapters train. DPO's reference is that same model with the adapters
disabled, so there is never a second copy of the weights.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from configs.cli import ConfigError
from configs.training_config import TrainingConfig
from utils import checkpoint
from utils.checkpoint import CheckpointError
from utils.data_utils import DataError, train_eval_split

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerBase

    from utils.tasks import Task

IGNORE = -100  # label of a token that is not trained on (prompt, padding)
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")  # GPT-NeoX
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TOKENIZER = Path("data/tokenizer")
# How prompts are written around the user's text; generate.py uses the same templates.
TEMPLATES = {"raw": "{}", "question": "Question: {}\nAnswer:", "chat": "User: {}\nAssistant:"}
_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
_ENCODE_CHUNK = 1024  # texts per tokenizer call
# peft 0.21 reads a property transformers 5 deprecated, once per model: noise in every run log.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                        category=FutureWarning)

Segment = tuple[str, bool]  # (text, is_answer)
Encode = Callable[[list[str]], list[list[int]]]  # a batch of texts -> token ids, no specials
Example = dict[str, np.ndarray]


# ================================================================ data (no torch)

def format_prompt(text: str, template: str = "raw") -> str:
    """The prompt the model was fine-tuned on for ``text`` (``question``/``chat`` data)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template].format(text)


def data_files(data_dir: str | Path) -> list[Path]:
    """A .jsonl file, or every .jsonl file directly in a folder (sorted: a stable order)."""
    path = Path(data_dir)
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else []
    if not files:
        raise DataError(f"no .jsonl files at {path}: point --data-dir at a .jsonl file or a "
                        f"folder of them (see data/examples/)")
    return files


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, record) for every non-blank line; one-line errors name file and line."""
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); "
                                    f"write one JSON object per line") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object, got {_kind(record)}; "
                                    f"write one JSON object per line")
                yield where, record
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                        f"save it as UTF-8") from None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in record:
        found = ", ".join(sorted(record)) or "no keys"
        raise DataError(f"{where}: missing key {key!r} (found {found}); add it")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {_kind(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: {key!r} is empty; give it text or remove the line")
    return value


def sft_segments(record: dict, where: str) -> list[Segment]:
    """The example as prompt and answer pieces, whichever of the three SFT formats it uses."""
    if "messages" in record:
        return _chat_segments(record["messages"], where)
    if "prompt" in record or "completion" in record:
        return [(_text(record, "prompt", where, allow_empty=True), False),
                (_text(record, "completion", where), True)]
    if "question" in record or "answer" in record:
        return [(format_prompt(_text(record, "question", where), "question"), False),
                (" " + _text(record, "answer", where), True)]
    raise DataError(f"{where}: not an SFT example: expected 'messages', 'prompt' + 'completion' "
                    f"or 'question' + 'answer', found {', '.join(sorted(record)) or 'no keys'}")


def _chat_segments(messages: Any, where: str) -> list[Segment]:
    """System/user turns are prompt; every assistant turn is an answer (trained)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of "
                        f"{{\"role\", \"content\"}} objects, got {_kind(messages)}")
    segments: list[Segment] = []
    for i, message in enumerate(messages):
        here = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{here} must be an object with 'role' and 'content', "
                            f"got {_kind(message)}")
        role = message.get("role")
        if role not in _ROLES:
            raise DataError(f"{here}: role must be one of {', '.join(_ROLES)}, got {role!r}")
        content = _text(message, "content", here)
        if role == "assistant":
            segments += [("Assistant:", False), (" " + content, True)]
        else:
            segments.append((f"{_ROLES[role]}: {content}\n", False))
    if not any(answer for _, answer in segments):
        raise DataError(f"{where}: no 'assistant' message, so nothing to train on; add one")
    return segments


def dpo_triple(record: dict, where: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected); the answers must be non-empty strings."""
    return (_text(record, "prompt", where, allow_empty=True), _text(record, "chosen", where),
            _text(record, "rejected", where))


def _merged(segments: list[Segment]) -> list[Segment]:
    """Adjacent prompt pieces joined: tokenized as one text, as at generation time."""
    out: list[Segment] = []
    for text, answer in segments:
        if out and not answer and not out[-1][1]:
            out[-1] = (out[-1][0] + text, False)
        else:
            out.append((text, answer))
    return out


def tokenize(examples: list[tuple[str, list[Segment]]], encode: Encode, eos_id: int,
             seq_len: int) -> list[Example]:
    """``input_ids``/``labels`` per example: labels -100 on prompt tokens, EOS after answers.

    An example longer than ``seq_len`` is cut at the end; one left without any answer token to
    predict is an error naming its line (a silently untrained example hides a data problem).
    """
    pieces = [_merged(segments) for _, segments in examples]
    texts = [text for segments in pieces for text, _ in segments]
    ids: list[list[int]] = []
    chunks = range(0, len(texts), _ENCODE_CHUNK)
    for start in tqdm(chunks, desc="tokenizing", unit="chunk", disable=len(chunks) < 10):
        ids += encode(texts[start:start + _ENCODE_CHUNK])
    out, k = [], 0
    for (where, _), segments in zip(examples, pieces, strict=True):
        tokens: list[int] = []
        labels: list[int] = []
        for _, answer in segments:
            piece = ids[k] + [eos_id] if answer else ids[k]
            k += 1
            tokens += piece
            labels += piece if answer else [IGNORE] * len(piece)
        if len(tokens) > seq_len:
            tokens, labels = tokens[:seq_len], labels[:seq_len]
        if all(label == IGNORE for label in labels[1:]):
            raise DataError(f"{where}: no answer token left within --seq-len {seq_len} (the "
                            f"prompt takes {len(tokens)} tokens); raise --seq-len or shorten it")
        out.append({"input_ids": np.array(tokens, dtype=np.int64),
                    "labels": np.array(labels, dtype=np.int64)})
    return out


def load_sft(files: Sequence[Path], encode: Encode, eos_id: int, seq_len: int) -> list[Example]:
    """Every SFT example of ``files``, validated line by line, then tokenized."""
    parsed = [(where, sft_segments(record, where)) for path in files
              for where, record in read_jsonl(path)]
    if not parsed:
        raise DataError(f"no examples in {', '.join(map(str, files))}; add JSONL lines")
    return tokenize(parsed, encode, eos_id, seq_len)


def load_dpo(files: Sequence[Path], encode: Encode, eos_id: int, seq_len: int) -> list[Example]:
    """Every preference pair of ``files``: chosen_* and rejected_* input_ids/labels."""
    triples = [(where, dpo_triple(record, where)) for path in files
               for where, record in read_jsonl(path)]
    if not triples:
        raise DataError(f"no examples in {', '.join(map(str, files))}; add JSONL lines")
    flat = [(where, [(prompt, False), (answer, True)])
            for where, (prompt, chosen, rejected) in triples for answer in (chosen, rejected)]
    tokens = tokenize(flat, encode, eos_id, seq_len)
    return [{"chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
             "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"]}
            for chosen, rejected in zip(tokens[::2], tokens[1::2], strict=True)]


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad (input_ids, labels) rows to the longest: labels -100, attention_mask 0 there."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, :len(ids)] = ids
        labels[i, :len(ids)] = row_labels
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def pad_sft(examples: list[Example], pad_id: int) -> dict[str, np.ndarray]:
    return pad_rows([(e["input_ids"], e["labels"]) for e in examples], pad_id)


def pad_dpo(examples: list[Example], pad_id: int) -> dict[str, np.ndarray]:
    """2B rows, chosen first then rejected: one forward pass scores both halves."""
    rows = [(e[f"{side}_input_ids"], e[f"{side}_labels"])
            for side in ("chosen", "rejected") for e in examples]
    return pad_rows(rows, pad_id)


# ================================================================ losses (torch)

def torch_collate(examples: list[Example], pad_id: int, pairs: bool) -> dict[str, torch.Tensor]:
    """pad_sft / pad_dpo as torch tensors (the DataLoader's collate_fn)."""
    import torch

    batch = (pad_dpo if pairs else pad_sft)(examples, pad_id)
    return {key: torch.from_numpy(value) for key, value in batch.items()}


def _forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 use_cache=False).logits


def _next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Position t's target is label t+1 (the last position has none): shifting the labels,
    not the logits, avoids copying a (batch, length, vocab) tensor."""
    import torch.nn.functional as F

    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of its answer tokens (fp32)."""
    import torch.nn.functional as F

    nll = F.cross_entropy(logits.float().flatten(0, 1), _next_tokens(labels).flatten(),
                          ignore_index=IGNORE, reduction="none")
    return -nll.view(labels.shape).sum(-1)


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Mean next-token cross-entropy over the batch's answer tokens only."""
    import torch.nn.functional as F

    logits = _forward(model, batch)
    loss = F.cross_entropy(logits.float().flatten(0, 1), _next_tokens(batch["labels"]).flatten(),
                           ignore_index=IGNORE)
    return loss, {}


def dpo_from_logps(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                   ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                   beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO: -log sigmoid(beta * ((pc - rc) - (pr - rr))), and the rewards it implies."""
    import torch.nn.functional as F

    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, {"rewards_chosen": chosen.detach().mean(),
                  "rewards_rejected": rejected.detach().mean(),
                  "reward_accuracy": (chosen > rejected).float().mean().detach(),
                  "reward_margin": (chosen - rejected).detach().mean()}


def dpo_loss(model, batch: dict[str, torch.Tensor],
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on a pad_dpo batch; the reference is the same model with its adapters disabled."""
    import torch
    from accelerate.utils import extract_model_from_parallel

    peft_model = extract_model_from_parallel(model, keep_torch_compile=False)
    half = batch["input_ids"].shape[0] // 2
    with torch.no_grad(), peft_model.disable_adapter():  # through the wrapper (DDP/FSDP)
        ref = answer_logps(_forward(model, batch), batch["labels"])
    policy = answer_logps(_forward(model, batch), batch["labels"])
    return dpo_from_logps(policy[:half], policy[half:], ref[:half], ref[half:], beta)


def _count_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())


# ================================================================ base models, tokenizers

def validate_finetune(config: TrainingConfig) -> None:
    """ConfigError for LoRA settings that cannot work (cli.validate calls this at parse time)."""
    if not config.init_from:
        raise ConfigError(f"stage {config.stage} needs a base model: pass --init-from PATH (a "
                          f"checkpoint or Hugging Face GPT-NeoX folder) or --init-from latest "
                          f"(newest checkpoint of --init-run, now {config.init_run!r})")
    targets = lora_targets(config.lora_target_modules)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ConfigError(f"--lora-target-modules {config.lora_target_modules!r}: "
                          f"{'unknown ' + ', '.join(unknown) if unknown else 'none given'}; use "
                          f"a comma-separated subset of {','.join(LORA_TARGETS)}")
    if config.lora_r < 1 or config.lora_alpha <= 0:
        raise ConfigError(f"--lora-r must be >= 1 and --lora-alpha > 0, got {config.lora_r} "
                          f"and {config.lora_alpha}")
    if not 0 <= config.lora_dropout < 1:
        raise ConfigError(f"--lora-dropout must be within [0, 1), got {config.lora_dropout}")
    if config.stage == "dpo" and not config.dpo_beta > 0:
        raise ConfigError(f"--dpo-beta must be > 0, got {config.dpo_beta}")
    if config.quantize_bits not in (0, 4, 8):
        raise ConfigError(f"--quantize-bits must be 4 or 8 (0 = full-precision base), got "
                          f"{config.quantize_bits}")
    if config.quantize_bits and config.backend != "mlx":
        raise ConfigError("--quantize-bits (QLoRA) needs --backend mlx: the torch backend has no "
                          "4/8-bit kernels on this install; drop the flag or add --backend mlx")


def lora_targets(spec: str) -> list[str]:
    return [name.strip() for name in spec.split(",") if name.strip()]


def resolve_base(config: TrainingConfig) -> Path:
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
    pinned = _started_on(config)
    if pinned is not None:
        return pinned
    root = Path("outputs") / config.init_run / "checkpoints"
    store = None
    if config.bucket:
        from utils.storage import open_store

        store = open_store(config.bucket, credentials=config.credentials or None)
    from accelerate import PartialState

    with PartialState().local_main_process_first():  # one download per node
        found = checkpoint.choose_resume(name, root, store, f"checkpoints/{config.init_run}")
    if found is None:
        where = f"{root}" + (f" or {store.url}/checkpoints/{config.init_run}" if store else "")
        raise CheckpointError(f"--init-from {name}: run {config.init_run!r} has no complete "
                              f"checkpoint in {where}; train it first (python train.py --config "
                              f"{config.init_run}), or pass --init-from PATH")
    return found.resolve()


def _started_on(config: TrainingConfig) -> Path | None:
    """When resuming, the base recorded in this run's newest local checkpoint (if still there)."""
    if not config.resume:
        return None
    done = checkpoint.find_complete(Path(config.effective_output_dir) / "checkpoints")
    if not done or not (done[-1] / ADAPTER_CONFIG).is_file():
        return None
    recorded = adapter_base(done[-1])
    if recorded.is_dir():
        return recorded
    from accelerate import PartialState

    PartialState().print(f"note: {done[-1].name} was trained on {recorded}, which is gone; "
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


def load_base(path: Path) -> GPTNeoXForCausalLM:
    """GPT-NeoX in fp32 from safetensors; a LoRA checkpoint is loaded onto its base and merged."""
    import torch
    from transformers import GPTNeoXForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    check_base(path)
    if (path / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(adapter_base(path)), path).merge_and_unload()
    try:
        return GPTNeoXForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"base model {path} could not be loaded ({first[:200]}); it needs "
                              f"config.json and model.safetensors") from None


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


def build_lora_model(base: GPTNeoXForCausalLM, config: TrainingConfig,
                     base_path: Path) -> PeftModel:
    """Frozen base + trainable LoRA adapters; the adapter config records where the base is."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout,
                      target_modules=lora_targets(config.lora_target_modules),
                      task_type="CAUSAL_LM", base_model_name_or_path=str(base_path))
    return get_peft_model(base, lora)


def load_adapter_weights(model, ckpt_dir: Path) -> None:
    """Load a checkpoint's adapter_model.safetensors into a LoRA model (exact resume)."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

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
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # our own write, cut short
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return publish_dir(tmp, out_dir)


def publish_dir(tmp: Path, out_dir: Path) -> Path:
    """Move a finished folder into place: out_dir is always either the old or the new one."""
    if out_dir.exists():
        old = out_dir.parent / f".old-{out_dir.name}"
        shutil.rmtree(old, ignore_errors=True)
        out_dir.replace(old)
        tmp.replace(out_dir)
        shutil.rmtree(old)
    else:
        tmp.replace(out_dir)
    return out_dir


# ================================================================ the task

@dataclass
class FinetuneData:
    """What an SFT/DPO stage needs besides its model, the same for both backends."""

    base_path: Path
    tokenizer_dir: Path             # this run's own copy: train.py copies it into checkpoints
    vocab_size: int                 # the tokenizer's: the base must be at least this large
    examples: list[Example]
    train_idx: np.ndarray
    eval_idx: np.ndarray
    num_files: int
    pad_id: int
    lengths: np.ndarray | None      # per example, for length-grouped batches (None: random)


def example_lengths(examples: list[Example]) -> np.ndarray:
    """Tokens per example as a batch pads it: a DPO pair takes its longer answer's row."""
    return np.array([max(len(v) for k, v in e.items() if k.endswith("input_ids"))
                     for e in examples])


def prepare_finetune(config: TrainingConfig) -> FinetuneData:
    """Resolve the base and its tokenizer, then read, check and tokenize the stage's data."""
    validate_finetune(config)
    base_path = resolve_base(config)
    tokenizer = load_tokenizer(resolve_tokenizer(base_path))
    files = data_files(config.data_dir)
    load = load_dpo if config.stage == "dpo" else load_sft
    examples = load(files, encoder(tokenizer), tokenizer.eos_token_id, config.seq_len)
    # Held out: --eval-windows examples, at most a tenth of the data (small datasets).
    n_eval = min(config.eval_windows, max(1, len(examples) // 10)) if len(examples) > 1 else 0
    train_idx, eval_idx = train_eval_split(len(examples), n_eval, config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    # The loop copies every file of meta["tokenizer"] into each checkpoint: give it a folder
    # with the tokenizer alone (the base's folder also holds weights and training state).
    own_tokenizer = Path(config.effective_output_dir) / "tokenizer"
    from accelerate import PartialState

    with PartialState().local_main_process_first():
        if PartialState().is_local_main_process:
            tokenizer.save_pretrained(own_tokenizer)
    return FinetuneData(base_path=base_path, tokenizer_dir=own_tokenizer,
                        vocab_size=len(tokenizer), examples=examples, train_idx=train_idx,
                        eval_idx=eval_idx, num_files=len(files), pad_id=pad_id,
                        lengths=example_lengths(examples) if config.group_by_length else None)


def check_vocab(data: FinetuneData, model_vocab: int) -> None:
    if data.vocab_size > model_vocab:
        raise CheckpointError(f"the tokenizer of {data.base_path} has {data.vocab_size} tokens "
                              f"but the model only {model_vocab}: they do not belong together; "
                              f"pass the base's own tokenizer")


def build_finetune_task(config: TrainingConfig) -> Task:
    """SFT or DPO on a peft LoRA-wrapped base, for train.py's shared loop."""
    from utils.tasks import Task

    data = prepare_finetune(config)
    base = load_base(data.base_path)
    check_vocab(data, base.config.vocab_size)
    model = build_lora_model(base, config, data.base_path)
    loss = partial(dpo_loss, beta=config.dpo_beta) if config.stage == "dpo" else sft_loss
    return Task(model=model, examples=data.examples, train_idx=data.train_idx,
                eval_idx=data.eval_idx, num_files=data.num_files,
                collate=partial(torch_collate, pad_id=data.pad_id, pairs=config.stage == "dpo"),
                loss=loss, count_tokens=_count_tokens, lengths=data.lengths,
                meta={"tokenizer": str(data.tokenizer_dir)})

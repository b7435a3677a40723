"""``--topics DIR``: SFT, DPO (and GRPO) for each topic in order, each stage starting from the
last.

A topic is a subfolder of DIR holding ``sft.jsonl`` and ``dpo.jsonl``, and optionally
``grpo.jsonl`` (then GRPO runs after DPO); topics run in sorted
folder order (name them ``01-...``, ``02-...``). Each stage is an ordinary LoRA run of the
shared loop with its own run name and output folder, ``OUTPUT_DIR/<topic>/<stage>``, whose
final adapters are merged into ``.../merged``: the base of the next stage.

``OUTPUT_DIR/curriculum.json`` (written atomically) records the base and every finished
stage, so a rerun skips finished stages and continues the first unfinished one from its own
newest checkpoint (``--resume latest`` per stage: exact, mid-stage included).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from configs.training_config import RUN_NAME, RUN_NAME_RULE, TrainingConfig
from utils import checkpoint
from utils.errors import DataError
from utils.fs import atomic_write
from utils.processes import Processes, printer
from utils.stages.init_from import resolve_base

STATE_FILE = "curriculum.json"
STAGES = ("sft", "dpo")  # every topic has these
OPTIONAL_STAGES = ("grpo",)  # run after them where the topic has the file


@dataclass(frozen=True)
class Stage:
    topic: str
    stage: str
    data: Path

    @property
    def key(self) -> str:
        return f"{self.topic}/{self.stage}"


def plan(topics_dir: Path) -> list[Stage]:
    """Every (topic, stage) in order; DataError naming what is missing."""
    if not topics_dir.is_dir():
        raise DataError(f"--topics {topics_dir} is not a folder; pass a folder of topic "
                        f"subfolders, each with sft.jsonl and dpo.jsonl")
    topics = sorted(p for p in topics_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not topics:
        raise DataError(f"--topics {topics_dir} has no topic subfolders; add e.g. "
                        f"{topics_dir}/01-first/sft.jsonl and dpo.jsonl")
    stages = []
    for topic in topics:
        if not RUN_NAME.fullmatch(topic.name):  # it becomes part of each stage's run name
            raise DataError(f"--topics: topic folder {topic.name!r} in {topics_dir}: "
                            f"{RUN_NAME_RULE}; rename it")
        for stage in STAGES:
            data = topic / f"{stage}.jsonl"
            if not data.is_file():
                raise DataError(f"topic {topic} has no {stage}.jsonl; every topic needs "
                                f"{' and '.join(s + '.jsonl' for s in STAGES)}")
            stages.append(Stage(topic.name, stage, data))
        stages += [Stage(topic.name, stage, topic / f"{stage}.jsonl") for stage in OPTIONAL_STAGES
                   if (topic / f"{stage}.jsonl").is_file()]
    return stages


def read_state(path: Path) -> dict:
    if not path.exists():
        return {"base": None, "finished": []}
    try:
        state = json.loads(path.read_text())
        if not isinstance(state.get("finished"), list):
            raise ValueError("'finished' is not a list")
        return state
    except (OSError, ValueError, AttributeError, RecursionError) as err:
        raise DataError(f"{path} is unreadable ({err}); restore it, or use a new --output-dir "
                        f"to start the curriculum over") from None


def write_state(path: Path, state: dict) -> None:
    """Atomic replace: a crash leaves the old or the new record, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(state, indent=1))


def stage_config(config: TrainingConfig, stage: Stage, init_from: str) -> TrainingConfig:
    """The stage's own run: same knobs, its data, its folder, the previous model as base."""
    out = Path(config.effective_output_dir) / stage.topic / stage.stage
    return replace(config, stage=stage.stage, data_dir=str(stage.data), init_from=init_from,
                   run_name=f"{config.run_name}-{stage.topic}-{stage.stage}",
                   output_dir=str(out), topics="", merge=False, resume="latest",
                   sync_data=False)


def run_curriculum(config: TrainingConfig, train: Callable[[TrainingConfig], dict],
                   processes: Processes, merge: Callable[[Path, Path], Path]) -> dict:
    """Run (or continue) every stage; returns {"stages": [...], "model": final merged path}.

    ``train`` is the shared loop's ``train(config) -> summary``, ``merge(checkpoint, out)``
    the engine's adapter merge; only the main process merges and writes the record. A stage
    stopped early (preemption) ends the curriculum without recording it, so the next run
    continues it.
    """
    log = printer(processes.is_main_process)
    stages = plan(Path(config.topics))
    out = Path(config.effective_output_dir)
    state_path = out / STATE_FILE
    state = read_state(state_path)
    done = [entry["stage"] for entry in state["finished"]]
    planned = [s.key for s in stages]
    if planned[:len(done)] != done:
        raise DataError(f"{state_path} records finished stages {', '.join(done)} but --topics "
                        f"{config.topics} now plans {', '.join(planned)}; restore the topics "
                        f"(new ones may only be added at the end) or use a new --output-dir")
    if state["base"] is None:  # resolved once, so `latest` cannot move under a resumed run
        state["base"] = str(resolve_base(replace(config, stage="sft"), processes))
        if processes.is_main_process:
            write_state(state_path, state)
    model = state["finished"][-1]["model"] if state["finished"] else state["base"]
    summaries = []
    for stage in stages[len(done):]:
        log(f"curriculum: {stage.key} ({stage.data}) from {model}")
        stage_cfg = stage_config(config, stage, model)
        summary = train(stage_cfg)
        summaries.append({"stage": stage.key, **summary})
        if summary.get("stopped_early"):
            log(f"curriculum: stopped during {stage.key}; run again to continue it")
            return {"stages": summaries, "model": None, "stopped_early": True}
        merged = Path(stage_cfg.effective_output_dir) / "merged"
        if processes.is_main_process:
            final = checkpoint.find_complete(Path(stage_cfg.effective_output_dir) / "checkpoints")
            merge(final[-1], merged)
            state["finished"].append({"stage": stage.key, "model": str(merged),
                                      "checkpoint": final[-1].name})
            write_state(state_path, state)
        processes.wait_for_everyone()
        model = str(merged)
    if summaries:
        log(f"curriculum: all {len(stages)} stages finished; final model {model}")
    else:
        log(f"curriculum: all {len(stages)} stages already finished ({state_path})")
    return {"stages": summaries, "model": model, "stopped_early": False}

"""Throughput, MFU and ETA, the metrics file and the end-of-run summary (framework-neutral)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from utils.fs import atomic_write


def flops_per_token(non_embedding_params: int, num_layers: int, hidden: int, seq_len: int,
                    output_embedding_params: int = 0) -> float:
    """Training FLOPs per token: 6N for the weights plus 12*L*H*T for attention scores.

    N counts the output head (a matmul) but not the input embedding (a lookup).
    """
    n = non_embedding_params + output_embedding_params
    return 6.0 * n + 12.0 * num_layers * hidden * seq_len


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ThroughputMeter:
    """Tokens/s and MFU over the interval since the last ``read``."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, num_devices: int):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.num_devices = num_devices
        self._tokens = 0
        self._start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def reset(self) -> None:
        self._tokens = 0
        self._start = time.perf_counter()

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        tokens_per_s = self._tokens / elapsed
        out = {"tokens_per_s": tokens_per_s, "step_time_s": elapsed}
        if self.peak_flops:
            achieved = tokens_per_s * self.flops_per_token
            out["mfu"] = achieved / (self.peak_flops * self.num_devices)
        self.reset()
        return out


class MetricsWriter:
    """Appends one JSON object per logged step; the caller sends the same dict to TensorBoard.

    Only the global main process writes, so the file has one line per step (and one
    ``"event": "checkpoint"`` line per checkpoint, written by the upload thread: hence the lock).
    """

    def __init__(self, path: Path, start_step: int = 0):
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_steps_after(start_step)

    def _drop_steps_after(self, step: int) -> None:
        """On resume, forget lines logged after the checkpoint so each step appears once.

        A line cut short by a kill is dropped too, and the file is replaced atomically, so a
        kill during this rewrite cannot leave a torn line that stops the next resume.
        """
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:
                continue  # torn by a kill mid-write, or blank
        atomic_write(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self._lock, self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def summary_table(rows: list[tuple[str, str]]) -> str:
    """A two-column table for the end-of-run summary."""
    width = max(len(key) for key, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    body = "\n".join(f"{key:<{width}} | {value}" for key, value in rows)
    return f"{line}\n{body}\n{line}"


def run_summary(*, config, state, start_step: int, start_tokens: int, elapsed: float,
                last_loss: float, eval_loss: float, saved: list, uploads_done: bool,
                stopped_early: bool, where: str, ckpt_root: Path, store,
                local_only: list[tuple[str, str]] = (), saving: str = "",
                streamed: str = "", logs_mirror: str = "",
                skipped_steps: int = 0, goodput: str = "",
                rollbacks: list[str] = ()) -> tuple[dict, str]:
    """The end-of-run summary both loops return, and the table they print."""
    output_dir = Path(config.effective_output_dir)
    summary = {
        "run_id": state.run_id, "steps": state.step, "final_loss": last_loss,
        "eval_loss": eval_loss, "tokens": state.tokens_seen, "seconds": elapsed,
        "tokens_per_s": (state.tokens_seen - start_tokens) / max(elapsed, 1e-9),
        "checkpoints": [p.name for p in saved], "uploads_complete": uploads_done,
        "stopped_early": stopped_early, "local_only": [name for name, _ in local_only],
        "skipped_steps": skipped_steps, "goodput": goodput, "rollbacks": list(rollbacks),
    }
    table = summary_table([
        ("run", f"{config.run_name} (run id {state.run_id}; {config.model}, {where})"),
        ("steps", f"{start_step} -> {state.step} of {config.max_steps}"),
        ("tokens", f"{state.tokens_seen:,}"),
        ("time", format_eta(elapsed)),
        ("throughput", f"{summary['tokens_per_s']:,.0f} tokens/s"),
        *([("goodput", goodput)] if goodput else []),
        ("final loss", f"{last_loss:.4f}"),
        *([("skipped updates", f"{skipped_steps} (non-finite loss or gradient norm; "
                               f"see skipped_steps in metrics.jsonl)")] if skipped_steps else []),
        *[("rollback", line) for line in rollbacks],
        ("eval reward" if config.stage == "grpo" else "eval loss", f"{eval_loss:.4f}"),
        ("checkpoints", f"{len(saved)} in {ckpt_root}"),
        *([("saving", saving)] if saving else []),
        *([("streamed", streamed)] if streamed else []),
        ("uploaded to", f"{store.url}/checkpoints/{config.run_name}" if store else "(no bucket)"),
        *[("not uploaded", f"{name}: {reason} (stays local)") for name, reason in local_only],
        ("metrics", f"{output_dir / 'metrics.jsonl'}; tensorboard --logdir {output_dir / 'logs'}"),
        *([("logs copied to", logs_mirror)] if logs_mirror else []),
    ])
    return summary, table

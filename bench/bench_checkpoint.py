"""What checkpoints cost train.py's own training loop (run from the repo root).

(a) background upload: mean step time while an upload runs / mean step time without one, in
    the same run (goal <= 1.05);
(b) the loop's blocking time per checkpoint with the background publisher against a
    synchronous save + upload (--no-background-upload) of the same checkpoints.

Every case runs the shared loop (``utils.loop.trainer``) in a child process; the publisher and
the metrics writer are subclassed only to timestamp what they already do. Two buckets: the GCS
emulator (the real HTTP protocol and client; its server runs on the same cores as training, a
pessimistic case) and a local directory throttled to --mbps (a network-bound upload, like a
real bucket).

    .venv/bin/python bench/bench_checkpoint.py [--model small] [--steps 90] [--save-steps 15]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from utils.storage import LocalStore, ObjectInfo  # noqa: E402

WARMUP_STEPS = 3  # the first steps allocate and warm caches


class ThrottledStore(LocalStore):
    """A local directory that takes uploads at most ``mbps`` MB/s: a network-bound bucket."""

    def __init__(self, base: Path, mbps: float, prefix: str = "") -> None:
        super().__init__(base, prefix)
        self.mbps = mbps

    def child(self, prefix: str) -> ThrottledStore:
        return ThrottledStore(self.base, self.mbps, f"{self.prefix}/{prefix}".strip("/"))

    def upload_file(self, local: Path, name: str, **kw) -> ObjectInfo:
        start = time.perf_counter()
        info = super().upload_file(local, name, **kw)
        time.sleep(max(0.0, info.size / (self.mbps * 1e6) - (time.perf_counter() - start)))
        return info


def child(args: argparse.Namespace) -> None:
    """One training run; writes step and upload timings as JSON to args.result."""
    from configs.cli import parse_args
    from utils.loop import trainer
    from utils.loop.metrics import MetricsWriter
    from utils.torch_engine.engine import TorchEngine

    steps: list[tuple[float, int, float]] = []  # (time logged, step, step_time_s)
    publishers: list[trainer.CheckpointPublisher] = []

    class StampedMetrics(MetricsWriter):
        def write(self, record: dict) -> None:
            if "event" not in record:  # step records (checkpoint records come from uploads)
                steps.append((time.perf_counter(), record["step"], record["step_time_s"]))
            super().write(record)

    class RecordedPublisher(trainer.CheckpointPublisher):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            publishers.append(self)

    trainer.MetricsWriter = StampedMetrics
    trainer.CheckpointPublisher = RecordedPublisher
    if args.store == "throttled":
        Path(args.bucket).mkdir(parents=True, exist_ok=True)
        trainer.open_checkpoint_store = lambda config, engine: ThrottledStore(
            Path(config.bucket), args.mbps)
    config, _ = parse_args([
        "--config", "smoke", "--model", args.model, "--seq-len", str(args.seq_len),
        "--per-device-train-batch-size", str(args.batch), "--max-steps", str(args.steps),
        "--save-steps", str(args.save_steps), "--logging-steps", "1", "--eval-steps", "100000",
        "--eval-windows", "8", "--data-dir", args.data_dir, "--output-dir", args.out,
        "--bucket", args.bucket, "--run-name", "bench", "--save-total-limit", "2",
        "--background-upload" if args.mode == "background" else "--no-background-upload"])
    trainer.train(config, TorchEngine(config))
    uploads = [(r.started, r.finished, r.size) for r in publishers[0].history if r.uploaded]
    Path(args.result).write_text(json.dumps({"steps": steps, "uploads": uploads}))


def analyse(result: dict, save_steps: int, last: int) -> dict:
    """Split step times by whether an upload ran; blocking = time the loop spent in save()."""
    steps = {s: (t, dt) for t, s, dt in result["steps"]}
    uploads = result["uploads"]
    during, without = [], []
    for step, (t, dt) in steps.items():
        if step <= WARMUP_STEPS or step == last:
            continue
        middle = t - dt / 2
        busy = any(start <= middle <= end for start, end, _ in uploads)
        (during if busy else without).append(dt)
    blocking = [steps[s + 1][0] - steps[s][0] - steps[s + 1][1]
                for s in steps if s % save_steps == 0 and s + 1 in steps]
    return {
        "steps_during": len(during), "steps_without": len(without),
        "mean_during_s": statistics.fmean(during) if during else float("nan"),
        "mean_without_s": statistics.fmean(without) if without else float("nan"),
        "blocking_s": blocking,
        "upload_s": [end - start for start, end, _ in uploads],
        "checkpoint_mb": uploads[0][2] / 1e6 if uploads else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--save-steps", type=int, default=15)
    parser.add_argument("--mbps", type=float, default=50.0, help="throttled store's MB/s")
    parser.add_argument("--stores", default="emulator,throttled")
    parser.add_argument("--emulator-nice", type=int, default=19,
                        help="niceness of the emulator process (0: compete with training)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--mode", "--store", "--bucket", "--data-dir", "--out", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from gcs_emulator import GcsEmulator

    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TMPDIR": str(work)}
    subprocess.run([sys.executable, "-m", "data.prepare", "--out", str(work / "data"),
                    "--tokenizer-out", str(work / "tok"), "--max-mb", "1"],
                   cwd=REPO, env=env, check=True, capture_output=True)
    emulator = GcsEmulator(work / "gcs")
    emulator.start()
    if args.emulator_nice:  # it stands in for a remote server, which costs this machine nothing
        os.setpriority(os.PRIO_PROCESS, emulator._proc.pid, args.emulator_nice)
    env["STORAGE_EMULATOR_HOST"] = emulator.url
    rows = []
    try:
        for store in args.stores.split(","):
            for mode in ("background", "sync"):
                tag = f"{store}-{mode}"
                bucket = (emulator.create_bucket(f"bench-{tag}") if store == "emulator"
                          else str(work / f"bucket-{tag}"))
                cmd = [sys.executable, __file__, "--child", "--mode", mode, "--store", store,
                       "--bucket", bucket, "--data-dir", str(work / "data"),
                       "--out", str(work / f"out-{tag}"), "--result", str(work / f"{tag}.json"),
                       "--model", args.model, "--seq-len", str(args.seq_len),
                       "--batch", str(args.batch), "--steps", str(args.steps),
                       "--save-steps", str(args.save_steps), "--mbps", str(args.mbps)]
                print(f"running {tag} ...", flush=True)
                with open(work / f"{tag}.log", "wb") as log:
                    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=log,
                                   stderr=subprocess.STDOUT)
                stats = analyse(json.loads((work / f"{tag}.json").read_text()),
                                args.save_steps, args.steps)
                rows.append((store, mode, stats))
                print(json.dumps(stats), flush=True)
    finally:
        emulator.stop()
    print(f"\nmodel {args.model}, seq {args.seq_len} x batch {args.batch}, {args.steps} steps, "
          f"a checkpoint every {args.save_steps}; throttled store {args.mbps:g} MB/s; "
          f"emulator nice {args.emulator_nice}; "
          f"load average {os.getloadavg()[0]:.1f}; logs in {work}\n")
    print("| bucket | upload | steps during / without upload | mean step during / without "
          "| ratio | blocking per checkpoint | upload per checkpoint |")
    print("|---|---|---|---|---|---|---|")
    for store, mode, s in rows:
        ratio = s["mean_during_s"] / s["mean_without_s"] if s["steps_during"] else float("nan")
        blocking = ", ".join(f"{b:.2f}" for b in s["blocking_s"])
        uploads = ", ".join(f"{u:.1f}" for u in s["upload_s"])
        print(f"| {store} | {mode} | {s['steps_during']} / {s['steps_without']} | "
              f"{s['mean_during_s']:.3f} / {s['mean_without_s']:.3f} s | {ratio:.3f} | "
              f"{blocking} s | {uploads} s ({s['checkpoint_mb']:.0f} MB) |")


if __name__ == "__main__":
    main()

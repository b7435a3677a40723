"""What a save blocks training for: the async snapshot against a bare host copy and against
today's synchronous save, on the same model and optimizer state, measured side by side.

    .venv/bin/python bench/bench_snapshot.py [--model neox-160m] [--repeats 3]

(a) snapshot blocking / bare copy (``clone()`` of every model and optimizer tensor): the
    snapshot's overhead over the copy it cannot avoid (goal <= 1.2);
(b) snapshot blocking / synchronous save (snapshot + safetensors + torch.save to disk): what
    the background write takes off the loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from configs.training_config import preset  # noqa: E402
from utils.checkpoint import TrainState  # noqa: E402
from utils.loop.schedule import lr_factor  # noqa: E402
from utils.torch_engine.checkpoint_io import HostStaging, save_checkpoint, take_snapshot  # noqa: E402
from utils.torch_engine.model import build_model  # noqa: E402
from utils.torch_engine.optim import build_adamw  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="neox-160m")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model(preset("smoke", model=args.model), {"vocab_size": 50257})
    optimizer = build_adamw(model, 1e-4, 0.1, (0.9, 0.95), 1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=1, max_steps=10, min_ratio=0.1))
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    ids = torch.randint(0, 50257, (1, 33))
    acc.backward(model(input_ids=ids[:, :-1], labels=ids[:, 1:], use_cache=False).loss)
    optimizer.step()  # the AdamW moments exist from here
    params = sum(p.numel() for p in model.parameters())
    staging = HostStaging()
    state = TrainState(step=1)

    def bare_copy() -> None:
        [t.clone() for t in model.state_dict().values()]
        [v.clone() for s in optimizer.state_dict()["state"].values() for v in s.values()
         if torch.is_tensor(v)]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        first = _timed(lambda: take_snapshot(acc, model, optimizer, scheduler, state, {}, root,
                                             staging))
        rows = {"bare copy": [], "snapshot": [], "synchronous save": []}
        for _ in range(args.repeats):  # interleaved: the machine's noise hits all alike
            rows["bare copy"].append(_timed(bare_copy))
            snap = None

            def snapshot() -> None:
                nonlocal snap
                snap = take_snapshot(acc, model, optimizer, scheduler, state, {}, root, staging)

            rows["snapshot"].append(_timed(snapshot))
            rows["synchronous save"].append(_timed(
                lambda: save_checkpoint(acc, model, optimizer, scheduler, state, {}, root)))
        write = _timed(snap.write)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"model {args.model}: {params:,} parameters; snapshot {snap.nbytes / 2**30:.2f} GiB "
          f"of host memory; {args.repeats} interleaved repeats, medians")
    print(f"{'case':<28}{'seconds':>10}")
    print(f"{'first snapshot (allocates)':<28}{first:>10.3f}")
    for name, value in med.items():
        print(f"{name:<28}{value:>10.3f}")
    print(f"{'background write (1)':<28}{write:>10.3f}")
    ratio = med['snapshot'] / med['bare copy']
    print(f"(a) snapshot / bare copy        = {ratio:.2f} (goal <= 1.2)")
    print(f"(b) snapshot / synchronous save = {med['snapshot'] / med['synchronous save']:.2f}")


if __name__ == "__main__":
    main()

"""Checkpoint transfer benchmark (issue 23): one stream per file vs N streams, up and down.

A synthetic checkpoint shaped like neox-1.2b's (weights 1/3, AdamW state 2/3, a few small
files) of --size-mb goes through a real fake-gcs-server behind a TCP proxy that limits every
connection to --rate-mb MB/s (like GCS's per-stream cap, ~200 MiB/s from a VM), uploaded file
by file as the checkpoint publisher does, then downloaded as a resume does: once with one
stream per file (--upload-streams 1), once with N, in the same run. It prints the ratio and
what a 17 GB checkpoint would take at GCS's per-stream rate.

On the 2-core machine the emulator and the proxy share the cores with the client, so N
streams are CPU-bound well below N x the per-connection rate: the measured ratio is a floor.

    .venv/bin/python bench/bench_transfer.py [--size-mb 2000] [--rate-mb 25] [--streams 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from throttle_proxy import ProxiedEmulator  # noqa: E402

from utils.storage import Store, file_crc32c, open_store  # noqa: E402

MB = 1_000_000
GCS_STREAM_BPS = 200 * 2**20  # one stream from a VM (Google's figure)
CHECKPOINT_1_2B = 17e9  # fp32 weights 5.7 GB + AdamW state 11.3 GB + small files
# (name, share of the size) like a neox-1.2b checkpoint; small files get a fixed size.
SHAPE = [("model.safetensors", 1 / 3), ("optimizer.pt", 2 / 3)]
SMALL = {"config.json": 900, "trainer_state.json": 4_000, "rng_state.pth": 15_000,
         "scheduler.pt": 1_100}


def make_checkpoint(folder: Path, size: int) -> dict[str, str]:
    """Write the file set (random bytes: nothing compresses); name -> crc32c."""
    folder.mkdir(parents=True)
    sizes = {name: int(size * share) for name, share in SHAPE} | SMALL
    for name, n in sizes.items():
        with open(folder / name, "wb") as f:
            for offset in range(0, n, 64 * 2**20):
                f.write(os.urandom(min(64 * 2**20, n - offset)))
    return {name: file_crc32c(folder / name) for name in sizes}


def upload(store: Store, folder: Path, crcs: dict[str, str]) -> float:
    """One file at a time, as the publisher uploads a checkpoint; seconds."""
    start = time.perf_counter()
    for name, crc in crcs.items():
        store.upload_file(folder / name, name, crc32c=crc, if_absent=True)
    return time.perf_counter() - start


def download(store: Store, dest: Path) -> float:
    """One file at a time from one listing, as a resume restores a checkpoint; seconds."""
    start = time.perf_counter()
    for info in store.list():
        store.download_file(info.name, dest / info.name, expected=info)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=2000, help="checkpoint size (default 2 GB)")
    p.add_argument("--rate-mb", type=float, default=25.0, help="MB/s per connection")
    p.add_argument("--streams", type=int, default=16, help="N, the parallel streams")
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        work = Path(tmp)
        crcs = make_checkpoint(work / "ckpt", args.size_mb * MB)
        total = sum((work / "ckpt" / n).stat().st_size for n in crcs)
        emulator = ProxiedEmulator(work / "emulator")
        emulator.start()
        try:
            os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
            bucket = emulator.create_bucket("bench-transfer")
            emulator.proxy.rate = args.rate_mb * MB
            times: dict[int, tuple[float, float]] = {}
            for streams in (1, args.streams):
                store = open_store(bucket, streams=streams).child(f"streams-{streams}")
                up = upload(store, work / "ckpt", crcs)
                down = download(store, work / f"restore-{streams}")
                for name in crcs:  # free the emulator's memory before the next pass
                    store.delete(name)
                times[streams] = (up, down)
                print(f"{streams:>2} stream(s): upload {up:.1f} s, download {down:.1f} s")
        finally:
            emulator.stop()

    (one_up, one_down), (n_up, n_down) = times[1], times[args.streams]
    single_17 = CHECKPOINT_1_2B / GCS_STREAM_BPS
    print(f"\n{total / MB:.0f} MB checkpoint ({len(crcs)} files), every connection limited to "
          f"{args.rate_mb:g} MB/s\n")
    print(f"| | 1 stream | {args.streams} streams | speed-up |")
    print("|---|---|---|---|")
    for kind, one, many in (("upload", one_up, n_up), ("download", one_down, n_down)):
        print(f"| {kind} | {one:.1f} s ({total / MB / one:.0f} MB/s) | {many:.1f} s "
              f"({total / MB / many:.0f} MB/s) | **{one / many:.1f}x** |")
    print(f"\n17 GB (neox-1.2b) at {GCS_STREAM_BPS / 2**20:.0f} MiB/s per stream: one stream "
          f"{single_17:.0f} s; at this run's speed-ups {single_17 / (one_up / n_up):.0f} s up, "
          f"{single_17 / (one_down / n_down):.0f} s down; with {args.streams} full-rate streams "
          f"{single_17 / args.streams:.1f} s (if the VM's network allows "
          f"{args.streams * GCS_STREAM_BPS / 2**30:.1f} GiB/s)")


if __name__ == "__main__":
    main()

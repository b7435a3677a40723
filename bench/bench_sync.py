"""Sync benchmarks against a real fake-gcs-server (run from the repo root).

(a) re-sync of an already-synced 10,000-file bucket: must take < 2 s and move 0 bytes;
(b) first sync of 200 x 1 MiB with sync_down vs a serial blob.download_to_filename loop,
    measured in the same run and printed as a ratio;
(c) the same comparison through a proxy that adds --latency-ms per request, because the
    emulator on localhost has no round trip and shares the 2 cores with the client.

    .venv/bin/python bench/bench_sync.py [--files 10000] [--big 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from gcs_emulator import FaultProxy, GcsEmulator  # noqa: E402

from utils.storage import file_crc32c, open_store, sync_down  # noqa: E402


def _seed(root: Path, bucket: str, n: int, size: int, fanout: int) -> None:
    """Objects as files under the emulator's -data dir: far faster than n uploads."""
    for i in range(n):
        path = root / bucket / f"shard-{i % fanout:03d}" / f"doc-{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))


def bench_resync(n_files: int, work: Path) -> None:
    dest = work / "dest-10k"
    store = open_store("gs://bench-many")
    t0 = time.perf_counter()
    listing = store.list()
    t_list = time.perf_counter() - t0
    assert len(listing) == n_files, len(listing)

    t0 = time.perf_counter()
    first = sync_down(store, dest, workers=8, progress=False)
    t_first = time.perf_counter() - t0
    assert first.transferred == n_files and not first.failed, first.summary("downloaded")

    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        again = sync_down(store, dest, workers=8, progress=False)
        times.append(time.perf_counter() - t0)
        assert (again.transferred_bytes, again.hashed, again.skipped) == (0, 0, n_files)
    print(f"(a) {n_files} files: listing alone {t_list:.2f} s; first sync {t_first:.1f} s "
          f"({n_files / t_first:.0f} files/s)")
    print(f"(a) re-sync: {min(times):.2f} s best / {max(times):.2f} s worst of 3, "
          f"0 bytes, 0 files hashed -> {'PASS' if max(times) < 2.0 else 'FAIL'} (goal < 2 s)")


def bench_first_sync(n_files: int, work: Path, workers: int, rounds: int, tag: str) -> None:
    from google.cloud import storage

    client = storage.Client()
    store = open_store("gs://bench-big")
    names = sorted(b.name for b in client.list_blobs("bench-big"))
    assert len(names) == n_files
    mib = n_files * 1024 * 1024 / 2**20

    results: dict[str, list[float]] = {"serial": [], "sync": []}
    for rnd in range(rounds):  # alternate so neither side always runs on a warmer server
        for kind in ("serial", "sync") if rnd % 2 == 0 else ("sync", "serial"):
            dest = work / f"dest-{kind}"
            shutil.rmtree(dest, ignore_errors=True)
            t0 = time.perf_counter()
            if kind == "serial":
                bucket = client.bucket("bench-big")
                for name in names:
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    bucket.blob(name).download_to_filename(str(target))
            else:
                res = sync_down(store, dest, workers=workers, progress=False)
                assert res.transferred == n_files and not res.failed
            results[kind].append(time.perf_counter() - t0)
    check = work / "dest-sync" / names[0]
    assert file_crc32c(check) == next(o for o in store.list() if o.name == names[0]).crc32c
    for label, pick in (("best", min), ("median", statistics.median)):
        serial, ours = pick(results["serial"]), pick(results["sync"])
        print(f"{tag} {n_files} x 1 MiB first sync, {label} of {rounds}: serial "
              f"download_to_filename {serial:.2f} s ({mib / serial:.0f} MiB/s); sync_down "
              f"workers={workers} {ours:.2f} s ({mib / ours:.0f} MiB/s, verified, tmp+rename)"
              f" -> speed-up {serial / ours:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--big", type=int, default=200)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds for (b)")
    p.add_argument("--latency-ms", type=float, default=30.0, help="added latency for (c)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    try:
        seed = work / "seed"
        _seed(seed, "bench-many", args.files, 1024, fanout=100)
        _seed(seed, "bench-big", args.big, 1024 * 1024, fanout=4)
        t0 = time.perf_counter()
        with GcsEmulator(work / "emulator", seed_dir=seed) as emulator:
            print(f"emulator seeded with {args.files + args.big} objects in "
                  f"{time.perf_counter() - t0:.1f} s at {emulator.url}")
            os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
            bench_resync(args.files, work)
            bench_first_sync(args.big, work, args.workers, args.rounds, "(b)")
            if args.latency_ms > 0:
                proxy = FaultProxy(emulator.url, [], delay_s=args.latency_ms / 1000)
                proxy.start()
                os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
                try:
                    bench_first_sync(args.big, work, args.workers, 2,
                                     f"(c) +{args.latency_ms:g} ms/request:")
                finally:
                    proxy.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

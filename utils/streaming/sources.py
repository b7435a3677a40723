"""Pretraining shards streamed from the bucket (``--stream``): what the task and the loop need.

Per source (the data prefix, or each ``--data-mix`` sub-folder of it): the shard table from
one listing, windows whose shards are opened once they are local, a block-shuffled order
(``utils.data.blocks``), held-out windows confined to the first shards (kept local for the
whole run), and, on each machine's local main process, a :class:`~utils.streaming.ShardCache`
that fetches the next shards in the order the sampler will read them, under
``--cache-limit-gb``. :class:`StreamFeed` is the loop's handle on those caches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from configs.training_config import TrainingConfig
from utils.data import META_NAME, DataPosition, MixturePosition, TokenWindows, train_eval_split
from utils.data.blocks import block_order, shard_schedule
from utils.errors import DataError, StorageError, first_line
from utils.fs import atomic_write
from utils.processes import Processes, local_main_first
from utils.storage import ObjectInfo, ObjectNotFound, Store, open_bucket
from utils.streaming.cache import ShardCache, minimum_bytes, stream_windows
from utils.streaming.index import RemoteShard, remote_shards

# A bucket that does not answer is retried by the cache until it does; each attempt gives up
# after this long, so a bucket that is back is noticed within seconds.
ATTEMPT_DEADLINE_S = 10.0


@dataclass
class StreamedSource:
    """One streamed source: its shards, windows, training/held-out ids, block order."""

    store: Store
    root: Path
    shards: list[RemoteShard]
    windows: TokenWindows
    train: np.ndarray  # window ids within this source
    held_out: np.ndarray
    pinned: list[int]  # the shards holding the held-out windows: local for the whole run
    seed: int
    block_shards: int

    def order(self, epoch: int) -> np.ndarray:
        return block_order(self.windows.shard_windows, self.train, self.seed, epoch,
                           self.block_shards)

    def schedule(self, epoch: int) -> list[tuple[int, int, int]]:
        cum = np.concatenate([[0], np.cumsum(self.windows.shard_windows)])
        return shard_schedule(self.order(epoch), cum)


def held_out_split(shard_windows: np.ndarray, n_eval: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(train ids, held-out ids, their shards): the held-out windows are drawn from the
    first shards only (as few as hold them), so evaluation never waits for a download."""
    cum = np.concatenate([[0], np.cumsum(shard_windows)]).astype(np.int64)
    pinned = list(range(int(np.searchsorted(cum, n_eval, side="left")))) if n_eval else []
    train, held = train_eval_split(int(cum[-1]), n_eval, seed, pool=int(cum[len(pinned)]))
    return train, held, pinned


def fetch_shared_meta(store: Store, data_dir: Path) -> None:
    """The data prefix's own ``dataset.json`` (the tokenizer facts a mixture's sources
    share), when it has one; sources are fetched from their sub-folders only."""
    try:
        data = store.read_bytes(META_NAME)
    except ObjectNotFound:
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(data_dir / META_NAME, data)


def shared_listing(store: Store, processes: Processes) -> list[ObjectInfo]:
    """``store``'s listing as the run's main process made it, on every rank.

    Every rank numbers the windows from its shard table; tables listed by each machine (or
    rank) apart could differ when the bucket changes meanwhile (shards still being
    uploaded), and the ranks would then train on orders that do not fit together."""
    found: list = [None, None]  # [rows of the listing, error]
    if processes.is_main_process:
        try:
            found[0] = [[o.name, o.size, o.crc32c, o.md5] for o in store.list()]
        except Exception as err:  # the others wait for this broadcast: they learn it too
            processes.broadcast_object([None, first_line(err)])
            raise
    rows, error = processes.broadcast_object(found)
    if error:
        raise StorageError(error)
    return [ObjectInfo(*row) for row in rows]


def open_source(config: TrainingConfig, folder: str, n_eval: int,
                processes: Processes) -> StreamedSource:
    """A source's shard table (from the main process's listing; each machine's main process
    reads the headers first, the others then find them cached) and its windows; nothing is
    downloaded yet."""
    data = open_bucket(config.bucket_settings,
                       retry_deadline_s=ATTEMPT_DEADLINE_S).child(config.data_prefix)
    store = data.child(folder) if folder else data
    root = Path(config.data_dir) / folder
    objects = shared_listing(store, processes)
    with local_main_first(processes):
        shards = remote_shards(store, root, config.max_files or None, objects)
        if folder and processes.is_local_main_process:
            fetch_shared_meta(data, Path(config.data_dir))
    windows = stream_windows(shards, config.seq_len, root)
    train, held, pinned = held_out_split(windows.shard_windows, n_eval, config.seed)
    return StreamedSource(store, root, shards, windows, train, held, pinned, config.seed,
                          config.shuffle_block_shards)


def _positions(position: DataPosition | MixturePosition) -> list[tuple[int, int]]:
    if isinstance(position, MixturePosition):
        return [(p.epoch, p.offset) for _, p in position.sources]
    return [(position.epoch, position.offset)]


@dataclass
class StreamFeed:
    """The caches of this machine (local main process only) as the loop drives them."""

    sources: list[StreamedSource]
    config: TrainingConfig
    vocab_size: int  # every arriving shard's token ids are checked against it
    caches: list[ShardCache] = field(default_factory=list)

    def start(self, position: DataPosition | MixturePosition, processes: Processes,
              global_batch: int, log: Callable[[str], None]) -> None:
        """Start the downloads from the run's (resumed) position; before any process of
        the machine reads, since a cache clears the markers of earlier runs."""
        config = self.config
        read_ahead = global_batch * (config.num_workers * config.prefetch_factor + 1)
        limits = self._limits()
        with local_main_first(processes):
            if not processes.is_local_main_process:
                return
            for source, limit, at in zip(self.sources, limits, _positions(position),
                                         strict=True):
                self.caches.append(ShardCache(
                    source.store, source.root, source.shards, limit_bytes=limit,
                    prefetch=config.prefetch_shards, block_shards=config.shuffle_block_shards,
                    schedule=source.schedule, margin_windows=global_batch,
                    read_ahead_windows=read_ahead, pinned=source.pinned, position=at,
                    log=log, vocab_size=self.vocab_size))

    def _limits(self) -> Sequence[int | None]:
        """``--cache-limit-gb`` shared among the sources by what each needs at least."""
        if not self.config.cache_limit_gb:
            return [None] * len(self.sources)
        total = int(self.config.cache_limit_gb * 1e9)
        needs = [minimum_bytes([r.size for r in s.shards], s.pinned, s.block_shards,
                               self.config.prefetch_shards) for s in self.sources]
        if total < sum(needs) and len(needs) > 1:
            raise DataError(f"--cache-limit-gb {self.config.cache_limit_gb:g} is too small for "
                            f"{len(needs)} streamed sources: they need >= "
                            f"{sum(needs) / 1e9:.3g} GB together; raise --cache-limit-gb or "
                            f"lower --shuffle-block-shards/--prefetch-shards")
        return [total * need // max(sum(needs), 1) for need in needs]

    def follow(self, position: DataPosition | MixturePosition) -> None:
        """Every step: where training is, so the caches fetch ahead and evict behind it."""
        for cache, at in zip(self.caches, _positions(position), strict=False):
            cache.set_position(*at)

    def close(self) -> None:
        for cache in self.caches:
            cache.close()

    def summary(self) -> str:
        """The end-of-run line: what was streamed, and whether training waited for it."""
        if not self.caches:
            return ""
        stats = [cache.stats() for cache in self.caches]
        total = {key: sum(s[key] for s in stats) for key in stats[0]}
        return (f"{total['shards_fetched']:.0f} shards, {_size(total['bytes_downloaded'])} "
                f"fetched, {total['refetches']:.0f} re-fetched, {total['evictions']:.0f} "
                f"evicted; peak {_size(total['peak_local_bytes'])} local; training waited "
                f"{total['wait_s']:.1f} s")


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"

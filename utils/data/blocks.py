"""Block-shuffled window order for streaming: local in shards, still random enough to train on.

A uniform permutation of all windows touches every shard in every few steps, so streaming
would need the whole dataset on disk. Instead each epoch puts the shards in a seeded random
order, cuts that into blocks of ``block_shards`` shards and shuffles the windows within each
block: only the shards of the current block (and the next, at a boundary) are read at once,
and the order in which shards are first needed is known ahead from (seed, epoch), so a
downloader can fetch them in that order (:func:`shard_schedule`). numpy only.
"""

from __future__ import annotations

import numpy as np

from utils.errors import DataError

# Stream ids under [seed, epoch, ...]: the sampler uses [seed, epoch] and [seed, epoch, 1].
_SHARD_STREAM = 2
_BLOCK_STREAM = 3


def _train_mask(train: np.ndarray, n_windows: int) -> np.ndarray:
    """A boolean mask over all windows from a mask or from (any order of) window ids."""
    train = np.asarray(train)
    if train.dtype == bool:
        if len(train) != n_windows:
            raise DataError(
                f"training mask has {len(train)} entries for {n_windows} windows; build it "
                "from the same shards and seq_len"
            )
        return train
    if len(train) and (train.min() < 0 or train.max() >= n_windows):
        raise DataError(
            f"training window ids must lie in [0, {n_windows}); build them from the same "
            "shards and seq_len"
        )
    mask = np.zeros(n_windows, dtype=bool)
    mask[train] = True
    return mask


def block_order(
    shard_windows: np.ndarray, train: np.ndarray, seed: int, epoch: int, block_shards: int
) -> np.ndarray:
    """Epoch ``epoch``'s order of the training windows, shuffled within blocks of shards.

    ``shard_windows[k]`` is the number of windows of shard ``k`` (shards in the dataset's
    sorted order, so shard ``k`` holds global window ids ``cum[k]..cum[k+1]-1``); ``train``
    is a boolean mask over all windows or the training window ids: held-out windows never
    appear. Shards are permuted by ``default_rng([seed, epoch, 2])``, and block ``b``'s
    windows by ``default_rng([seed, epoch, 3, b])``: deterministic on every machine.
    """
    if block_shards < 1:
        raise DataError(f"block_shards={block_shards} must be >= 1 (--shuffle-block-shards)")
    counts = np.asarray(shard_windows, dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(counts)])
    mask = _train_mask(train, int(cum[-1]))
    shards = np.random.default_rng([seed, epoch, _SHARD_STREAM]).permutation(len(counts))
    parts = [np.zeros(0, dtype=np.int64)]
    for b, start in enumerate(range(0, len(shards), block_shards)):
        ids = np.concatenate(
            [np.arange(cum[k], cum[k + 1]) for k in shards[start:start + block_shards]]
        )
        ids = ids[mask[ids]]
        parts.append(np.random.default_rng([seed, epoch, _BLOCK_STREAM, b]).permutation(ids))
    return np.concatenate(parts)


def shard_schedule(order: np.ndarray, cum: np.ndarray) -> list[tuple[int, int, int]]:
    """(shard, first offset, last offset) at which ``order`` uses each shard, by first use.

    ``cum`` is the cumulative window count per shard (``[0, n0, n0+n1, ...]``). A downloader
    fetches shards in this order; a shard whose last offset is behind the consumed position
    is done for the epoch and may be evicted.
    """
    order = np.asarray(order, dtype=np.int64)
    if len(order) == 0:
        return []
    shard_of = np.searchsorted(np.asarray(cum), order, side="right") - 1
    shards, first = np.unique(shard_of, return_index=True)
    _, from_end = np.unique(shard_of[::-1], return_index=True)
    last = len(order) - 1 - from_end
    by_first = np.argsort(first, kind="stable")
    return [(int(shards[i]), int(first[i]), int(last[i])) for i in by_first]

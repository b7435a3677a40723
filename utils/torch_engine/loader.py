"""The torch engine's input pipeline: the shared sampler's batches through a DataLoader."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import numpy as np
import torch
import torch.utils.data

from utils.data import BatchSampler


def _as_tensors(collate: Callable[[list], dict[str, np.ndarray]],
                rows: list) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(value) for key, value in collate(rows).items()}


class _ReadAhead:
    """What a DataLoader iterates: the sampler's batches from its position, read-only."""

    def __init__(self, sampler: BatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[int]]:
        return self.sampler.batches_from(self.sampler.position)




def make_torch_loader(
    examples: Sequence, sampler: BatchSampler, collate: Callable[[list], dict],
    num_workers: int = 0, prefetch_factor: int | None = None, pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """An infinite DataLoader of LongTensor (B, seq_len+1) that keeps ``sampler.position`` exact.

    ``examples`` is any map-style dataset (pretraining windows, fine-tuning examples) and
    ``collate`` the stage's numpy collate; its arrays become tensors in the worker processes.

    Workers read ahead, so the loader advances the sampler only as each batch reaches the
    caller (see :class:`WindowBatchSampler`). Do not pass it through ``accelerator.prepare``:
    that re-shards the batches, which the sampler already did per rank.
    """
    class _PositionTrackingLoader(torch.utils.data.DataLoader):
        def __iter__(self) -> Iterator[torch.Tensor]:  # type: ignore[override]
            for batch in super().__iter__():
                sampler.advance(1)
                yield batch

    return _PositionTrackingLoader(
        examples,  # type: ignore[arg-type]  # map-style: __len__ + __getitem__
        batch_sampler=_ReadAhead(sampler),
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
        collate_fn=partial(_as_tensors, collate),
        # Its own generator: starting an iterator must not draw from the global torch RNG,
        # or a resumed run's dropout masks would be one draw off the uninterrupted run's.
        generator=torch.Generator().manual_seed(0),
    )

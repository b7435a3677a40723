"""Pretraining data, framework-neutral: shards as windows (``shards``), and the order each
process reads them in, resumable (``sampler``)."""

from utils.data.sampler import (
    DataPosition,
    WindowBatchSampler,
    group_by_length,
    position_after,
    train_eval_split,
)
from utils.data.shards import (
    BIN_DTYPES,
    HOW_TO_GET_DATA,
    MAX_OPEN_SHARDS,
    META_NAME,
    SHARD_SUFFIXES,
    STATS_NAME,
    TokenWindows,
    find_shards,
    read_dataset_meta,
)
from utils.errors import DataError

__all__ = [
    "BIN_DTYPES", "HOW_TO_GET_DATA", "MAX_OPEN_SHARDS", "META_NAME", "SHARD_SUFFIXES",
    "STATS_NAME", "DataError", "DataPosition", "TokenWindows", "WindowBatchSampler",
    "find_shards", "group_by_length", "position_after", "read_dataset_meta", "train_eval_split",
]

"""Pretraining data, framework-neutral: shards as windows (``shards``), and the order each
process reads them in, resumable (``sampler``), also over weighted sources (``mixture``)."""

from utils.data.mixture import (
    ConcatWindows,
    MixtureBatchSampler,
    MixturePosition,
    Source,
    parse_mix,
    source_weights,
    split_count,
)
from utils.data.sampler import (
    BatchSampler,
    DataPosition,
    WindowBatchSampler,
    group_by_length,
    position_after,
    position_from_dict,
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
    "BIN_DTYPES", "BatchSampler", "ConcatWindows", "HOW_TO_GET_DATA", "MAX_OPEN_SHARDS",
    "META_NAME", "SHARD_SUFFIXES",
    "STATS_NAME", "DataError", "DataPosition", "MixtureBatchSampler", "MixturePosition",
    "Source", "TokenWindows", "WindowBatchSampler",
    "find_shards", "group_by_length", "parse_mix", "position_after", "position_from_dict",
    "read_dataset_meta", "source_weights", "split_count", "train_eval_split",
]

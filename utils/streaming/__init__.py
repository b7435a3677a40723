"""Streaming shards from the bucket while training, under a bounded local cache.

``index`` builds the shard table from one listing (``remote_shards``), ``cache`` keeps the
shards the block order needs next on local disk (``ShardCache``, one per machine) and lets
every reader wait for them (``ShardWait``, ``stream_windows``), until a stop request
(``StopWatch``, ``WaitStopped``). ``sources`` puts them together per data source for the task
and the loop (``open_source``, ``StreamFeed``). The window order itself is ``utils.data.blocks``.
"""

from utils.streaming.cache import (
    ShardCache,
    ShardWait,
    StopWatch,
    WaitStopped,
    minimum_bytes,
    stop_readers,
    stream_windows,
)
from utils.streaming.index import INDEX_NAME, RemoteShard, remote_shards

__all__ = [
    "INDEX_NAME", "RemoteShard", "ShardCache", "ShardWait", "StopWatch", "WaitStopped",
    "minimum_bytes", "remote_shards", "stop_readers", "stream_windows",
]

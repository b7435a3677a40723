"""The training data on local disk before the first step (``--sync-data``, skip-existing).

One process per machine downloads; the others wait at the barrier. Streaming runs
(``--stream``) skip this: their shards arrive while training.
"""

from __future__ import annotations

from pathlib import Path

from configs.training_config import TrainingConfig
from utils.data import source_weights
from utils.errors import TrainingError
from utils.processes import Processes
from utils.storage import open_bucket
from utils.streaming.sources import fetch_shared_meta


def sync_training_data(config: TrainingConfig, processes: Processes) -> None:
    """One process per node downloads (skip-existing); the others wait at the barrier.

    With ``--data-mix`` only the mixed sources' sub-folders are synced (a bucket may hold
    many more), plus the prefix's own ``dataset.json`` (the tokenizer facts they share).
    """
    if not config.sync_data or config.stream:  # streaming fetches shards as they are needed
        return
    if processes.is_local_main_process:
        from utils.storage import sync_down

        # the bucket section: credentials, billing project, streams
        store = open_bucket(config.bucket_settings).child(config.data_prefix)
        for folder in source_weights(config.data_mix):
            result = sync_down(store.child(folder) if folder else store,
                               Path(config.data_dir) / folder,
                               max_files=config.max_files or None)
            print(result.summary("downloaded"))
            if result.failed:
                raise TrainingError(f"{len(result.failed)} data files failed to sync from "
                                    f"{store.url}/{folder}: {result.failed[0]}")
        if config.data_mix:
            fetch_shared_meta(store, Path(config.data_dir))
    processes.wait_for_everyone()

#!/usr/bin/env python
"""Download training data from a bucket (gs://, file:// or a directory) into data/training/.

Re-running is cheap: files whose size and crc32c already match are skipped without being
downloaded or re-hashed, so this is safe to call before every training run. Local files are
never deleted; a stale one is replaced only by a verified download (hidden temporaries that
an interrupted run left behind are removed). A bucket prefix that holds no objects is an
error, not an empty success: it is almost always a typo.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from configs.cli import WEEK_S, OneLineParser, Range, count, number, run_main
from utils.storage import (
    BILLING_PROJECT_ENV,
    StorageError,
    check_credentials_value,
    open_store,
    sync_down,
)

DEFAULT_DEST = Path("data/training")
RETRY_DEADLINE = Range(0, WEEK_S, low_open=True, note="seconds of retries; at most a week")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="download_training_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--bucket", required=True, metavar="URL",
                   help="gs://BUCKET/prefix, file://DIR or a local directory")
    p.add_argument("--dest", type=Path, default=DEFAULT_DEST,
                   help=f"destination directory (default {DEFAULT_DEST}/)")
    p.add_argument("--prefix", default="", help="only objects whose name starts with this")
    p.add_argument("--max-files", type=number(int, count(0, "0 = all")), default=0, metavar="N",
                   help="only the first N objects in name order (default 0 = all, as "
                        "train.py's --max-files)")
    p.add_argument("--dry-run", action="store_true",
                   help="report what would be downloaded; change nothing")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every local file instead of trusting the hash cache")
    p.add_argument("--workers", type=number(int, count(1)), default=8,
                   help="concurrent transfers")
    p.add_argument("--credentials", default=None, metavar="PATH",
                   help="service-account key (a path, or a file name under credentials/)")
    p.add_argument("--billing-project", default=None, metavar="PROJECT",
                   help="project billed for a requester-pays bucket's requests (default "
                        f"${BILLING_PROJECT_ENV}, else none)")
    p.add_argument("--retry-deadline", type=number(float, RETRY_DEADLINE), default=120.0,
                   metavar="S",
                   help="give up on transient errors after S seconds of retries (default 120)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when everything is in place, 1 if some files failed, 2 if the sync could not run."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        # Before anything can echo it: a key's contents pasted where its path belongs.
        check_credentials_value(args.credentials, "--credentials")
        store = open_store(args.bucket, args.credentials, retry_deadline_s=args.retry_deadline,
                           billing_project=args.billing_project)
        result = sync_down(
            store,
            args.dest,
            args.prefix,
            max_files=args.max_files or None,
            workers=args.workers,
            dry_run=args.dry_run,
            verify=args.verify,
            progress=not args.no_progress,
        )
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished files are kept; run again to resume", file=sys.stderr)
        return 130
    for line in result.failed:
        print(f"failed: {line}", file=sys.stderr)
    print(result.summary("downloaded"))
    return 1 if result.failed else 0


if __name__ == "__main__":
    run_main(main, "download_training_data.py")

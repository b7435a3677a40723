"""The one-line error types every layer raises, and the idiom that keeps them one line.

Each ``str(error)`` is a single readable line naming the problem and the fix; the command-line
entry points print it as ``error: ...`` and exit non-zero instead of showing a traceback. They
live here, below every other layer, so configs, storage, data, checkpoints, stages and both
engines can raise them without importing each other.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path


class HarnessError(Exception):
    """Base of the errors a user can act on; str() is one line naming the problem and fix."""


class ConfigError(HarnessError, ValueError):
    """A configuration problem (bad flag value, incompatible options)."""


class DataError(HarnessError):
    """Training data that cannot be used (missing, malformed, inconsistent)."""


class StorageError(HarnessError):
    """A bucket or local store problem; names the bucket/path and the fix."""


class CheckpointError(HarnessError, RuntimeError):
    """A checkpoint that cannot be used; names it and says what to do."""


class TrainingError(HarnessError, RuntimeError):
    """Stops the run with one readable line (NaN loss, bad resume target, ...)."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's text (or its type name), at most ``limit``.

    Library exceptions often carry multi-line dumps; a one-line error quotes only this.
    """
    lines = str(err).strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:limit]


def disk_full(err: BaseException, where: Path | None = None) -> bool:
    """Whether a failed write ran out of disk: ENOSPC, or a library's wrapped form of it.

    torch.save reports a full disk as a RuntimeError from its zip writer ("file write
    failed", "unexpected pos"), so a write error counts too when ``where`` has under 64 MiB
    left.
    """
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(err):
        return True
    try:
        return where is not None and shutil.disk_usage(where).free < 64 * 2**20
    except OSError:
        return False


def no_space(folder: Path, writing: str, need_bytes: int, fix: str) -> str:
    """The disk-full line: the folder, what was being written, the room it needs and the room
    left, and the fix. A full disk is never the data's or the bucket's fault, whatever the
    write was part of (a download, a checkpoint, a copy of the logs)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    return (f"no space left on the device of {folder} while writing {writing} (it needs about "
            f"{need_bytes / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB are free): {fix}")


def json_object(text: str, where: str, fix: str) -> dict:
    """``text`` parsed as one JSON object, or a DataError naming ``where`` and ``fix``.

    Whatever the decoder raises becomes that one line: malformed JSON, nesting deep enough
    for a RecursionError, an integer of thousands of digits (ValueError); user data never
    shows a traceback.
    """
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); "
                        f"{fix}") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read; {fix}") from None
    except Exception as err:  # noqa: BLE001 - e.g. ValueError for a 5,000-digit integer
        # Only the first clause: Python's advice after ";" (set_int_max_str_digits) is not
        # the data's author's to follow.
        raise DataError(f"{where}: not readable as JSON ({first_line(err).split(';')[0]}); "
                        f"{fix}") from None
    if not isinstance(record, dict):
        kind = "null" if record is None else type(record).__name__
        raise DataError(f"{where}: expected a JSON object, got {kind}; {fix}")
    return record

"""Is a credentials value a path, or the key itself? Asked before anything can echo it.

``GOOGLE_APPLICATION_CREDENTIALS="$(cat key.json)"`` or ``--credentials "$(cat key.json)"``
hand over the private key where its path belongs; opening it as a path then fails with the
whole key in the error. Plain string checks, below every other layer, so the command line
(``configs/cli.py``) and the storage layer refuse such a value the same way.
"""

from __future__ import annotations

import re

ENV_VAR = "GOOGLE_APPLICATION_CREDENTIALS"

# Longer than any path Linux accepts (PATH_MAX), or a component longer than NAME_MAX: such a
# value cannot name a file, and a key pasted in (or base64-encoded) is usually that long.
_MAX_PATH_CHARS = 4096
_MAX_NAME_BYTES = 255
# A key passed base64-encoded (as some CI secret stores hand it over) has no newline or brace:
# over 1024 characters of nothing but the base64 alphabet is no file path anyone uses.
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=_-]{1025,}$")


def how_to_fix(source: str) -> str:
    """How to point ``source`` at the key file, in the words that fit a flag or a variable."""
    if source.startswith("--"):
        return f"pass {source} the path of the JSON key file (e.g. credentials/KEY.json)"
    if source == ENV_VAR:
        return f"set {ENV_VAR} to the path of the JSON key file (e.g. /path/to/KEY.json)"
    return f"give {source} the path of the JSON key file (e.g. credentials/KEY.json)"


def _not_a_path(value: str) -> bool:
    """Whether value is something other than a file path (most likely the key's contents)."""
    return (
        value.lstrip().startswith("{")
        or "\n" in value
        or "\r" in value
        or "\0" in value
        or "private_key" in value
        or len(value) > _MAX_PATH_CHARS
        or _BASE64_RE.match(value.strip()) is not None
        or any(len(part.encode(errors="replace")) > _MAX_NAME_BYTES
               for part in re.split(r"[/\\]", value))
    )


def credentials_problem(value: str | None, source: str) -> str | None:
    """One line saying ``source`` holds a key's contents rather than a path, or None.

    The line never contains the value. ``source`` names where it came from (``--credentials``,
    the variable, a config field) so the line can say what to change.
    """
    if value and _not_a_path(value):
        return (f"{source} is not a file path (it looks like the key's contents, which are not "
                f"shown); {how_to_fix(source)}")
    return None

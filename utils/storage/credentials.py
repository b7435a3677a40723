"""Google credentials for a GcsStore: a key file (--credentials, under credentials/), or ADC.

A key's contents must never reach a message, a log line or a traceback: only its path and
where the path came from (the flag or the variable) are ever named. check_credentials_value
refuses a value that is the key itself rather than its path before anything else sees it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

from utils.errors import StorageError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CREDENTIALS_DIR = REPO_ROOT / "credentials"
ENV_VAR = "GOOGLE_APPLICATION_CREDENTIALS"

# Longer than any path Linux accepts (PATH_MAX), or a component longer than NAME_MAX: such a
# value cannot name a file, and a key pasted in (or base64-encoded) is usually that long.
_MAX_PATH_CHARS = 4096
_MAX_NAME_BYTES = 255
# A key passed base64-encoded (as some CI secret stores hand it over) has no newline or brace:
# over 1024 characters of nothing but the base64 alphabet is no file path anyone uses.
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=_-]{1025,}$")

# The credential file types google-auth can load; anything else is not a Google key.
_KEY_TYPES = {
    "service_account", "authorized_user", "external_account",
    "external_account_authorized_user", "impersonated_service_account", "gdch_service_account",
}


def _fix(source: str) -> str:
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


def check_credentials_value(value: str | None, source: str) -> None:
    """Refuse a credentials value that is not a path, without ever echoing it.

    ``GOOGLE_APPLICATION_CREDENTIALS="$(cat key.json)"`` or ``--credentials "$(cat key.json)"``
    hand over the private key itself; opening it as a path then fails with the whole key in
    the error. source names where the value came from (``--credentials``, the variable, a
    config field) so the one-line error can say what to change. Empty or None means unset.
    """
    if value and _not_a_path(value):
        raise StorageError(
            f"{source} is not a file path (it looks like the key's contents, which are not "
            f"shown); {_fix(source)}"
        )


def _resolve_key_file(credentials: str, source: str) -> Path:
    """A key path as given, or the name of a file under credentials/ (from the config)."""
    check_credentials_value(credentials, source)
    try:
        given = Path(credentials).expanduser()
        for candidate in (given, CREDENTIALS_DIR / given):
            if candidate.is_file():
                return candidate.resolve()
    except (OSError, RuntimeError) as exc:  # e.g. a parent folder we may not read
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise StorageError(
            f"credentials file {credentials} (from {source}) cannot be checked ({reason}); "
            f"fix its folder's permissions or {_fix(source)}"
        ) from None
    raise StorageError(
        f"credentials file {credentials} (from {source}) not found (also looked in "
        f"{CREDENTIALS_DIR}); put the service-account key there (chmod 600) or {_fix(source)}"
    )


def _warn_if_shared(key: Path) -> None:
    mode = key.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "credentials file %s is accessible to other users (mode %o); run `chmod 600 %s`",
            key, stat.S_IMODE(mode), key,
        )


def _read_key_type(key: Path, source: str) -> tuple[dict[str, Any], str]:
    """The key's JSON and its type; a file that is no Google key is named, never quoted."""
    where = f"credentials file {key} (from {source})"
    try:
        raw = key.read_bytes()
    except OSError as exc:
        raise StorageError(
            f"{where} cannot be read ({exc.strerror or type(exc).__name__}); fix its "
            f"permissions (chmod 600, owned by this user) or {_fix(source)}"
        ) from None
    try:
        info = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise StorageError(
            f"{where} is not a JSON key ({type(exc).__name__}); download a new JSON key for "
            f"the service account and {_fix(source)}"
        ) from None
    kind = info.get("type") if isinstance(info, dict) else None
    if not isinstance(kind, str) or kind not in _KEY_TYPES:
        shown = repr(kind[:40]) if isinstance(kind, str) else "missing"
        raise StorageError(
            f"{where} is not a Google credentials file (its type is {shown}); use a "
            f"service-account JSON key: {_fix(source)}"
        )
    return info, kind


def _load_key(key: Path, scopes: list[str], source: str) -> tuple[Any, str | None]:
    """Load a key file; its contents never reach a message (errors are not chained either)."""
    import google.auth
    from google.auth import exceptions as auth_exc
    from google.oauth2 import credentials as user_credentials
    from google.oauth2 import service_account

    info, kind = _read_key_type(key, source)
    try:
        if kind == "service_account":
            creds = service_account.Credentials.from_service_account_info(info, scopes=scopes)
            return creds, info.get("project_id")
        if kind == "authorized_user":
            creds = user_credentials.Credentials.from_authorized_user_info(info, scopes=scopes)
            return creds, info.get("quota_project_id")
        creds, project = google.auth.load_credentials_from_file(str(key), scopes=scopes)
        return creds, project
    except (auth_exc.GoogleAuthError, ValueError, KeyError, TypeError, OSError) as exc:
        raise StorageError(
            f"credentials file {key} (from {source}) is not a usable Google key "
            f"({type(exc).__name__}); download a new JSON key for the service account and "
            f"{_fix(source)}"
        ) from None


def _load_credentials(credentials: str | None) -> tuple[Any, str | None]:
    """Credentials and project: --credentials key, GOOGLE_APPLICATION_CREDENTIALS, or ADC.

    Both key sources are loaded here rather than by google.auth.default, so a missing or
    broken file is named together with where it came from (google-auth would only say
    "set GOOGLE_APPLICATION_CREDENTIALS"). The variable is checked even with --credentials:
    a key pasted into it would leak through any library that reads it. With
    STORAGE_EMULATOR_HOST the key is still checked (path, permissions, format) so a broken
    config shows up in tests, but the emulator gets anonymous credentials.
    """
    import google.auth
    from google.auth import exceptions as auth_exc
    from google.auth.credentials import AnonymousCredentials

    scopes = ["https://www.googleapis.com/auth/devstorage.read_write"]
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    emulator_project = os.environ.get("GOOGLE_CLOUD_PROJECT", "test")
    env_key = os.environ.get(ENV_VAR)
    check_credentials_value(env_key, ENV_VAR)
    if credentials or env_key:
        source = "--credentials" if credentials else ENV_VAR
        key = _resolve_key_file(credentials or env_key or "", source)
        _warn_if_shared(key)
        creds, project = _load_key(key, scopes, source)
        return (AnonymousCredentials(), emulator_project) if emulator else (creds, project)
    if emulator:
        return AnonymousCredentials(), emulator_project
    try:
        return google.auth.default(scopes=scopes)
    except auth_exc.DefaultCredentialsError:
        raise StorageError(
            "no usable Google credentials (Application Default Credentials failed); run "
            "`gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or "
            "pass --credentials credentials/KEY.json"
        ) from None

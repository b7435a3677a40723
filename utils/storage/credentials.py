"""Google credentials for a GcsStore: a key file (--credentials, under credentials/), or ADC.

A key's contents must never reach a message, a log line or a traceback: only its path and
where the path came from (the flag or the variable) are ever named. check_credentials_value
refuses a value that is the key itself rather than its path before anything else sees it.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from utils.credential_checks import ENV_VAR, credentials_problem, how_to_fix
from utils.errors import StorageError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CREDENTIALS_DIR = REPO_ROOT / "credentials"

# The credential file types google-auth can load; anything else is not a Google key.
_KEY_TYPES = {
    "service_account", "authorized_user", "external_account",
    "external_account_authorized_user", "impersonated_service_account", "gdch_service_account",
}



def check_credentials_value(value: str | None, source: str) -> None:
    """StorageError (one line, never the value) when ``value`` is a key's contents, not a path."""
    problem = credentials_problem(value, source)
    if problem:
        raise StorageError(problem)


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
            f"fix its folder's permissions or {how_to_fix(source)}"
        ) from None
    raise StorageError(
        f"credentials file {credentials} (from {source}) not found (also looked in "
        f"{CREDENTIALS_DIR}); put the service-account key there (chmod 600) or {how_to_fix(source)}"
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
            f"permissions (chmod 600, owned by this user) or {how_to_fix(source)}"
        ) from None
    try:
        info = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise StorageError(
            f"{where} is not a JSON key ({type(exc).__name__}); download a new JSON key for "
            f"the service account and {how_to_fix(source)}"
        ) from None
    kind = info.get("type") if isinstance(info, dict) else None
    if not isinstance(kind, str) or kind not in _KEY_TYPES:
        shown = repr(kind[:40]) if isinstance(kind, str) else "missing"
        raise StorageError(
            f"{where} is not a Google credentials file (its type is {shown}); use a "
            f"service-account JSON key: {how_to_fix(source)}"
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
            f"{how_to_fix(source)}"
        ) from None


def load_credentials(credentials: str | None) -> tuple[Any, str | None]:
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

"""Google credentials for a GcsStore: a key file (--credentials, under credentials/), or ADC."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from utils.errors import StorageError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CREDENTIALS_DIR = REPO_ROOT / "credentials"


def _resolve_key_file(credentials: str, source: str) -> Path:
    """A key path as given, or the name of a file under credentials/ (from the config)."""
    given = Path(credentials).expanduser()
    for candidate in (given, CREDENTIALS_DIR / given):
        if candidate.is_file():
            return candidate.resolve()
    raise StorageError(
        f"credentials file {credentials} (from {source}) not found (also looked in "
        f"{CREDENTIALS_DIR}); "
        "put the service-account key there (chmod 600) or pass its full path"
    )


def _warn_if_shared(key: Path) -> None:
    mode = key.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "credentials file %s is accessible to other users (mode %o); run `chmod 600 %s`",
            key, stat.S_IMODE(mode), key,
        )


def _load_key(key: Path, scopes: list[str]) -> tuple[Any, str | None]:
    """Load a service-account or user key; its contents never reach a message, only its path."""
    from google.auth import exceptions as auth_exc
    from google.oauth2 import credentials as user_credentials
    from google.oauth2 import service_account

    try:
        info = json.loads(key.read_text())
        kind = info.get("type") if isinstance(info, dict) else None
        if kind == "service_account":
            creds = service_account.Credentials.from_service_account_info(info, scopes=scopes)
            return creds, info.get("project_id")
        if kind == "authorized_user":
            creds = user_credentials.Credentials.from_authorized_user_info(info, scopes=scopes)
            return creds, info.get("quota_project_id")
    except (auth_exc.GoogleAuthError, ValueError, KeyError, OSError) as exc:
        raise StorageError(
            f"credentials file {key} is not a usable Google key ({type(exc).__name__}); "
            "download a new JSON key for the service account"
        ) from exc
    raise StorageError(
        f"credentials file {key} is not a service-account or user key (type {kind!r}); "
        "use a service-account JSON key, or Application Default Credentials"
    )


def _load_credentials(credentials: str | None) -> tuple[Any, str | None]:
    """Credentials and project: --credentials key, GOOGLE_APPLICATION_CREDENTIALS, or ADC.

    With STORAGE_EMULATOR_HOST the key is still checked (path, permissions, format) so a
    broken config shows up in tests, but the emulator gets anonymous credentials.
    """
    import google.auth
    from google.auth import exceptions as auth_exc
    from google.auth.credentials import AnonymousCredentials

    scopes = ["https://www.googleapis.com/auth/devstorage.read_write"]
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    emulator_project = os.environ.get("GOOGLE_CLOUD_PROJECT", "test")
    if credentials:
        key = _resolve_key_file(credentials, "--credentials")
        _warn_if_shared(key)
        creds, project = _load_key(key, scopes)
        return (AnonymousCredentials(), emulator_project) if emulator else (creds, project)
    env_key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if env_key:
        _warn_if_shared(_resolve_key_file(env_key, "GOOGLE_APPLICATION_CREDENTIALS"))
    if emulator:
        return AnonymousCredentials(), emulator_project
    try:
        return google.auth.default(scopes=scopes)
    except auth_exc.DefaultCredentialsError as exc:
        raise StorageError(
            "no usable Google credentials (Application Default Credentials failed); run "
            "`gcloud auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or "
            "pass --credentials credentials/KEY.json"
        ) from exc

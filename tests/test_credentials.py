"""Google keys never leak, and a broken key is named with where it came from.

Every test uses a real service-account key (a fresh RSA private key, generated here) and
checks that no part of it (the PEM body lines, the private_key_id) reaches stdout, stderr,
a log record, an exception (chained ones included) or any file the process wrote.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_train
from helpers import finish

from utils.storage import StorageError, check_credentials_value, open_store

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "download_training_data.py"
ENV = "GOOGLE_APPLICATION_CREDENTIALS"
HOW = "the path of the JSON key file"


@dataclass
class Key:
    """A key file on disk, its text, and the strings that must never be shown."""

    path: Path
    text: str
    material: list[str]


def make_key(path: Path, *, kind: str = "service_account", cut_pem: bool = False) -> Key:
    """A real service-account key; cut_pem drops PEM lines so google-auth cannot load it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    key_id = secrets.token_hex(20)
    shown_pem = "\n".join(pem.splitlines()[:-4] + pem.splitlines()[-1:]) if cut_pem else pem
    info = {
        "type": kind, "project_id": "leak-test", "private_key_id": key_id,
        "private_key": shown_pem, "client_email": "trainer@leak-test.iam.gserviceaccount.com",
        "client_id": "123456789012345678901", "token_uri": "https://oauth2.googleapis.com/token",
    }
    text = json.dumps(info, indent=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o600)
    return Key(path, text, [line for line in body if line in shown_pem] + [key_id])


@pytest.fixture
def key(tmp_path: Path) -> Key:
    return make_key(tmp_path / "keys" / "svc.json")


def assert_no_key_material(key: Key, *texts: str, under: Path | None = None) -> None:
    """No PEM body line and no private_key_id in texts or in any file under `under`."""
    blobs = {f"text {i}": t for i, t in enumerate(texts)}
    if under is not None and under.exists():
        for path in under.rglob("*"):
            if path.is_file() and not path.is_symlink():
                blobs[str(path)] = path.read_bytes().decode("latin-1")
    leaks = [where for where, blob in blobs.items() if any(m in blob for m in key.material)]
    assert not leaks, f"key material shown in: {leaks}"  # never the material itself


def chain_text(exc: BaseException) -> str:
    """The text of an exception and of everything it was raised from or during."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 20:
        parts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return finish(
        [sys.executable, str(SCRIPT), "--no-progress", *args], cwd=cwd, env=env)


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No emulator and no ambient Google configuration: credentials alone decide."""
    env = {k: v for k, v in os.environ.items() if k not in ("STORAGE_EMULATOR_HOST", ENV)}
    env.update(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="True")
    return env


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------- the check itself


def test_check_credentials_value_refuses_contents_and_accepts_paths(key: Key) -> None:
    for path in ("credentials/svc.json", "/abs/keys/svc.json", "~/svc.json", "", None,
                 "/".join(["folder"] * 80) + "/k.json"):
        check_credentials_value(path, "--credentials")
    pasted = {
        "json": key.text,
        "json after spaces": "  " + key.text,
        "one line of json": json.dumps(json.loads(key.text)),
        "pem": json.loads(key.text)["private_key"],
        "names private_key": "private_key=abc",
        "newline": "keys/a\nb.json",
        "over 4096 characters": "k/" * 2100,
        "a name over 255 bytes": "k" * 300 + ".json",
        "base64 of the key": base64.b64encode(key.text.encode()).decode(),
    }
    for what, value in pasted.items():
        for source in ("--credentials", ENV):
            with pytest.raises(StorageError) as err:
                check_credentials_value(value, source)
            message = str(err.value)
            assert "\n" not in message and source in message and HOW in message, what
            assert "not a file path" in message and value not in message, what
            assert_no_key_material(key, message, chain_text(err.value))


def test_open_store_refuses_key_contents_from_flag_and_variable(
    gcs_bucket: str, key: Key, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(StorageError, match="--credentials is not a file path") as flag:
            open_store(gcs_bucket, credentials=key.text)
        monkeypatch.setenv(ENV, key.text)
        with pytest.raises(StorageError, match=f"{ENV} is not a file path") as env:
            open_store(gcs_bucket)
        # A pasted key in the variable is refused even when --credentials names a good file:
        # every library that reads the variable could show it.
        with pytest.raises(StorageError, match=f"{ENV} is not a file path") as both:
            open_store(gcs_bucket, credentials=str(key.path))
    for err in (flag, env, both):
        assert_no_key_material(key, chain_text(err.value))
    assert_no_key_material(key, caplog.text)


def test_variable_with_a_good_key_is_loaded_and_used(
    gcs_bucket: str, key: Key, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENV, str(key.path))
    with caplog.at_level(logging.DEBUG):
        store = open_store(gcs_bucket)
        store.write_bytes("k", b"v")
        assert store.read_bytes("k") == b"v"
    assert "chmod" not in caplog.text
    assert_no_key_material(key, caplog.text)


# ---------------------------------------------------------------- the command lines


@pytest.mark.parametrize(("source", "form"), [
    ("flag", "json"), ("env", "json"), ("env", "base64"),
])
def test_download_cli_never_prints_a_pasted_key(
    source: str, form: str, gcs_bucket: str, key: Key, tmp_path: Path
) -> None:
    value = key.text if form == "json" else base64.b64encode(key.text.encode()).decode()
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ)
    args = ["--bucket", f"{gcs_bucket}/data", "--dest", str(out / "dest")]
    if source == "flag":
        args += ["--credentials", value]
    else:
        env[ENV] = value
    proc = run_cli(args, cwd=out, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    line = one_error_line(proc)
    name = "--credentials" if source == "flag" else ENV
    assert line.startswith(f"error: {name} is not a file path") and HOW in line
    assert_no_key_material(key, proc.stdout, proc.stderr, under=out)


@pytest.mark.parametrize("source", ["flag", "env"])
def test_train_never_prints_a_pasted_key(
    source: str, gcs_bucket: str, key: Key, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["--config", "smoke", "--sync-data", "--bucket", f"{gcs_bucket}/data",
            "--data-dir", str(out / "data"), "--output-dir", str(out / "run"),
            "--max-steps", "1"]
    env = {"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]}
    if source == "flag":
        args += ["--credentials", key.text]
    else:
        env[ENV] = key.text
    proc = run_train(*args, tmp_path=tmp_path, env=env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    name = "--credentials" if source == "flag" else ENV
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"{name} is not a file path" in errors[0], proc.stderr[-3000:]
    assert HOW in errors[0]
    assert_no_key_material(key, proc.stdout, proc.stderr, under=out)


def _broken(kind: str, tmp_path: Path) -> tuple[Key, str]:
    """A key file broken in one way, and the words the one-line error must use for it."""
    if kind == "not_json":  # the PEM alone, a common mix-up
        key = make_key(tmp_path / "keys" / "svc.json")
        pem_path = tmp_path / "keys" / "svc.pem"
        pem_path.write_text(json.loads(key.text)["private_key"])
        pem_path.chmod(0o600)
        return Key(pem_path, key.text, key.material), "is not a JSON key"
    if kind == "wrong_type":
        return make_key(tmp_path / "keys" / "svc.json", kind="service-account"), (
            "is not a Google credentials file (its type is 'service-account')")
    if kind == "unusable":
        return make_key(tmp_path / "keys" / "svc.json", cut_pem=True), (
            "is not a usable Google key")
    missing = make_key(tmp_path / "elsewhere" / "svc.json")
    return Key(tmp_path / "keys" / "nope.json", missing.text, missing.material), "not found"


@pytest.mark.parametrize("source", ["env", "flag"])
@pytest.mark.parametrize("kind", ["not_json", "wrong_type", "unusable", "missing"])
def test_broken_key_file_is_named_with_its_source(source: str, kind: str, tmp_path: Path) -> None:
    """GOOGLE_APPLICATION_CREDENTIALS gets the same clear line as --credentials."""
    key, words = _broken(kind, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    env = offline_env(tmp_path)
    args = ["--bucket", "gs://some-bucket/data", "--dest", str(out / "dest"),
            "--retry-deadline", "5"]
    if source == "flag":
        args += ["--credentials", str(key.path)]
    else:
        env[ENV] = str(key.path)
    proc = run_cli(args, cwd=out, env=env)
    assert proc.returncode == 2
    line = one_error_line(proc)
    name = "--credentials" if source == "flag" else ENV
    assert f"credentials file {key.path} (from {name}) {words}" in line, line
    assert "no usable Google credentials" not in line
    assert_no_key_material(key, proc.stdout, proc.stderr, under=out)


def test_broken_key_errors_carry_no_key_text(
    gcs_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing chained to the one-line error quotes the file (a traceback would show it)."""
    for kind in ("not_json", "wrong_type", "unusable"):
        key, words = _broken(kind, tmp_path / kind)
        monkeypatch.setenv(ENV, str(key.path))
        with pytest.raises(StorageError, match=re.escape(words)) as err:
            open_store(gcs_bucket)  # with the emulator too: the key is still checked
        assert_no_key_material(key, chain_text(err.value))

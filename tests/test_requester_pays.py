"""Requester-pays buckets: the billing project reaches every request; without it, one line.

fake-gcs-server does not enforce requester pays, so a small HTTP proxy (a real threading
server) sits between the real google-cloud-storage client and the real emulator: it records
every request's query string, and in requester-pays mode answers what GCS answers to a request
without ``userProject`` (its real JSON error body), forwarding everything else unchanged.

A resumable upload's later chunks go to the session URL the server handed out (``upload_id``);
the client sends them as given, the session was billed when it was opened, and the emulator
drops userProject from that URL: those requests are counted as part of their session.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from gcs_emulator import FaultProxy, GcsEmulator
from helpers import finish

from configs.cli import parse_args
from utils.checkpoint import choose_resume, remote_complete
from utils.checkpoint.publisher import CheckpointPublisher
from utils.loop.data_sync import sync_training_data
from utils.loop.resuming import open_checkpoint_store
from utils.processes import ONE_PROCESS
from utils.storage import (
    BILLING_PROJECT_ENV,
    LocalStore,
    StorageError,
    Store,
    open_bucket,
    open_store,
    sync_down,
    sync_up,
)

REPO = Path(__file__).resolve().parent.parent
PAYER = "payer-project-42"
# GCS's answers, as its JSON API words them (reason "required"; the XML API's code is
# UserProjectMissing), and the two a wrong billing project gets.
MISSING = (400, "Bucket is a requester pays bucket but no user project provided.", "required")
INVALID = (400, "User project specified in the request is invalid.", "invalid")
NO_PERMISSION = (403, "tester@example.iam.gserviceaccount.com does not have "
                      "serviceusage.services.use access to the Google Cloud project.", "forbidden")


class BillingProxy:
    """A FaultProxy in front of the emulator that can play a requester-pays bucket.

    With ``requester_pays`` set, a request without userProject gets GCS's 400; ``refuse`` maps
    a userProject value to the error GCS gives for it (invalid, or not allowed to bill).
    """

    def __init__(self, target: str) -> None:
        self.requester_pays = False
        self.refuse: dict[str, tuple[int, str, str]] = {}
        self._proxy = FaultProxy(target, [], answer=self.answer)

    @property
    def url(self) -> str:
        return self._proxy.url

    @property
    def requests(self) -> list[str]:
        """"METHOD path?query" of every request, in order."""
        return self._proxy.requests

    def billed(self) -> list[tuple[str, str | None]]:
        """(request, its userProject) for every request that opens or is a whole operation."""
        return [(r, _query(r).get("userProject")) for r in self.requests
                if "upload_id" not in _query(r)]

    def answer(self, request: str) -> tuple[int, str, str] | None:
        """The error this request gets instead of being forwarded, if any."""
        query = _query(request)
        if "upload_id" in query:
            return None  # a chunk of a session opened (and billed) by an earlier request
        if "userProject" not in query:
            return MISSING if self.requester_pays else None
        return self.refuse.get(query["userProject"])

    def __enter__(self) -> BillingProxy:
        self._proxy.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._proxy.stop()


def _query(request: str) -> dict[str, str]:
    """The query parameters of a recorded "METHOD path?query" (first value of each)."""
    query = urllib.parse.urlsplit(request.split(" ", 1)[1]).query
    return {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}


@pytest.fixture
def proxy(gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[BillingProxy]:
    """The proxy in front of the session's emulator; the client (and subprocesses) use it."""
    with BillingProxy(gcs_emulator.url) as running:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", running.url)
        monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
        monkeypatch.delenv(BILLING_PROJECT_ENV, raising=False)
        yield running


_ids = itertools.count()


@pytest.fixture
def bucket(gcs_emulator: GcsEmulator, proxy: BillingProxy) -> str:
    """A fresh bucket, created straight on the emulator (not through the proxy)."""
    return gcs_emulator.create_bucket(f"payer-bucket-{next(_ids)}")


def _tree(root: Path, big: int = 0) -> Path:
    """Small files, plus one over 8 MiB when big (the client uploads that one resumably)."""
    files = {"a.bin": b"a" * 1000, "sub/b.bin": b"b" * 70_000, "sub/deep/c.txt": b"c"}
    if big:
        files["big.bin"] = os.urandom(big)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _checkpoint(root: Path, step: int) -> Path:
    """A checkpoint folder the publisher accepts: state, config, weights, optimizer."""
    folder = root / f"checkpoint-epoch0-step{step}-files1"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(os.urandom(9 * 2**20))  # resumable upload
    (folder / "optimizer.pt").write_bytes(os.urandom(5000))
    return folder


def _kind(request: str) -> str:
    """What a recorded request did, in the JSON API's terms."""
    method, path = request.split(" ", 1)
    query = _query(request)
    if path.startswith("/upload/"):
        return f"upload-{query.get('uploadType', '?')}"
    if query.get("alt") == "media":
        return "download"
    if method == "DELETE":
        return "delete"
    return "list" if urllib.parse.urlsplit(path).path.endswith("/o") else f"{method}-object"


# ---------------------------------------------------------------- the project reaches GCS

def test_billing_project_is_on_every_request(bucket: str, proxy: BillingProxy,
                                             tmp_path: Path) -> None:
    store = open_store(bucket, retry_deadline_s=10, billing_project=PAYER)
    sync_up(_tree(tmp_path / "src", big=9 * 2**20), store, "data", progress=False)
    result = sync_down(store.child("data"), tmp_path / "dest", progress=False)
    assert not result.failed and (tmp_path / "dest/big.bin").read_bytes() == (
        tmp_path / "src/big.bin").read_bytes()
    store.write_bytes("note.txt", b"hello", if_absent=True)
    assert store.read_bytes("note.txt") == b"hello" and store.exists("note.txt")
    store.check_access(write=True)  # list, write and delete a probe
    store.delete("note.txt")
    assert store.nearby("dat") and not store.exists("note.txt")

    # Checkpoint-style: publish two (the bucket keeps one: a remote prune deletes), resume.
    publisher = CheckpointPublisher(store, "checkpoints/run", background=False, remote_keep=1,
                                    log=lambda _: None)
    for step in (1, 2):
        publisher.submit(_checkpoint(tmp_path / "ckpts", step))
    assert remote_complete(store, "checkpoints/run") == ["checkpoint-epoch0-step2-files1"]
    got = choose_resume("latest", tmp_path / "elsewhere", store, "checkpoints/run")
    assert got is not None and (got / "model.safetensors").read_bytes() == (
        tmp_path / "ckpts" / got.name / "model.safetensors").read_bytes()

    billed = proxy.billed()
    assert {"list", "download", "delete", "GET-object", "upload-multipart",
            "upload-resumable"} <= {_kind(r) for r, _ in billed}
    assert [r for r, project in billed if project != PAYER] == []
    assert len(billed) >= 30 and len(proxy.requests) > len(billed)  # chunks of the big files


def test_environment_and_config_name_the_billing_project(
    bucket: str, proxy: BillingProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    open_store(bucket).list()
    assert [p for _, p in proxy.billed()] == [None]  # nothing given: nothing sent
    monkeypatch.setenv(BILLING_PROJECT_ENV, "from-env")
    open_store(bucket).list()
    open_store(bucket, billing_project="from-flag").list()  # the flag wins over the variable
    config, _ = parse_args(["--config", "smoke", "--bucket", bucket,
                            "--billing-project", "from-config"])
    open_bucket(config.bucket_settings).child("x").list()
    assert [p for _, p in proxy.billed()][1:] == ["from-env", "from-flag", "from-config"]
    local = open_store(str(tmp_path), billing_project="ignored")  # local stores ignore it
    assert isinstance(local, LocalStore) and local.list() == []


# ---------------------------------------------------------------- a requester-pays bucket

def _fails_fast_in_one_line(call, proxy: BillingProxy) -> str:
    before = len(proxy.requests)
    start = time.monotonic()
    with pytest.raises(StorageError) as caught:
        call()
    assert time.monotonic() - start < 5  # a 400 is not transient: no 30 s retry loop
    assert len(proxy.requests) - before == 1  # answered once, never retried
    text = str(caught.value)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.mark.parametrize("operation", ["list", "read", "write", "upload", "download", "delete",
                                       "check_access"])
def test_requester_pays_without_project_is_one_line(
    operation: str, bucket: str, proxy: BillingProxy, tmp_path: Path
) -> None:
    open_store(bucket).write_bytes("obj.bin", b"x" * 100)
    proxy.requester_pays = True
    store = open_store(bucket, retry_deadline_s=30)
    (tmp_path / "f.bin").write_bytes(b"y" * 10)
    calls = {
        "list": store.list,
        "read": lambda: store.read_bytes("obj.bin"),
        "write": lambda: store.write_bytes("new.bin", b"z"),
        "upload": lambda: store.upload_file(tmp_path / "f.bin", "f.bin"),
        "download": lambda: store.download_file("obj.bin", tmp_path / "got.bin"),
        "delete": lambda: store.delete("obj.bin"),
        "check_access": store.check_access,
    }
    text = _fails_fast_in_one_line(calls[operation], proxy)
    assert text.startswith(f"{bucket}") and "requester-pays" in text
    assert "--billing-project PROJECT" in text and BILLING_PROJECT_ENV in text
    assert not (tmp_path / "got.bin").exists()

    paid = open_store(bucket, retry_deadline_s=30, billing_project=PAYER)
    assert paid.read_bytes("obj.bin") == b"x" * 100 and [o.name for o in paid.list()] == [
        "obj.bin"]


@pytest.mark.parametrize("answer", [INVALID, NO_PERMISSION], ids=["invalid", "not-allowed"])
def test_wrong_billing_project_is_one_line(answer: tuple[int, str, str], bucket: str,
                                           proxy: BillingProxy) -> None:
    proxy.requester_pays = True
    proxy.refuse["not-mine"] = answer
    store = open_store(bucket, retry_deadline_s=30, billing_project="not-mine")
    text = _fails_fast_in_one_line(store.list, proxy)
    assert "'not-mine'" in text and "--billing-project" in text and f"({answer[0]}" in text


def test_training_setup_threads_the_billing_project(bucket: str, proxy: BillingProxy,
                                                    tmp_path: Path) -> None:
    """The loop's own data sync and checkpoint bucket, as train.py calls them."""
    sync_up(_tree(tmp_path / "src"), open_store(bucket), "training", progress=False)
    proxy.requester_pays = True
    args = ["--config", "smoke", "--bucket", bucket, "--sync-data", "--data-prefix", "training",
            "--data-dir", str(tmp_path / "data")]
    config, _ = parse_args(args)
    with pytest.raises(StorageError, match="--billing-project"):
        sync_training_data(config, ONE_PROCESS)
    with pytest.raises(StorageError, match="--billing-project"):
        open_checkpoint_store(config, ONE_PROCESS)

    config, _ = parse_args([*args, "--billing-project", PAYER])
    sync_training_data(config, ONE_PROCESS)
    store: Store | None = open_checkpoint_store(config, ONE_PROCESS)
    assert store is not None and (tmp_path / "data/sub/deep/c.txt").read_bytes() == b"c"


def test_download_cli_names_the_flag_in_one_line(bucket: str, proxy: BillingProxy,
                                                 tmp_path: Path) -> None:
    sync_up(_tree(tmp_path / "src"), open_store(bucket), "data", progress=False)
    proxy.requester_pays = True

    def run(*extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return finish(
            [sys.executable, str(REPO / "download_training_data.py"), "--no-progress",
             "--bucket", f"{bucket}/data", "--dest", str(tmp_path / "dest"), *extra],
            cwd=tmp_path, env={**os.environ, **(env or {})})

    refused = run("--retry-deadline", "60")
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), refused.stderr
    assert "requester-pays" in lines[0] and "--billing-project" in lines[0]
    assert not (tmp_path / "dest").exists()

    flag = run("--billing-project", PAYER)
    assert flag.returncode == 0, flag.stderr
    assert flag.stdout.startswith("downloaded 3 ")
    env = run(env={BILLING_PROJECT_ENV: PAYER})
    assert env.returncode == 0 and env.stdout.startswith("downloaded 0 "), env.stderr

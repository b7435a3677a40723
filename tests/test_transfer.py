"""Sliced, parallel transfers through a real emulator behind a per-connection bandwidth limit.

A checkpoint of neox-1.2b is ~17 GB and GCS gives one stream ~200 MiB/s: only parallel streams
fit a spot VM's 30 s notice. And on a 1 MB/s link no request may need longer than its timeout
to send. Every test here talks to a real fake-gcs-server through a real TCP proxy
(throttle_proxy) that limits each connection and injects faults (a stall, a flipped byte) at
that boundary; waits follow what the proxy observed, never a fixed sleep.
"""

from __future__ import annotations

import itertools
import logging
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
from throttle_proxy import ProxiedEmulator

from utils.storage import (
    BILLING_PROJECT_ENV,
    LocalStore,
    ObjectExists,
    StorageError,
    file_crc32c,
    open_store,
)
from utils.storage.slices import CHUNK_BYTES, plan_slices

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000
_ids = itertools.count()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedEmulator]:
    """One emulator behind a ThrottleProxy for the module (its own: announced at the proxy)."""
    emu = ProxiedEmulator(tmp_path_factory.mktemp("throttled-emulator"))
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def bucket(emulator: ProxiedEmulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket reached through the proxy, which starts unlimited, unarmed and with an
    empty record."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv(BILLING_PROJECT_ENV, raising=False)
    url = emulator.create_bucket(f"transfer-{next(_ids)}")
    emulator.proxy.reset()
    yield url
    emulator.proxy.reset()


def _raw_names(emulator: ProxiedEmulator, bucket: str) -> list[str]:
    """Every object, hidden ones included, straight from the emulator (not through the proxy)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": emulator.direct_url})
    return sorted(b.name for b in client.list_blobs(bucket[len("gs://"):]))


def _file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def _round_trip(store_url: str, streams: int, src: Path, name: str, dest: Path,
                **kwargs: float) -> tuple[float, float]:
    """Upload then download with that many streams; seconds for each, content checked."""
    store = open_store(store_url, streams=streams, **kwargs)
    start = time.monotonic()
    info = store.upload_file(src, name, if_absent=True)
    up = time.monotonic() - start
    assert info.crc32c == file_crc32c(src) and info.size == src.stat().st_size
    got: list[int] = []
    start = time.monotonic()
    store.download_file(name, dest, on_bytes=got.append)
    down = time.monotonic() - start
    assert dest.read_bytes() == src.read_bytes() and sum(got) == src.stat().st_size
    return up, down


# ---------------------------------------------------------------- any link speed

@pytest.mark.slow
def test_one_mb_per_s_link_sliced_is_4x_faster(emulator: ProxiedEmulator, bucket: str,
                                               tmp_path: Path) -> None:
    """At 1 MB/s per connection: one stream and 16 streams move the same 13 MiB file, side by
    side; then a 34 MB file (a smoke checkpoint's optimizer.pt) goes up and comes back."""
    emulator.proxy.rate = 1 * MB
    small = _file(tmp_path / "small.bin", 13 * 2**20)
    one_up, one_down = _round_trip(bucket, 1, small, "one/small.bin", tmp_path / "one.bin")
    many_up, many_down = _round_trip(bucket, 16, small, "many/small.bin", tmp_path / "many.bin")
    print(f"13 MiB at 1 MB/s: up {one_up:.1f} s -> {many_up:.1f} s ({one_up / many_up:.1f}x), "
          f"down {one_down:.1f} s -> {many_down:.1f} s ({one_down / many_down:.1f}x)")
    assert one_up >= 4 * many_up and one_down >= 4 * many_down

    big = _file(tmp_path / "optimizer.pt", 34 * MB)
    up, down = _round_trip(bucket, 16, big, "ckpt/optimizer.pt", tmp_path / "back.pt")
    print(f"34 MB at 1 MB/s, 16 streams: up {up:.1f} s, down {down:.1f} s")
    one_rate = small.stat().st_size / one_up  # what one stream moved per second
    assert big.stat().st_size / up >= 4 * one_rate
    assert big.stat().st_size / down >= 4 * small.stat().st_size / one_down
    assert max(emulator.proxy.bodies) <= CHUNK_BYTES  # no request carried more than a chunk
    assert [n for n in _raw_names(emulator, bucket) if ".parts" in n] == []


@pytest.mark.slow
def test_slow_link_request_outlasting_the_timeout_completes(
    emulator: ProxiedEmulator, bucket: str, tmp_path: Path
) -> None:
    """One 8 MiB request (the most any request carries) at 1 MB/s takes ~8 s to send; with 4 s
    timeouts (retry deadline 4 s) it failed every time with TimeoutError (the timeout bounded
    the whole send), as a 10 MB request did at the default 10 s. Now it bounds only a
    silence, so the slow request completes, the first time. (4 s also leaves the answer's
    wait room for the ~3 MB the client's socket buffer holds to drain.)"""
    emulator.proxy.rate = 1 * MB
    src = _file(tmp_path / "eight.bin", CHUNK_BYTES)
    store = open_store(bucket, retry_deadline_s=4, streams=1)
    start = time.monotonic()
    assert store.upload_file(src, "eight.bin").crc32c == file_crc32c(src)
    assert time.monotonic() - start > 4  # it did take longer than the timeout
    assert emulator.proxy.count("POST /upload/") == 1  # one request, never retried


# ---------------------------------------------------------------- faults

@pytest.mark.slow
def test_stalled_connection_is_retried_and_the_upload_completes(
    emulator: ProxiedEmulator, bucket: str, tmp_path: Path
) -> None:
    """A part's connection goes silent mid-request (the proxy stops forwarding it): after the
    10 s no-progress limit the client sends that chunk again on a new connection."""
    src = _file(tmp_path / "big.bin", 40 * 2**20)  # 4 slices of 10 MiB: 8 MiB + 2 MiB chunks
    emulator.proxy.stall(b"upload_id=")
    store = open_store(bucket, streams=4)
    info = store.upload_file(src, "big.bin")
    assert emulator.proxy.stalled == 1 and info.crc32c == file_crc32c(src)
    chunks = sum(len(range(0, length, CHUNK_BYTES)) for _, length in plan_slices(
        src.stat().st_size, 4))
    assert emulator.proxy.count("upload_id=") == chunks + 1  # the stalled chunk, sent again
    store.download_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_corrupted_slice_is_detected_and_sent_again(
    emulator: ProxiedEmulator, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One byte of one part's body is flipped on the wire: the stored part's crc32c differs
    from what the client sent, so that slice (only) is uploaded again."""
    src = _file(tmp_path / "f.bin", 16 * 2**20)
    slices = plan_slices(src.stat().st_size, 4)
    emulator.proxy.corrupt(b"upload_id=")
    with caplog.at_level(logging.WARNING, logger="utils.storage.gcs"):
        info = open_store(bucket, streams=4).upload_file(src, "f.bin")
    assert emulator.proxy.corrupted == 1 and info.crc32c == file_crc32c(src)
    sessions = [r for r in emulator.proxy.requests if r.startswith("POST /upload/")]
    assert len(sessions) == len(slices) + 1  # one per part upload started
    assert "arrived corrupted (crc32c mismatch); sending them again" in caplog.text
    assert [n for n in _raw_names(emulator, bucket) if n != "f.bin"] == []


def test_more_than_32_parts_compose_in_rounds(emulator: ProxiedEmulator, bucket: str,
                                              tmp_path: Path) -> None:
    src = _file(tmp_path / "f.bin", 33 * 2**20)
    slices = plan_slices(src.stat().st_size, 33)
    assert len(slices) == 33  # one more than a compose request takes
    _round_trip(bucket, 33, src, "deep/f.bin", tmp_path / "back.bin")
    assert emulator.proxy.count("/compose") == 3  # 32 + 1 into two, then those two
    assert _raw_names(emulator, bucket) == ["deep/f.bin"]


_KILLED_UPLOAD = """
import sys
from pathlib import Path
from utils.storage import open_store
open_store(sys.argv[1], streams=4).upload_file(Path(sys.argv[2]), "ckpt/model.bin",
                                               if_absent=True)
"""


def test_killed_sliced_upload_leaves_parts_that_cleanup_removes(
    emulator: ProxiedEmulator, bucket: str, tmp_path: Path
) -> None:
    """A process killed after its parts are stored, before they are composed: no final object,
    nothing listed, and remove_stale_parts (run at the next start) deletes the parts."""
    src = _file(tmp_path / "model.bin", 16 * 2**20)
    emulator.proxy.stall(b"/compose")  # the parts all went up; hold the compose
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_UPLOAD, bucket, str(src)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert emulator.proxy.wait_for(lambda: emulator.proxy.stalled == 1 or
                                       proc.poll() is not None, timeout=120), "no compose seen"
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert emulator.proxy.stalled == 1, err
    names = _raw_names(emulator, bucket)
    assert "ckpt/model.bin" not in names and len(names) == 4
    assert all("/.parts/" in n for n in names)
    store = open_store(bucket)
    assert store.list() == [] and store.child("ckpt").list() == []
    assert store.remove_stale_parts("ck") == 0  # a folder, not a name prefix
    assert store.remove_stale_parts("ckpt") == 4
    assert _raw_names(emulator, bucket) == []


_AT_EXIT = """
import atexit, sys
from pathlib import Path
from utils.storage import open_store
store = open_store(sys.argv[1], streams=4)
atexit.register(lambda: print(store.upload_file(Path(sys.argv[2]), "late.bin").crc32c))
"""


def test_sliced_upload_runs_from_an_atexit_handler(bucket: str, tmp_path: Path) -> None:
    """The checkpoint publisher flushes from atexit, when thread pools refuse work."""
    src = _file(tmp_path / "late.bin", 16 * 2**20)
    done = finish([sys.executable, "-c", _AT_EXIT, bucket, str(src)], cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == file_crc32c(src), done.stderr


def test_local_store_removes_temporaries_of_killed_writes(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _file(tmp_path / "run/ckpt/.model.bin.part-0123abcd", 10)  # a killed upload's temporary
    _file(tmp_path / "run/ckpt/model.bin", 10)
    _file(tmp_path / "run2/.x.part-89abcdef", 10)
    assert store.remove_stale_parts("run") == 1
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        ".x.part-89abcdef", "model.bin"]


# ---------------------------------------------------------------- GCS semantics at the boundary

PAYER = "payer-project-7"
MISSING = (400, "Bucket is a requester pays bucket but no user project provided.", "required")


def _query(request: str) -> dict[str, str]:
    query = urllib.parse.urlsplit(request.split(" ", 1)[1]).query
    return {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}


@pytest.fixture
def session_bucket(gcs_emulator: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv(BILLING_PROJECT_ENV, raising=False)
    return gcs_emulator.create_bucket(f"sliced-payer-{next(_ids)}")


def test_requester_pays_every_sliced_request_carries_the_project(
    gcs_emulator: GcsEmulator, session_bucket: str, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path
) -> None:
    """Parts, composes, ranged reads, the parts' listing and deletes: all billed. Without a
    billing project a sliced upload fails at once, in one line naming the flag."""
    def requester_pays(request: str) -> tuple[int, str, str] | None:
        query = _query(request)  # session chunks were billed when their session opened
        return None if "userProject" in query or "upload_id" in query else MISSING

    proxy = FaultProxy(gcs_emulator.url, [], answer=requester_pays)
    proxy.start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        src = _file(tmp_path / "f.bin", 40 * 2**20)
        store = open_store(session_bucket, retry_deadline_s=10, billing_project=PAYER,
                           streams=40)  # 40 parts: composed in two rounds
        store.upload_file(src, "ckpt/f.bin", if_absent=True)
        store.download_file("ckpt/f.bin", tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
        assert store.remove_stale_parts("ckpt") == 0

        billed = [r for r in proxy.requests if "upload_id" not in _query(r)]
        assert [r for r in billed if _query(r).get("userProject") != PAYER] == []
        kinds = {"/compose": 3, "uploadType=resumable": 40, "DELETE ": 42, "alt=media": 40}
        for kind, at_least in kinds.items():
            assert sum(kind in r for r in billed) >= at_least, kind

        start = time.monotonic()
        with pytest.raises(StorageError) as refused:
            open_store(session_bucket, retry_deadline_s=30, streams=4).upload_file(src, "g.bin")
        assert time.monotonic() - start < 10  # a 400 is not retried
        text = str(refused.value)
        assert "\n" not in text and "requester-pays" in text and "--billing-project" in text
    finally:
        proxy.stop()


def test_if_absent_compose_refuses_an_existing_object(
    gcs_emulator: GcsEmulator, session_bucket: str, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path
) -> None:
    """Only the final compose carries ifGenerationMatch=0; GCS's 412 for an existing object
    (played by the proxy: the emulator ignores compose preconditions) is ObjectExists, the
    object is left as it was and the parts are removed."""
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    direct = storage.Client().bucket(session_bucket[len("gs://"):])
    direct.blob("taken.bin").upload_from_string(b"theirs")

    def precondition(request: str) -> tuple[int, str, str] | None:
        if "/compose" in request and _query(request).get("ifGenerationMatch") == "0":
            name = urllib.parse.unquote(request.split("/o/", 1)[1].split("/compose", 1)[0])
            if direct.blob(name).exists():
                return 412, "At least one of the pre-conditions you specified did not hold.", \
                    "conditionNotMet"
        return None

    proxy = FaultProxy(gcs_emulator.url, [], answer=precondition)
    proxy.start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        src = _file(tmp_path / "f.bin", 40 * 2**20)
        store = open_store(session_bucket, retry_deadline_s=10, streams=40)
        with pytest.raises(ObjectExists, match="taken.bin already exists"):
            store.upload_file(src, "taken.bin", if_absent=True)
        composes = [r for r in proxy.requests if "/compose" in r]
        assert len(composes) == 3
        assert [_query(r).get("ifGenerationMatch") for r in composes] == [None, None, "0"]
    finally:
        proxy.stop()
    assert direct.blob("taken.bin").download_as_bytes() == b"theirs"
    assert sorted(b.name for b in direct.client.list_blobs(direct)) == ["taken.bin"]


# ---------------------------------------------------------------- a run over a slow link

@pytest.mark.slow
def test_a_smoke_checkpoint_crosses_a_1_mb_per_s_link_and_a_fresh_vm_resumes(
        emulator: ProxiedEmulator, bucket: str, sample_data: Path, tmp_path: Path) -> None:
    """Every connection at 1 MB/s: train.py's checkpoint (~51 MB) reaches the bucket at 16
    streams at least 4x faster than one stream can move it (its bytes at 1 MB/s), parts an
    earlier killed upload left are removed first, and a fresh output dir resumes from it."""
    from helpers import metrics, train

    from utils import checkpoint

    stale = "checkpoints/link/.parts/model.safetensors.0badc0de/00000"
    open_store(bucket).write_bytes(stale, b"left by a killed upload")
    emulator.proxy.rate = 1 * MB
    args = ["--data-dir", str(sample_data), "--bucket", bucket, "--run-name", "link",
            "--max-steps", "2", "--save-steps", "2", "--upload-streams", "16"]
    first = train(tmp_path, "first", [*args, "--output-dir", str(tmp_path / "vm1")])
    assert first.proc.returncode == 0, first.stderr[-2000:]
    assert "removed 1 part(s) of interrupted uploads" in first.stdout
    assert stale not in _raw_names(emulator, bucket)
    event = metrics(tmp_path / "vm1", "checkpoint")[-1]
    ckpt = tmp_path / "vm1" / "checkpoints" / event["name"]
    size = sum(info["size"] for info in checkpoint.read_manifest(ckpt).values())
    print(f"{size / MB:.0f} MB checkpoint at 1 MB/s per connection, 16 streams: uploaded in "
          f"{event['upload_s']:.1f} s (one stream needs >= {size / MB:.0f} s)")
    assert event["upload_s"] is not None and event["upload_s"] * 4 <= size / MB

    second = train(tmp_path, "second", [*args, "--output-dir", str(tmp_path / "vm2"),
                                        "--resume", "latest", "--max-steps", "3"])
    assert second.proc.returncode == 0, second.stderr[-2000:]
    assert f"resumed from {tmp_path / 'vm2' / 'checkpoints' / event['name']}" in second.stdout

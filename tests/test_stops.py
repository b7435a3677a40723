"""A stop request (SIGTERM) is honoured within the preemption budget wherever the run waits:
for a shard during a bucket outage (--stream), for the end-of-run uploads, and in the log
mirror's thread. Real train.py processes, real signals, the real GCS emulator (killed, or
behind a proxy that stops answering), a local stand-in for the metadata server."""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import pytest
from gcs_emulator import FaultProxy, GcsEmulator
from helpers import Run, assert_same_records, last_step, train
from test_gce import ROOT, FakeMetadata
from test_stream_training import SHARD_BYTES, _args, _write_shards

from utils import checkpoint
from utils.loop.log_mirror import LogMirror
from utils.storage import open_store, sync_up

BUDGET_S = 6.0  # --preemption-budget-s: short, so the tests are; the default is 25
# The emergency save's background write runs at nice 10: on 2 cores shared with other test
# runs it took 5 s for the tiny model's 50 MB (0.1 s on an idle machine).
SAVE_BUDGET_S = 12.0
SLACK_S = 4.0  # a loaded 2-core machine: start-up of the signal path, process exit


@pytest.fixture
def garbage_metadata(monkeypatch: pytest.MonkeyPatch):
    """A metadata server saying "preempted" with a scheduling answer of 60,000 nested '['
    (a RecursionError for json.loads): the SIGTERM path must not trip on it."""
    server = FakeMetadata(preempted="TRUE")
    server.answers[ROOT + "scheduling/?recursive=true"] = "[" * 60_000
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    monkeypatch.setenv("GCE_METADATA_HOST", server.host)
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_a_sigterm_while_waiting_for_a_shard_saves_the_finished_steps(
        sample_data, tmp_path, monkeypatch, garbage_metadata):
    """The bucket goes down and training waits for a shard (in a DataLoader worker): a
    SIGTERM ends the wait, the finished steps are saved and the run exits 0 within the budget;
    resumed once the bucket is back, the losses are those of a run that never stopped."""
    emulator = GcsEmulator(tmp_path / "gcs", backend="filesystem")
    emulator.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    try:
        bucket = emulator.create_bucket("stops")
        _write_shards(sample_data, tmp_path / "src", {"": 24})
        sync_up(tmp_path / "src", open_store(bucket).child("training"), progress=False)
        steps = ["--max-steps", "40", "--cache-limit-gb", f"{5 * SHARD_BYTES / 1e9}",
                 "--num-workers", "1", "--preemption-budget-s", f"{SAVE_BUDGET_S:g}"]
        calm = train(tmp_path, "calm", _args(tmp_path / "d0", tmp_path / "calm", bucket,
                                             *steps))
        assert calm.proc.returncode == 0, calm.stderr[-3000:]

        out = tmp_path / "out"
        run = Run(tmp_path, "run", _args(tmp_path / "d1", out, bucket, *steps))
        run.wait_for(lambda: last_step(out) >= 4, "step 4")
        emulator.kill()
        run.wait_for(lambda: "waiting for shard" in run.stderr, "a reader waiting for a shard")
        finished = last_step(out)
        sent = time.monotonic()
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr[-3000:]
        took = time.monotonic() - sent
        assert took < SAVE_BUDGET_S + SLACK_S, (took, run.stdout[-2000:])
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
        assert finished < 40 and last_step(out) == finished  # the step under way never ran
        saved = checkpoint.find_complete(out / "checkpoints")
        assert [checkpoint.step_of(p.name) for p in saved] == [finished]
        assert checkpoint.verify(saved[-1], hashes=True) is None
        assert (f"stopping at step {finished} on request while waiting for data from the "
                f"bucket; checkpoint {saved[-1].name}") in run.stdout
        assert f"preempted at step {finished}: checkpoint written locally" in run.stdout

        emulator.start()
        resumed = train(tmp_path, "resumed", _args(tmp_path / "d1", out, bucket, *steps,
                                                    "--resume", "latest"))
        assert resumed.proc.returncode == 0, resumed.stderr[-3000:]
    finally:
        emulator.stop()
    assert f"resumed from {saved[-1]} at step {finished}" in resumed.stdout
    assert_same_records(out, tmp_path / "calm", ("loss",), 40)


@pytest.mark.slow
def test_a_sigterm_during_the_final_upload_wait_keeps_to_the_budget(
        sample_data, gcs_emulator, gcs_bucket, tmp_path):
    """The run has ended and waits for a bucket that stopped answering: with the default
    --upload-timeout-s (60 s) a SIGTERM still ends the wait within the preemption budget
    (a spot VM is gone 30 s after its notice), and the summary claims no copied logs."""
    proxy = FaultProxy(gcs_emulator.url, [])
    proxy.start()
    try:
        out = tmp_path / "out"
        run = Run(tmp_path, "hang", ["--data-dir", str(sample_data), "--output-dir", str(out),
                                     "--bucket", gcs_bucket, "--run-name", "final",
                                     "--max-steps", "4", "--save-steps", "4",
                                     "--preemption-budget-s", f"{BUDGET_S:g}"],
                  env={"STORAGE_EMULATOR_HOST": proxy.url})
        run.wait_for(lambda: "model tiny:" in run.stdout, "the start (bucket access checked)")
        proxy.delay_s = 120.0  # the bucket stops answering
        run.wait_for(lambda: "uploading checkpoints" in run.stderr, "the final upload wait")
        sent = time.monotonic()
        run.signal(signal.SIGTERM)
        assert run.wait() == 0, run.stderr[-2000:]
        took = time.monotonic() - sent
    finally:
        proxy.stop()
    assert took < BUDGET_S + SLACK_S, (took, run.stdout[-2000:])
    assert f"waiting at most {BUDGET_S - 1:.0f} s more for checkpoint uploads" in run.stdout
    assert checkpoint.verify(out / "checkpoints" / "checkpoint-epoch0-step4-files1",
                             hashes=True) is None
    assert not re.search(r"^logs copied to", run.stdout, re.MULTILINE), run.stdout[-2000:]


# ---------------------------------------------------------------- the log mirror's thread


def _mirror(tmp_path: Path, every_s: float, stopping=lambda: False) -> tuple[LogMirror, list]:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "events.out.tfevents.1").write_bytes(b"event")
    (tmp_path / "bucket").mkdir()
    lines: list[str] = []
    return LogMirror(open_store(str(tmp_path / "bucket")), logs, tmp_path / "metrics.jsonl",
                     every_s, log=lines.append, stopping=stopping), lines


@pytest.mark.parametrize("every_s", [1e300, float("inf"), 2**64])
def test_any_interval_is_a_wait_not_a_dead_thread(tmp_path, every_s) -> None:
    """An interval no clock can hold (--log-upload-minutes 1e298) made Event.wait raise
    OverflowError: the thread died silently and the summary still said "logs copied to"."""
    mirror, lines = _mirror(tmp_path, every_s)
    mirror.start()
    assert mirror.close(timeout=30)
    assert mirror.copied_to == str(tmp_path / "bucket") and lines == []
    assert (tmp_path / "bucket" / "events.out.tfevents.1").read_bytes() == b"event"


def test_a_failed_mirror_claims_no_copy(tmp_path) -> None:
    mirror, lines = _mirror(tmp_path, 0.0)
    (tmp_path / "bucket").rmdir()
    (tmp_path / "bucket").write_text("a file where the bucket's folder should be")
    mirror.start()
    assert not mirror.close(timeout=30)
    assert mirror.copied_to == ""
    assert len(lines) == 1 and "copying the logs to" in lines[0] and "failed" in lines[0]


def test_after_a_stop_request_no_periodic_pass_starts(tmp_path) -> None:
    """After the SIGTERM the budget is the checkpoint's: no periodic pass (every 1 s here)
    starts; close() still makes the final one."""
    mirror, _ = _mirror(tmp_path, 1.0, stopping=lambda: True)
    mirror.start()
    time.sleep(2.5)  # a window in which two periodic passes were due: none may start
    assert mirror.passes == 0
    assert mirror.close(timeout=30) and mirror.passes == 1
    assert mirror.copied_to == str(tmp_path / "bucket")

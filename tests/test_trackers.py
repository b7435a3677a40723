"""Trackers (--report-to tensorboard,wandb) and the copy of the logs into the bucket.

W&B runs offline (WANDB_MODE=offline): its run folder's .wandb file is read back with the
record format wandb writes (a LevelDB-style log of protobuf records), so the tests see the
history exactly as `wandb sync` would send it.
"""

from __future__ import annotations

import json
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from conftest import REPO, run_train
from helpers import TINY, Run, finish, metrics, tensorboard_scalars

from configs.training_config import report_to
from utils.checkpoint import find_complete
from utils.errors import ConfigError, StorageError
from utils.loop.log_mirror import METRICS, LogMirror, mirror_target
from utils.loop.tracker import TensorBoard, scalars
from utils.storage import LocalStore, open_store


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline run's ``run-<id>.wandb`` file.

    The format (wandb's datastore): a 7-byte header (b":W&B", magic 0xBEE1, version), then
    32 KiB blocks of records, each with a 7-byte header (crc32 of type+data, length, type:
    1 full, 2 first, 3 middle, 4 last) and a block tail too short for a header is zeros.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a .wandb file"
    records, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        assert zlib.crc32(bytes([kind]) + chunk) == crc, "corrupt record"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
    return records


def wandb_run(folder: Path) -> tuple[str, str, str, dict, dict[int, dict]]:
    """(run id, name, project, config, history by step) of one offline run folder."""
    (path,) = folder.glob("run-*.wandb")
    run, config, history = None, {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({i.key: json.loads(i.value_json) for i in run.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in record.history.item}
            history[row["_step"]] = row
    assert run is not None, f"no run record in {path}"
    return run.run_id, run.display_name, run.project, config, history


def offline_runs(wandb_dir: Path) -> list[Path]:
    return sorted((wandb_dir / "wandb").glob("offline-run-*"))


def wandb_env(tmp: Path) -> dict[str, str]:
    """Offline W&B with every folder it writes inside the test's temporary directory."""
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wb"),
            "WANDB_CONFIG_DIR": str(tmp / "wb-config"), "WANDB_CACHE_DIR": str(tmp / "wb-cache"),
            "WANDB_DATA_DIR": str(tmp / "wb-data"), "WANDB_SILENT": "true"}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------- units


def test_report_to_values():
    assert report_to("tensorboard") == ["tensorboard"]
    assert report_to("wandb, TensorBoard,wandb") == ["wandb", "tensorboard"]
    assert report_to("none") == [] and report_to("") == []
    for bad in ("tensorbord", "none,wandb"):
        with pytest.raises(ConfigError, match="valid: tensorboard, wandb .* or none"):
            report_to(bad)


def test_bad_report_to_flag_is_one_line(tmp_path):
    result = run_train("--config", "smoke", "--report-to", "mlflow", tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "'mlflow'" in result.stderr


def test_nested_values_become_scalars_and_text_is_skipped(tmp_path):
    record = {"step": 3, "loss": 2.5, "tokens_by_source": {"web": 123, "code": 45},
              "note": "text", "missing": None, "epoch": 0}
    assert scalars(record) == {"loss": 2.5, "tokens_by_source/web": 123.0,
                               "tokens_by_source/code": 45.0, "epoch": 0.0}
    board = TensorBoard(tmp_path / "tb", {"run_name": "x", "nested": {"a": 1}, "lst": [1, 2]})
    board.log(record, 3)
    board.close()
    assert tensorboard_scalars(tmp_path / "tb", "tokens_by_source/web") == {3: 123.0}
    assert tensorboard_scalars(tmp_path / "tb", "loss") == {3: 2.5}


def test_mirror_target_is_the_bucket_logs_or_vertex_folder(tmp_path):
    bucket = LocalStore(tmp_path / "bucket")
    assert mirror_target("r1", bucket, environ={}).url == str(tmp_path / "bucket/logs/r1")
    assert mirror_target("r1", None, environ={}) is None
    aip = {"AIP_TENSORBOARD_LOG_DIR": str(tmp_path / "vertex/logs")}
    assert mirror_target("r1", bucket, environ=aip).url == str(tmp_path / "vertex/logs")
    assert mirror_target("r1", None, environ=aip).url == str(tmp_path / "vertex/logs")


class FlakyStore(LocalStore):
    """A local bucket whose uploads fail while ``broken`` and wait while ``gate`` is closed."""

    broken = False
    gate: threading.Event | None = None

    def upload_file(self, local, name, *, crc32c=None, if_absent=False):
        if self.gate is not None:
            self.gate.wait()
        if self.broken:
            raise StorageError(f"{self.url}/{name}: 503 Service Unavailable")
        return super().upload_file(local, name, crc32c=crc32c, if_absent=if_absent)


def test_mirror_uploads_what_changed_and_reports_a_failure_once(tmp_path):
    logs, metrics_file = tmp_path / "out/logs/r1", tmp_path / "out/metrics.jsonl"
    logs.mkdir(parents=True)
    (logs / "events.out.tfevents.1").write_bytes(b"a" * 10)
    (logs / ".hidden").write_bytes(b"x")
    metrics_file.write_text('{"step": 1}\n')
    target = FlakyStore(tmp_path / "bucket", "logs/r1")
    lines, flushed = [], []
    mirror = LogMirror(target, logs, metrics_file, 0.0, lambda: flushed.append(1), lines.append)
    assert mirror.mirror_once() == 2 and flushed == [1]
    assert {o.name for o in target.list()} == {"events.out.tfevents.1", METRICS}
    assert mirror.mirror_once() == 0  # nothing changed: nothing sent
    with metrics_file.open("a") as f:
        f.write('{"step": 2}\n')
    target.broken = True
    assert mirror.mirror_once() == 0 and mirror.mirror_once() == 0
    assert len(lines) == 1 and "503" in lines[0] and "training goes on" in lines[0]
    target.broken = False
    assert mirror.mirror_once() == 1 and "works again" in lines[-1]
    assert target.read_bytes(METRICS) == metrics_file.read_bytes()
    assert mirror.close(5)


def test_a_stuck_bucket_never_holds_the_caller(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "events.out.tfevents.1").write_bytes(b"a")
    target = FlakyStore(tmp_path / "bucket")
    target.gate = threading.Event()  # every upload hangs until the test opens it
    lines = []
    mirror = LogMirror(target, logs, tmp_path / "metrics.jsonl", 0.0, log=lines.append).start()
    started = time.monotonic()
    assert mirror.close(timeout=0.3) is False  # the final pass is stuck in the upload
    assert time.monotonic() - started < 2 and "did not finish within" in lines[-1]
    target.gate.set()


def test_a_resumed_run_on_a_fresh_machine_restores_the_mirrored_metrics(tmp_path):
    target = LocalStore(tmp_path / "bucket", "logs/r1")
    target.write_bytes(METRICS, b'{"step": 10}\n')
    local = tmp_path / "new-machine/metrics.jsonl"
    local.parent.mkdir()
    lines = []
    LogMirror(target, tmp_path / "none", local, 0.0, log=lines.append).restore_metrics()
    assert local.read_bytes() == b'{"step": 10}\n' and "restored" in lines[0]


def test_not_logged_in_is_one_line_and_offline_needs_no_login(tmp_path):
    probe = "from utils.loop.tracker import wandb_problem; print(repr(wandb_problem()))"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "NETRC": str(tmp_path / "netrc"),
           **{k: v for k, v in wandb_env(tmp_path).items() if k != "WANDB_MODE"}}
    online = finish([sys.executable, "-c", probe], cwd=REPO, env=env)
    assert "not logged in to W&B" in online.stdout and "wandb login" in online.stdout
    offline = finish([sys.executable, "-c", probe], cwd=REPO,
                     env={**env, "WANDB_MODE": "offline"})
    assert offline.stdout.strip() == "''", offline.stderr[-2000:]


# ---------------------------------------------------------------------- real runs


def test_missing_wandb_package_stops_at_the_start_with_one_line(sample_data, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text('import sys\nsys.modules["wandb"] = None\n')
    out = tmp_path / "out"
    result = run_train(*TINY, "--data-dir", str(sample_data), "--output-dir", str(out),
                       "--bucket", "", "--max-steps", "4", "--report-to", "tensorboard,wandb",
                       tmp_path=tmp_path, env={"PYTHONPATH": str(site), **wandb_env(tmp_path)})
    assert result.returncode == 2  # a configuration error: never restarted
    (line,) = error_lines(result.stderr)
    assert "pip install wandb" in line and "drop wandb from --report-to" in line
    assert not (out / "metrics.jsonl").exists() and "training" not in result.stderr


@pytest.mark.slow
def test_wandb_offline_history_and_resume_continue_the_same_run(sample_data, tmp_path):
    out, bucket = tmp_path / "out", tmp_path / "bucket"
    args = [*TINY, "--data-dir", str(sample_data), "--output-dir", str(out), "--bucket",
            str(bucket), "--logging-steps", "2", "--save-steps", "6",
            "--report-to", "tensorboard,wandb", "--wandb-project", "trackers-test",
            "--log-upload-minutes", "0.005"]
    env = wandb_env(tmp_path)
    first = run_train(*args, "--max-steps", "12", tmp_path=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    (folder,) = offline_runs(tmp_path / "wb")
    run_id, name, project, config, history = wandb_run(folder)
    assert (name, project) == ("smoke", "trackers-test")
    assert config["max_steps"] == 12 and config["report_to"] == "tensorboard,wandb"
    logged = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8, 10, 12]
    assert sorted(history) == [2, 4, 6, 8, 10, 12]
    for record in logged:  # the same numbers as metrics.jsonl and TensorBoard
        row = history[record["step"]]
        assert row["loss"] == pytest.approx(record["loss"])
        assert row["tokens_per_s"] == pytest.approx(record["tokens_per_s"])
    newest = find_complete(out / "checkpoints")[-1]
    assert "step12" in newest.name
    state = json.loads((newest / "trainer_state.json").read_text())["state"]
    assert state["run_ids"] == {"wandb": run_id}

    second = run_train(*args, "--max-steps", "16", "--resume", "latest", tmp_path=tmp_path,
                       env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    folders = offline_runs(tmp_path / "wb")
    assert len(folders) == 2 and folders[0] == folder
    again_id, _, _, _, appended = wandb_run(folders[1])
    assert again_id == run_id and sorted(appended) == [14, 16]  # `wandb sync` appends them

    # The bucket's copy of the logs is what `tensorboard --logdir BUCKET/logs/smoke` shows.
    mirrored = bucket / "logs" / "smoke"
    assert len(list(mirrored.glob("events.out.tfevents.*"))) == 2  # one per attempt
    assert (mirrored / METRICS).read_bytes() == (out / METRICS).read_bytes()
    assert sorted(tensorboard_scalars(mirrored, "loss")) == [2, 4, 6, 8, 10, 12, 14, 16]


@pytest.mark.slow
def test_logs_reach_the_emulator_bucket_during_the_run_and_at_the_end(gcs_bucket, sample_data,
                                                                      tmp_path):
    out, steps = tmp_path / "out", 60
    store = open_store(gcs_bucket).child("logs/smoke")

    def mirrored_steps() -> list[int]:
        try:
            text = store.read_bytes(METRICS).decode()
        except StorageError:
            return []
        return [json.loads(line)["step"] for line in text.splitlines()
                if line.endswith("}") and "loss" in line]

    def events() -> list[str]:
        return [o.name for o in store.list() if o.name.startswith("events.out.tfevents.")]

    run = Run(tmp_path, "mirror", ["--data-dir", str(sample_data), "--output-dir", str(out),
                                   "--bucket", gcs_bucket, "--max-steps", str(steps),
                                   "--logging-steps", "5", "--save-steps", "1000",
                                   "--log-upload-minutes", "0.005"])
    # Before the end: event files and a metrics.jsonl that stops short of the last step.
    run.wait_for(lambda: events() and 0 < max(mirrored_steps(), default=0) < steps,
                 "logs in the bucket during the run", poll_s=0.3)
    assert run.wait() == 0, run.stderr[-3000:]
    assert mirrored_steps() == list(range(5, steps + 1, 5))  # the final copy is complete
    local = tmp_path / "downloaded"
    for name in events():
        store.download_file(name, local / name)
    assert sorted(tensorboard_scalars(local, "loss")) == list(range(5, steps + 1, 5))

"""Run identity: a run deletes, prunes, resumes and uploads only its own checkpoints.

Real stores throughout (a directory used as a bucket, the session's fake-gcs-server), real
``train.py`` processes where the entry point matters; each bucket is listed before and after.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, Run, train

from utils.checkpoint import MARKER, RunLease, find_complete, lineage, remote_complete
from utils.checkpoint.format import write_manifest
from utils.checkpoint.lease import LEASE, Holder
from utils.checkpoint.publisher import CheckpointPublisher
from utils.errors import CheckpointError, StorageError
from utils.storage import LocalStore, open_store

FILES = {"config.json": b"{}", "model.safetensors": b"w" * 64, "optimizer.pt": b"o" * 32}


def _args(data: Path, out: Path, bucket: str, run: str, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), "--bucket", bucket,
            "--run-name", run, "--max-steps", "2", "--save-steps", "1", *extra]


def _listing(root: Path) -> dict[str, bytes]:
    """Every file under a folder used as a bucket, with its content."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.parts[len(root.parts):])}


def _checkpoint(root: Path, step: int, run_id: str = "r1", lineage_: list[str] | None = None,
                salt: bytes = b"") -> Path:
    """A small real checkpoint folder with its state (run id, lineage) and marker."""
    name = f"checkpoint-epoch0-step{step}-files1"
    path = root / name
    path.mkdir(parents=True)
    for file, data in FILES.items():
        (path / file).write_bytes(data + salt)
    state = {"state": {"run_id": run_id, "lineage": lineage_ or [name]}}
    (path / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(path)
    return path


# ---------------------------------------------------------------- what --overwrite deletes

@pytest.mark.slow
def test_overwrite_deletes_exactly_this_runs_checkpoint_folders(sample_data, tmp_path):
    """A bucket holding data, another run, a nested run's folder and notes: pruning and then
    ``--overwrite`` delete the run's own checkpoint folders and nothing else (listed before
    and after)."""
    bucket = tmp_path / "bucket"
    foreign = {"training/web/shard_00001.npy": b"data", "checkpoints/other/notes.txt": b"n",
               "checkpoints/exp/v2/checkpoint-epoch0-step1-files1/COMPLETE.json": b"{}",
               "checkpoints/exp/notes.txt": b"mine, not a checkpoint"}
    for name, data in foreign.items():
        (bucket / name).parent.mkdir(parents=True, exist_ok=True)
        (bucket / name).write_bytes(data)
    out = tmp_path / "out"
    # Pruning first: 3 checkpoints, one kept here and one in the bucket.
    first = train(tmp_path, "first", _args(sample_data, out, str(bucket), "exp",
                                           "--max-steps", "3", "--save-total-limit", "1",
                                           "--remote-keep", "1"))
    assert first.proc.returncode == 0, first.stderr[-2000:]
    before = _listing(bucket)
    ours = {n for n in before if n.startswith("checkpoints/exp/checkpoint-")}
    assert {n.split("/")[2] for n in ours} == {"checkpoint-epoch0-step3-files1"}  # pruned
    assert all(before[n] == data for n, data in foreign.items())  # and nothing else

    again = train(tmp_path, "again", _args(sample_data, out, str(bucket), "exp", "--overwrite"))
    assert again.proc.returncode == 0, again.stderr[-2000:]
    after = _listing(bucket)
    assert {n: after.get(n) for n in foreign} == foreign  # nothing else touched
    assert "--overwrite deleted" in again.stdout and "checkpoints/exp/checkpoint-" in again.stdout
    runs = {json.loads(after[n])["run_id"] for n in after
            if n.startswith("checkpoints/exp/checkpoint-") and n.endswith(MARKER)}
    assert len(runs) == 1 and runs != {json.loads(before[n])["run_id"] for n in ours
                                       if n.endswith(MARKER)}  # a new run id wrote them


def test_a_run_name_that_climbs_out_is_refused(sample_data, tmp_path):
    """``--run-name ..`` would write at the bucket's root: refused before anything is written."""
    bucket = tmp_path / "bucket"
    (bucket / "training").mkdir(parents=True)
    (bucket / "training" / "shard.npy").write_bytes(b"data")
    run = train(tmp_path, "dots", _args(sample_data, tmp_path / "out", str(bucket), "..",
                                        "--overwrite"))
    assert run.proc.returncode == 2 and "--run-name" in run.stderr
    assert "Traceback" not in run.stderr
    assert _listing(bucket) == {"training/shard.npy": b"data"}


@pytest.mark.slow
def test_two_run_names_never_share_an_output_dir(sample_data, tmp_path):
    """Run beta in alpha's --output-dir is refused, with or without --resume/--overwrite;
    alpha's checkpoints are untouched."""
    out = tmp_path / "shared"
    alpha = train(tmp_path, "alpha", _args(sample_data, out, "", "alpha"))
    assert alpha.proc.returncode == 0, alpha.stderr[-2000:]
    before = _listing(out / "checkpoints")
    for extra in ([], ["--resume", "latest"], ["--overwrite"]):
        beta = train(tmp_path, "beta", _args(sample_data, out, "", "beta", *extra))
        assert beta.proc.returncode == 1, beta.stderr[-2000:]
        assert f"--output-dir {out} holds run 'alpha', not 'beta'" in beta.stderr
        assert "Traceback" not in beta.stderr
    assert _listing(out / "checkpoints") == before


# ---------------------------------------------------------------- one writer per run name

def _race(bucket: str, trial: Path, data: Path, order: tuple[str, str]) -> dict[str, Run]:
    """Start two runs of one name on one bucket together (two machines: two output dirs);
    ``--no-overwrite``, so one that starts after the other ended is refused too."""
    runs = {who: Run(trial, who, _args(data, trial / who, bucket, "same", "--max-steps", "3",
                                       "--no-overwrite")) for who in order}
    for run in runs.values():
        run.wait()
    return runs


@pytest.mark.slow
def test_two_runs_of_one_name_started_together_never_mix(sample_data, gcs_bucket, tmp_path):
    """Started together (in both orders), exactly one run trains; the other refuses at start
    with one line (the live holder, or the checkpoints it left), and every checkpoint in the
    bucket is the winner's. (The lease race itself is repeated below with light processes.)"""
    store = open_store(gcs_bucket, retry_deadline_s=20)
    prefix = "checkpoints/same"
    for attempt, order in enumerate([("a", "b"), ("b", "a")]):
        trial = tmp_path / f"trial{attempt}"
        trial.mkdir()
        runs = _race(gcs_bucket, trial, sample_data, order)
        codes = {who: run.proc.returncode for who, run in runs.items()}
        assert sorted(codes.values()) == [0, 1], {w: r.stderr[-1500:] for w, r in runs.items()}
        winner = next(who for who, code in codes.items() if code == 0)
        loser = runs[next(who for who, code in codes.items() if code == 1)]
        assert ("is in use by another run (host" in loser.stderr
                or "already has checkpoints" in loser.stderr), loser.stderr[-1500:]
        assert "Traceback" not in loser.stderr
        ids = {lineage.marker_run_id(store.child(prefix).read_bytes(f"{n}/{MARKER}"))
               for n in remote_complete(store, prefix)}
        winner_ids = {json.loads((p / "trainer_state.json").read_text())["state"]["run_id"]
                      for p in find_complete(trial / winner / "checkpoints")}
        assert len(ids) == 1 and ids == winner_ids
        assert not store.child(prefix).exists(LEASE)  # released at the end
        for obj in store.child(prefix).list():  # the next trial starts clean
            store.child(prefix).delete(obj.name)


def _acquire_in_process(url: str, barrier: str, ready: str, end: str) -> str:
    """Another process: say it is ready, wait for the barrier file, try to take the lease,
    print the verdict, and hold on (a live holder) until the end file appears: a winner that
    exited at once would leave a dead holder, which a slow loser rightly takes over."""
    code = ("import sys, time, pathlib; sys.path.insert(0, '.');"
            "from utils.storage import open_store; from utils.checkpoint import RunLease;"
            "from utils.errors import CheckpointError;"
            f"b = pathlib.Path({barrier!r}); pathlib.Path({ready!r}).touch()\n"
            "while not b.exists(): time.sleep(0.001)\n"
            f"lease = RunLease(open_store({url!r}, retry_deadline_s=20), 'run x', "
            "log=lambda line: None)\n"
            "try:\n    lease.acquire(); print('won', flush=True)\n"
            "except CheckpointError as e: print('lost', e, flush=True)\n"
            f"while not pathlib.Path({end!r}).exists(): time.sleep(0.01)\n")
    return code


@pytest.mark.parametrize("kind", ["local", "gcs"])
def test_of_two_processes_taking_one_lease_exactly_one_wins(kind, tmp_path, request):
    """Five times, two real processes try to take one run's lease at the same instant."""
    if kind == "gcs":
        url = request.getfixturevalue("gcs_bucket")
    else:
        (tmp_path / "bucket").mkdir()
        url = str(tmp_path / "bucket")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for trial in range(5):
        store = open_store(url, retry_deadline_s=20).child(f"run{trial}")
        barrier, end = str(tmp_path / f"go{trial}"), tmp_path / f"end{trial}"
        ready = [tmp_path / f"ready{trial}-{i}" for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-c",
                                   _acquire_in_process(store.url, barrier, str(flag), str(end))],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
                 for flag in ready]
        while not all(flag.exists() for flag in ready):
            assert all(p.poll() is None for p in procs), "a process ended before the barrier"
            time.sleep(0.01)  # both processes have imported everything and wait
        Path(barrier).touch()
        verdicts = sorted(p.stdout.readline().split(" ", 1)[0].strip() for p in procs)
        end.touch()
        for p in procs:
            p.communicate()
        assert verdicts == ["lost", "won"], verdicts


def test_a_lease_is_taken_over_only_from_a_dead_holder(tmp_path):
    """A live holder keeps its lease; a dead one on this host, or one that stopped renewing
    elsewhere, is taken over, by compare-and-swap; the old holder then knows it lost."""
    store = LocalStore(tmp_path)
    first = RunLease(store, "run x", log=lambda _: None)
    first.acquire()
    with pytest.raises(CheckpointError, match=r"run x is in use by another run \(host .* pid "
                                              rf"{os.getpid()}"):
        RunLease(store, "run x").acquire()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    now = time.time()
    crashed_here = Holder("t1", socket.gethostname(), int(dead.stdout), now, now)
    stale_elsewhere = Holder("t2", "other-vm", 1, now - 500, now - 200)
    for gone in (crashed_here, stale_elsewhere):
        store.write_bytes(LEASE, gone.dumps())
        logs: list[str] = []
        successor = RunLease(store, "run x", log=logs.append)
        successor.acquire()
        assert "took over the lease of run x" in logs[0]
        assert Holder.parse(store.read_bytes(LEASE)).token == successor.holder.token

    first.renew()  # the first holder's version is gone: it knows it lost the name
    assert "run x was taken over by another run" in first.lost
    first.release()  # and never deletes the successor's lease
    assert Holder.parse(store.read_bytes(LEASE)).token == successor.holder.token
    successor.release()
    assert not store.exists(LEASE)


# ---------------------------------------------------------------- another run's checkpoint

def test_a_checkpoint_of_another_run_id_is_never_replaced(gcs_bucket, tmp_path):
    """The bucket holds another run's step 2 where this run writes its own: left as it is,
    and the publisher says why this run stops writing."""
    store = open_store(gcs_bucket, retry_deadline_s=20)
    theirs = _checkpoint(tmp_path / "theirs", 2, run_id="other", salt=b"T")
    publisher = CheckpointPublisher(store, "checkpoints/x", background=False, log=lambda _: None)
    publisher.submit(theirs)
    before = {o.name: o.crc32c for o in store.list()}

    logs: list[str] = []
    ours = _checkpoint(tmp_path / "ours", 2, run_id="mine", salt=b"M")
    publisher = CheckpointPublisher(store, "checkpoints/x", background=False, log=logs.append)
    publisher.submit(ours)
    assert {o.name: o.crc32c for o in store.list()} == before
    assert "belongs to another run (run id other, this run is mine)" in publisher.conflict
    assert any("not uploaded" in line and "another run" in line for line in logs)


# ---------------------------------------------------------------- lineage

@pytest.mark.slow
def test_resume_latest_follows_the_line_after_a_rollback(sample_data, tmp_path):
    """Steps 3, 6, 9; resumed from step 3 with another learning rate to step 6; then
    ``--resume latest`` continues that new step 6, not the abandoned step 9."""
    out = tmp_path / "out"
    args = ["--data-dir", str(sample_data), "--output-dir", str(out), "--bucket", "",
            "--run-name", "roll", "--save-steps", "3"]
    first = train(tmp_path, "first", [*args, "--max-steps", "9"])
    assert first.proc.returncode == 0, first.stderr[-2000:]
    step3 = out / "checkpoints" / "checkpoint-epoch0-step3-files1"
    rolled = train(tmp_path, "rolled", [*args, "--max-steps", "6", "--resume", str(step3.name),
                                        "--learning-rate", "0.0005"])
    assert rolled.proc.returncode == 0, rolled.stderr[-2000:]
    head = lineage.read_local(out / "checkpoints")
    assert head["checkpoint"].endswith("step6-files1")
    assert [n.split("-")[2] for n in head["lineage"]] == ["step3", "step6"]
    latest = train(tmp_path, "latest", [*args, "--max-steps", "12", "--resume", "latest"])
    assert latest.proc.returncode == 0, latest.stderr[-2000:]
    assert "step6-files1 at step 6" in latest.stdout, latest.stdout[-2000:]
    assert (out / "checkpoints" / "checkpoint-epoch0-step9-files1").is_dir()  # left alone


# ---------------------------------------------------------------- pruning during an outage

class Outage(LocalStore):
    """A directory bucket that refuses every write while ``down`` (a 403 at the boundary)."""

    down = False

    def child(self, prefix: str) -> Outage:
        child = Outage(self.base, f"{self.prefix}/{prefix}")
        return child

    def upload_file(self, local, name, **kwargs):
        if Outage.down:
            raise StorageError(f"{self.url}/{name}: access denied (403)")
        return super().upload_file(local, name, **kwargs)

    def write_bytes(self, name, data, **kwargs):
        if Outage.down:
            raise StorageError(f"{self.url}/{name}: access denied (403)")
        return super().write_bytes(name, data, **kwargs)


def test_an_outage_never_costs_a_checkpoint_to_pruning(tmp_path):
    """``--keep-every-steps 4 --save-total-limit 1 --remote-keep 1`` through a write outage:
    step 4 (kept forever) and every checkpoint that did not upload stay on the disk, and
    the next start uploads the newest and step 4."""
    (tmp_path / "bucket").mkdir()
    store, root = Outage(tmp_path / "bucket"), tmp_path / "checkpoints"
    line: list[str] = []

    def save(step: int) -> Path:
        line.append(f"checkpoint-epoch0-step{step}-files1")
        path = _checkpoint(root, step, lineage_=list(line))
        (path / MARKER).unlink()  # the publisher marks it
        return path

    def publisher() -> CheckpointPublisher:
        return CheckpointPublisher(store, "checkpoints/x", background=False, keep_local=1,
                                   remote_keep=1, keep_every=4, max_attempts=1,
                                   log=lambda _: None)

    run = publisher()
    run.submit(save(2))
    Outage.down = True
    for step in (4, 6, 10, 14):
        run.submit(save(step))
    local = {p.name.split("-")[2] for p in find_complete(root)}
    assert local == {"step4", "step6", "step10", "step14"}  # only uploaded step 2 went
    Outage.down = False

    restart = publisher()
    assert restart.catch_up(root) == "checkpoint-epoch0-step14-files1"
    remote = {n.split("-")[2] for n in remote_complete(store, "checkpoints/x")}
    assert remote == {"step4", "step14"}  # the newest, and the permanent one
    local = {p.name.split("-")[2] for p in find_complete(root)}
    # Once step 14 and step 4 are in the bucket, the superseded ones go (and step 4, kept
    # forever in the bucket, leaves the disk like any uploaded checkpoint).
    assert local == {"step14"}

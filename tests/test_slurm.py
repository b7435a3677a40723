"""Slurm: start_training.sh --slurm (from Slurm's environment) and configs/slurm/train.sbatch
submitted to a real one-node Slurm (munged + slurmctld + slurmd started by the test)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import finish, metrics
from slurm_cluster import GPUS, SlurmCluster, missing_reason

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "start_training.sh"
SBATCH = REPO / "configs" / "slurm" / "train.sbatch"
TINY = ["--seq-len", "64", "--logging-steps", "1", "--eval-steps", "1000",
        "--eval-windows", "8", "--per-device-train-batch-size", "4", "--bucket", ""]


def _clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any Slurm or torch.distributed variables."""
    (tmp / "tmpdir").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SLURMD_", "TORCHELASTIC_"))
           and k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                         "ACCELERATE_USE_CPU")}
    env.update({"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp / "tmpdir"),
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def start(args: list[str], tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return finish(["bash", str(SCRIPT), *args], cwd=tmp, env=env)


def launched(stdout: str) -> list[str]:
    line = next(x for x in stdout.splitlines()
                if x.startswith("[start] ") and not x.startswith("[start] slurm"))
    return shlex.split(line.removeprefix("[start] "))


def _stub(path: Path, text: str) -> None:
    path.write_text(f"#!/bin/sh\n{text}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_slurm(tmp_path: Path) -> dict[str, str]:
    """Node 1 of a 2-node job step on node[3-4], 8 GPUs each; scontrol is a stand-in, and so
    is nvidia-smi (it lists $FAKE_GPUS GPUs, none by default)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "scontrol", '[ "$1 $2 $3" = "show hostnames node[3-4]" ] || exit 1\n'
                                'printf "node3\\nnode4\\n"')
    _stub(bin_dir / "nvidia-smi",
          '[ "$1" = -L ] || exit 1\nfor i in $(seq 1 "${FAKE_GPUS:-0}"); do echo "GPU $i: x"; done')
    return _clean_env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}",
                      SLURM_JOB_ID="1234", SLURM_NODEID="1", SLURM_JOB_NUM_NODES="2",
                      SLURM_NNODES="2", SLURM_JOB_NODELIST="node[3-4]", SLURM_GPUS_ON_NODE="8",
                      SLURM_STEP_ID="0", SLURM_LOCALID="0")


PASSED = ["--output-dir", "outputs/a b", "--bucket", ""]  # a space survives the quoting


@pytest.mark.parametrize(("args", "processes"), [([], "16"), (["--gpus", "2"], "4")])
def test_slurm_takes_rank_machines_main_node_and_gpus_from_the_allocation(
        fake_slurm: dict[str, str], tmp_path: Path, args: list[str], processes: str) -> None:
    result = start(["--slurm", *args, *PASSED, "--dry-run"], tmp_path, fake_slurm)
    assert result.returncode == 0, result.stderr
    assert launched(result.stdout) == [
        ".venv/bin/accelerate", "launch", "--config_file", "configs/accelerate/multinode.yaml",
        "--num_processes", processes, "--num_machines", "2", "--machine_rank", "1",
        "--main_process_port", str(29500 + 1234 % 1000), "--main_process_ip", "node3",
        "--tee", "3", "--log_dir", "outputs/a b/slurm-1234", "train.py", *PASSED]
    per_node = int(processes) // 2
    assert (f"machine rank 1 of 2, ranks {per_node}-{2 * per_node - 1} of {processes} here, "
            f"main process node3:{29500 + 1234 % 1000}") in result.stdout


def test_slurm_without_gpu_gres_counts_the_gpus_nvidia_smi_sees(fake_slurm: dict[str, str],
                                                                 tmp_path: Path) -> None:
    env = {k: v for k, v in fake_slurm.items() if k != "SLURM_GPUS_ON_NODE"} | {"FAKE_GPUS": "4"}
    result = start(["--slurm", "--dry-run"], tmp_path, env)
    assert result.returncode == 0, result.stderr
    command = launched(result.stdout)
    assert command[command.index("--num_processes") + 1] == "8"


def test_slurm_main_address_and_port_can_be_given(fake_slurm: dict[str, str],
                                                  tmp_path: Path) -> None:
    result = start(["--slurm", "--main-process-ip", "10.0.0.7", "--main-process-port", "29999",
                    "--dry-run"], tmp_path, fake_slurm)
    assert result.returncode == 0, result.stderr
    command = launched(result.stdout)
    assert command[command.index("--main_process_port") + 1] == "29999"
    assert command[command.index("--main_process_ip") + 1] == "10.0.0.7"


@pytest.mark.parametrize(("args", "unset", "extra", "problem"), [
    ([], ["SLURM_JOB_ID"], {}, "--slurm needs a Slurm allocation"),
    (["--num-machines", "2"], [], {}, "--slurm takes --num-machines and --machine-rank"),
    ([], ["SLURM_STEP_ID"], {}, "--slurm on 2 nodes must run under srun"),
    ([], [], {"SLURM_LOCALID": "1"}, "--slurm starts one launcher per node"),
    ([], ["SLURM_GPUS_ON_NODE"], {}, "--slurm on 2 nodes needs GPUs on each"),
])
def test_slurm_misuse_is_one_line_and_exit_2(fake_slurm: dict[str, str], tmp_path: Path,
                                             args: list[str], unset: list[str],
                                             extra: dict[str, str], problem: str) -> None:
    env = {k: v for k, v in fake_slurm.items() if k not in unset} | extra
    result = start(["--slurm", *args, "--dry-run"], tmp_path, env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"start_training.sh: {problem}"), lines
    assert "[start]" not in result.stdout


def test_slurm_outside_an_allocation_says_so(tmp_path: Path) -> None:
    result = start(["--slurm", "--dry-run"], tmp_path, _clean_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "start_training.sh: --slurm needs a Slurm allocation (no SLURM_JOB_ID/SLURM_NODEID/"
        "SLURM_JOB_NODELIST here): submit configs/slurm/train.sbatch with sbatch"]


# --- a real Slurm ------------------------------------------------------------------------

SKIP = missing_reason()


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[SlurmCluster]:
    if SKIP:
        pytest.skip(SKIP)
    # A short root: slurmstepd's socket path under it must fit a Unix socket name (108
    # bytes), which a worker's tmp_path (.../popen-gw1/test_sbatch_trains_smoke_on_tw0/...)
    # does not leave room for.
    with tempfile.TemporaryDirectory(prefix="slurm-", dir="/tmp") as root:
        cluster = SlurmCluster(Path(root))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
def test_sbatch_trains_smoke_on_two_ranks_over_gloo(slurm: SlurmCluster, tmp_path: Path) -> None:
    """sbatch configs/slurm/train.sbatch on a real Slurm: srun starts start_training.sh
    --slurm on the node, which reads SLURM_GPUS_ON_NODE=2 (a GRES the test node advertises)
    and launches 2 ranks; torch is a CPU build here, so they train on the CPU over gloo."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "data.prepare", "--out", str(data),
                    "--tokenizer-out", str(tmp_path / "tok"), "--max-mb", "1"],
                   cwd=REPO, check=True, capture_output=True, timeout=120)
    out = tmp_path / "run out"
    env = _clean_env(tmp_path, SLURM_CONF=slurm.env["SLURM_CONF"], PATH=slurm.env["PATH"])
    submit = ["sbatch", "--wait", "--parsable", f"--gpus-per-node={GPUS}",
              f"--output={tmp_path}/job-%j.out", str(SBATCH),
              "--config", "smoke", "--max-steps", "2", "--save-steps", "2",
              "--main-process-port", str(_free_port()), "--data-dir", str(data),
              "--output-dir", str(out), "--run-name", "a.b", *TINY]
    began = time.monotonic()
    proc = subprocess.Popen(submit, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        # sbatch --wait only waits (the job runs under slurmd): a bound, not a stall check,
        # set far above the job's time on a loaded machine (45 s quiet).
        stdout, stderr = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        slurm.run("scancel", "--full", "--signal=KILL", "--user=root")
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    job_id = stdout.strip().split(";")[0]
    log_path = tmp_path / f"job-{job_id}.out"
    log = log_path.read_text(errors="replace") if log_path.exists() else "(no job output)"
    assert proc.returncode == 0, f"sbatch: {stderr}\n{log[-4000:]}\n{slurm.logs()}"
    print(f"job {job_id} ran in {time.monotonic() - began:.0f} s")

    state = slurm.run("scontrol", "show", "job", job_id).stdout
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, state
    # The batch script, then the node's launcher with what Slurm told it, then the ranks.
    assert f"[sbatch] job {job_id} " in log and f"GPUs per node {GPUS}" in log, log[-4000:]
    assert (f"machine rank 0 of 1, ranks 0-1 of 2 here, main process {slurm.node}:"
            in log), log[-4000:]
    assert "[rank0]: batch: 4 per device x 1 accumulation x 2 processes = 8 sequences" in log
    assert "[rank0]: process 0 of 2 on" in log and "[rank1]: process 1 of 2 on" in log
    assert [m["step"] for m in metrics(out)] == [1, 2]
    # Rank 1 trained too: the checkpoint holds every rank's RNG state, and the launcher kept
    # a copy of each rank's output.
    (ckpt,) = (p for p in (out / "checkpoints").iterdir() if p.is_dir())  # beside HEAD.json
    assert sorted(p.name for p in ckpt.glob("rng_state_*.pt")) == ["rng_state_0.pt",
                                                                   "rng_state_1.pt"]
    config = json.loads((ckpt / "trainer_state.json").read_text())["config"]
    assert config["run_name"] == "a.b" and config["bucket"] == ""
    per_rank = sorted(p.parent.name for p in (out / f"slurm-{job_id}").glob("*/attempt_0/*/"
                                                                              "stdout.log"))
    assert per_rank == ["0", "1"]

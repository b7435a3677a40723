"""A real one-node Slurm for tests: munged, slurmctld and slurmd, started as root in a temp dir.

Debian's ``slurmctld``, ``slurmd`` and ``munge`` packages (22.05; ``./setup.sh --dev`` installs
them when it runs as root with apt-get) provide the binaries. Everything the daemons write
(state, spool, logs, pid files, the munge key and socket) lives under one directory, on ports
picked free, so the cluster touches nothing of the machine's own Slurm or munge set-up.
No cgroups and no systemd (containers have neither): ``proctrack/linuxproc``, ``task/none``.
The node advertises 2 GPUs (a GRES whose device files are stand-ins), so ``--gpus-per-node=2``
is a real allocation and Slurm sets ``SLURM_GPUS_ON_NODE`` the way it does on a GPU node; with
a CPU build of torch the ranks run on the CPU over gloo.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "srun")
GPUS = 2


def missing_reason() -> str | None:
    """Why a Slurm cluster cannot start here (None when it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "a test Slurm cluster needs root (munged, slurmctld and slurmd run as root here)"
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    absent = [b for b in BINARIES if shutil.which(b, path=path) is None]
    if absent:
        return (f"Slurm is not installed (no {', '.join(absent)}): "
                "'./setup.sh --dev' as root installs Debian's slurmctld, slurmd and munge")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    assert found, name
    return found


class SlurmCluster:
    """One node named after this host, one partition ``debug``; ``env`` reaches it."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = root
        self.cpus = cpus
        # The node is this host (`hostname -s`); the launcher reaches the main node by this
        # name, so a name that does not resolve here becomes "localhost".
        self.node = socket.gethostname().split(".")[0]
        try:
            socket.gethostbyname(self.node)
        except OSError:
            self.node = "localhost"
        self.conf = root / "etc" / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        # Clients find the cluster through SLURM_CONF; nothing of an outer Slurm job leaks in.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_"))}
        self.env.update(SLURM_CONF=str(self.conf),
                        PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")

    # -- configuration -------------------------------------------------------------------
    def _write_config(self) -> None:
        r = self.root
        for d in ("etc", "state", "spool", "log", "run", "munge", "dev"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "spool" / f"slurmd-{self.node}").mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self.munge_socket = r / "munge" / "munge.socket"
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        self.conf.write_text(f"""\
ClusterName=harnesstest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
KillWait=5
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 Gres=gpu:{GPUS}
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        # Slurm drops GPUs without device files: stand-ins for /dev/nvidia*, character
        # devices like /dev/null (plain files work too, with an error line in slurmd's log).
        for i in range(GPUS):
            try:
                os.mknod(r / "dev" / f"gpu{i}", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
            except OSError:
                (r / "dev" / f"gpu{i}").touch()
        (r / "etc" / "gres.conf").write_text(
            f"NodeName={self.node} Name=gpu File={r}/dev/gpu[0-{GPUS - 1}]\n")

    # -- lifecycle -----------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.root / "log" / f"{name}.console", "wb") as log:
            self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def logs(self) -> str:
        """The daemons' logs, for a failure message."""
        parts = []
        for f in sorted((self.root / "log").iterdir()):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Slurm test cluster: {'/'.join(dead) or 'timed out'} "
                                   f"before {what}\n{self.logs()}")
            time.sleep(0.2)

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        r = self.root
        self._spawn("munged", [_which("munged"), "--foreground", "--force",
                               f"--socket={self.munge_socket}",
                               f"--key-file={r}/munge/munge.key",
                               f"--pid-file={r}/munge/munged.pid",
                               f"--seed-file={r}/munge/munged.seed",
                               f"--log-file={r}/log/munged.log"])
        self._wait("munged listens", self.munge_socket.exists, timeout)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf),
                               "-N", self.node])
        self._wait("the node is idle", self._node_idle, timeout)

    def _node_idle(self) -> bool:
        out = self.run("sinfo", "--noheader", "--Node", "--format=%t", timeout=10).stdout
        return out.strip().splitlines() == ["idle"]

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

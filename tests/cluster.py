"""A real single-node Slurm for the tests: munged, slurmctld and slurmd from Debian's packages, on
loopback, with every file (config, state, sockets, logs) in temporary directories. Nothing under
/etc or /run is changed: the daemons get their paths as options, the clients SLURM_CONF.

Needs root (slurmd runs jobs as their user) and the binaries; `slurm_unavailable()` names what is
missing so that the tests can skip with that reason.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.distributed import free_port

SLURM_BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
MUNGE_KEY = Path("/etc/munge/munge.key")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE"}


def slurm_unavailable() -> str | None:
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        return f"Slurm/munge binaries missing: {', '.join(missing)} (Debian: slurmd slurmctld slurm-client munge)"
    if os.geteuid() != 0:
        return "a test Slurm needs root (slurmd starts jobs as their user)"
    if not MUNGE_KEY.is_file():
        return f"{MUNGE_KEY} missing (Debian's munge package creates it; or run `mungekey -c`)"
    return None


def mpi_unavailable() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun missing (Debian: openmpi-bin libopenmpi-dev)"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    return None


@dataclass
class Slurm:
    root: Path
    env: dict  # SLURM_CONF for the clients

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env={**os.environ, **self.env, **kw.pop("env", {})}, capture_output=True,
                              text=True, check=True, **kw)

    def sbatch(self, *args: str, env: dict, cwd: Path) -> int:
        return int(self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> str:
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        return fields["JobState"]

    def wait(self, job_id: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in FINAL_STATES:
                return state
            time.sleep(1)
        subprocess.run(["scancel", str(job_id)], env={**os.environ, **self.env})
        raise TimeoutError(f"Slurm job {job_id} still {state} after {timeout} s")


def _conf(root: Path, host: str, munge_socket: Path) -> str:
    return f"""ClusterName=earlybert-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)


@contextmanager
def slurm_cluster(root: Path):
    """Start munged, slurmctld and slurmd under `root`; stop them (by their pid files) on exit."""
    root = Path(root)
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True)
    # munged runs as the munge user, which cannot enter pytest's private (0700) temporary directories.
    munge_dir = Path(tempfile.mkdtemp(prefix="earlybert-munge-"))
    shutil.chown(munge_dir, "munge", "munge")
    munge_dir.chmod(0o711)  # munged: clients need search permission on the socket directory
    munge_socket = munge_dir / "munge.socket"
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, host, munge_socket))
    env = {"SLURM_CONF": str(conf)}
    pid_files = [root / "slurmd.pid", root / "slurmctld.pid", munge_dir / "munged.pid"]
    try:
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={munge_socket}",
                        f"--pid-file={munge_dir / 'munged.pid'}", f"--log-file={munge_dir / 'munged.log'}",
                        f"--seed-file={munge_dir / 'munged.seed'}", f"--key-file={MUNGE_KEY}"], check=True)
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env={**os.environ, **env})
        subprocess.run(["slurmd", "-f", str(conf)], check=True, env={**os.environ, **env})
        slurm = Slurm(root, env)
        deadline = time.monotonic() + 60
        while "idle" not in slurm.run("sinfo", "-h", "-o", "%T").stdout:
            if time.monotonic() > deadline:
                logs = "\n".join((root / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log")
                                 if (root / f).exists())
                raise RuntimeError(f"the test Slurm did not come up within 60 s:\n{logs}")
            time.sleep(0.5)
        yield slurm
    finally:
        for pid_file in pid_files:
            _stop(pid_file)
        shutil.rmtree(munge_dir, ignore_errors=True)

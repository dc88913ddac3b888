"""Process-group set-up for every way `earlybert train` is started.

    deepspeed launcher / torchrun   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set
    srun (Slurm)                    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID are mapped to them;
                                    the master is the first host of SLURM_JOB_NODELIST
    mpirun (OpenMPI, MPICH)         DeepSpeed's MPI discovery through mpi4py
    plain `python`                  a world of one on 127.0.0.1

srun without an MPI plugin starts tasks that mpi4py would each see as a world of one, so Slurm's
own variables go first. Backend: NCCL on GPUs, gloo on CPUs.

DeepSpeed's JIT-built ops (deepspeed_shm_comm on CPUs) live in one project cache, TORCH_EXTENSIONS_DIR
defaulting to .cache/torch_extensions, and are built under a lock that the kernel drops with its holder.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.launchers import detect_launcher

DEFAULT_PORT = 29500
EXTENSIONS_DIR = Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str  # env | slurm | mpi | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_env(env: dict) -> dict:
    """torch.distributed's variables from an srun task's Slurm variables."""
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in env:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], check=True, capture_output=True, text=True
        ).stdout.split()
        out["MASTER_ADDR"] = hosts[0]
    if "MASTER_PORT" not in env:
        # Every task must pick the same port without talking to the others: derive it from the job id.
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def setup(timeout: datetime.timedelta | None = None) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (once per process) and pick this rank's device.
    timeout: how long collectives wait for the other ranks (DeepSpeed's default when None)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    launcher = detect_launcher(os.environ)
    if launcher == "slurm":
        os.environ.update(slurm_env(os.environ))
    elif launcher == "single":
        os.environ.update(
            {
                "RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port())),
            }
        )
    build_extensions()
    accel = get_accelerator()
    backend = "nccl" if accel.device_name() == "cuda" else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=launcher == "mpi",
        distributed_port=int(os.environ.get("MASTER_PORT", DEFAULT_PORT)),
        verbose=False,
        **({"timeout": timeout} if timeout else {}),
    )
    if accel.device_name() == "cpu":
        release_shm_segment()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() == "cuda":
        accel.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, launcher)


def release_shm_segment() -> None:
    """Unlink this rank's /dev/shm segment of DeepSpeed's CPU all-reduce (deepspeed_shm_comm).

    DeepSpeed creates one ~69 MB segment per rank, named after the uid, MASTER_ADDR, MASTER_PORT
    and rank, and never unlinks it: every CPU run would leave RAM behind for good. Once
    init_distributed has returned on every rank, all ranks have mapped all segments, so after a
    barrier each rank unlinks its own: the mappings stay valid, and the memory is freed when the
    processes exit, even after kill -9."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr is None or port is None:
        return
    dist.barrier()
    name = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"
    name.unlink(missing_ok=True)


def build_extensions() -> None:
    """Build (or load) DeepSpeed's CPU communication op in the project cache, as init_distributed would.

    torch guards a build with a `lock` file that only its builder removes: a builder killed during the ~20 s build
    leaves it, and every later launch would wait on it forever without a word. Here every build of the project runs
    under a POSIX lock on the cache (released by the kernel when its holder dies, even by SIGKILL; shared filesystems
    such as NFS honour it across nodes), so a `lock` file found while holding it is a dead builder's: it is removed
    once no process of this node still works in its folder, with a message."""
    from deepspeed.comm.torch import build_shm_op

    cache = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(EXTENSIONS_DIR))).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "earlybert-build.lock", "w") as guard:
        fcntl.lockf(guard, fcntl.LOCK_EX)
        for lock in cache.glob("*/lock"):
            _clear_stale_lock(lock)
        build_shm_op()


def _clear_stale_lock(lock: Path) -> None:
    said = False
    while users := _users(lock):  # a builder of another program, or the compilers of a killed one, still running
        if not said:
            print(f"earlybert: waiting for processes {users} building in {lock.parent}", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.5)
    if lock.exists():
        lock.unlink(missing_ok=True)
        print(
            f"earlybert: removed {lock}, left by a torch extension build that was killed; building again",
            file=sys.stderr,
            flush=True,
        )


def _users(lock: Path) -> list[int]:
    """Processes of this node that hold `lock` open or work in its folder."""
    users = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if os.readlink(proc / "cwd") == str(lock.parent) or any(
                os.readlink(fd) == str(lock) for fd in (proc / "fd").iterdir()
            ):
                users.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return users


class StopRequest:
    """SIGTERM / SIGUSR1 (a Slurm time limit, a preemption) set a flag; the training loop agrees on it
    across ranks after each step, then checkpoints and exits."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


def barrier() -> None:
    dist.barrier()


def sum_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Named scalars summed over every rank in one all-reduce (every rank passes the same names, in
    the same order); reading the result waits for the device."""
    packed = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(values, packed.tolist()))


def set_cpu_threads(d: DistInfo) -> None:
    """Split a node's CPU cores between its ranks (each would otherwise use them all): the cores this rank may run
    on (its affinity: Slurm's or mpirun's binding, a cgroup's cpuset), shared with the ranks of the same host whose
    affinity overlaps it."""
    if d.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    mine = os.sched_getaffinity(0)
    ranks = [None] * d.world_size
    dist.all_gather_object(ranks, (socket.gethostname(), mine))
    sharing = sum(host == socket.gethostname() and bool(cpus & mine) for host, cpus in ranks)
    torch.set_num_threads(max(1, len(mine) // sharing))


def teardown(clean: bool) -> None:
    """Leave the process group; srun reports a task that exits without doing so as aborted. After an
    error the other ranks may never reach a barrier, so only a clean exit waits for them."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()

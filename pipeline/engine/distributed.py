"""Process-group set-up for every way `earlybert train` is started.

    deepspeed launcher / torchrun   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set
    srun (Slurm)                    SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID are mapped to them;
                                    the master is the first host of SLURM_JOB_NODELIST
    mpirun (OpenMPI, MPICH)         DeepSpeed's MPI discovery through mpi4py
    plain `python`                  a world of one on 127.0.0.1

srun without an MPI plugin starts tasks that mpi4py would each see as a world of one, so Slurm's
own variables go first (common/launchers.py tells mpirun's ranks inside an allocation from srun's tasks).
Backend: NCCL on GPUs, gloo on CPUs. Every tensor that goes through a collective lives on `DistInfo.device`
(NCCL has no CPU backend); object collectives (all_gather_object) find it as the current CUDA device, which
setup() sets before the process group exists.

GPUs: a rank uses its local rank among the devices it sees (local_rank % visible devices), so a task that
Slurm shows one device (--gpus-per-task=1, --gpu-bind=single:1) uses cuda:0. A process given GPUs
(CUDA_VISIBLE_DEVICES, SLURM_GPUS*) on which CUDA does not work refuses to start instead of training on CPU;
EARLYBERT_ALLOW_CPU=1 lets it.

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

from common.launchers import detect_launcher

DEFAULT_PORT = 29500
EXTENSIONS_DIR = Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"


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
    if problem := cuda_problem(os.environ):
        from pipeline.run.command import EXIT_CONFIG

        print(f"earlybert: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CONFIG)
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
    # DeepSpeed builds the NCCL communicator on cuda:LOCAL_RANK in init_distributed: the device is bound first,
    # except for mpirun's ranks, which learn LOCAL_RANK there (DeepSpeed's MPI discovery).
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = None if launcher == "mpi" else bind_device(local_rank)
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=launcher == "mpi",
        distributed_port=int(os.environ.get("MASTER_PORT", DEFAULT_PORT)),
        verbose=False,
        **({"timeout": timeout} if timeout else {}),
    )
    if device is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = bind_device(local_rank)
    if device.type == "cpu":
        release_shm_segment()
    global _joined_a_process_group
    _joined_a_process_group = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, launcher)


# Variables through which Slurm gives a process GPUs: lists of device ids ("0,1"), and counts (maybe typed: "a100:2").
GPU_ID_ENV = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
GPU_COUNT_ENV = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS_PER_NODE", "SLURM_GPUS")
NO_DEVICES = ("", "-1", "NoDevFiles")  # device lists that give none (Slurm writes NoDevFiles when it has none)


def allocated_gpus(env) -> str | None:
    """`NAME=value` of the first variable that gives this process GPUs, or None. An empty or unset
    CUDA_VISIBLE_DEVICES gives none: CI and CPU machines are not refused."""
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:  # set: it decides, whatever Slurm allocated to the job
        return None if cvd.strip() in NO_DEVICES else f"CUDA_VISIBLE_DEVICES={cvd}"
    for k in GPU_ID_ENV + GPU_COUNT_ENV:
        value = env.get(k, "").strip()
        if value not in NO_DEVICES and (k in GPU_ID_ENV or value.rpartition(":")[2] != "0"):
            return f"{k}={value}"
    return None


def nvidia_gpus_present() -> bool:
    """Whether this node has NVIDIA GPUs, read from the driver's entries without CUDA. A device list alone does
    not say so: the deepspeed launcher sets CUDA_VISIBLE_DEVICES=0,1,... for its ranks on CPU machines too."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or any(Path("/dev").glob("nvidia[0-9]*"))


def cuda_problem(env) -> str | None:
    """Why a process given GPUs would train on CPU (torch's CPU build, or a CUDA build the driver cannot run),
    with the fix; None when CUDA works, no GPU is given, or EARLYBERT_ALLOW_CPU=1."""
    if env.get("EARLYBERT_ALLOW_CPU") == "1" or torch.cuda.is_available():
        return None
    given = allocated_gpus(env)
    if given is None or not nvidia_gpus_present():
        return None
    if torch.version.cuda is None:
        cause = (
            f"torch {torch.__version__} is a CPU build (torch.version.cuda is None; `make setup` installs it on "
            f"a machine without nvidia-smi, e.g. a login node). Install the CUDA build, from any node: "
            f"`rm -f .venv/.installed && make setup TORCH=cuda`"
        )
    else:
        try:
            torch.cuda.init()
            reason = f"it sees {torch.cuda.device_count()} devices"
        except Exception as err:  # torch's own diagnosis: no driver, a driver too old for the build, no device
            reason = str(err).strip().splitlines()[0]
        cause = (
            f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot use CUDA here: {reason}. "
            f"A driver older than the build needs a newer driver or a torch build for its CUDA version "
            f'(`rm -f .venv/.installed && make setup TORCH=cuda TORCH_PIP_ARGS="--index-url '
            f"https://download.pytorch.org/whl/cuXYZ\"`); `nvidia-smi` names the driver's CUDA version"
        )
    return f"GPUs are allocated ({given}) but CUDA is unusable: {cause}. To train on CPU anyway: EARLYBERT_ALLOW_CPU=1"


def bind_device(local_rank: int) -> torch.device:
    """This rank's device, made the current one. On GPUs, the local rank among the devices this process sees:
    with one device per task (Slurm's --gpus-per-task=1, --gpu-bind=single:1) every rank uses cuda:0.
    LOCAL_RANK becomes that ordinal: DeepSpeed reads it as one (init_process_group's device_id, the engine's
    device, ZeRO-3's local device)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cuda":
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    ordinal = device_ordinal(local_rank, visible)
    os.environ["LOCAL_RANK"] = str(ordinal)
    torch.cuda.set_device(ordinal)
    print(
        f"earlybert: rank {os.environ.get('RANK', '?')} (local rank {local_rank}) on cuda:{ordinal} of {visible} "
        f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})",
        file=sys.stderr,
        flush=True,
    )
    return torch.device("cuda", ordinal)


def device_ordinal(local_rank: int, visible: int) -> int:
    """The CUDA ordinal of local rank `local_rank` among `visible` devices (each task may see all of the node's,
    or only its own; CUDA available means at least one)."""
    return local_rank % visible


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


def sum_over_ranks(values: dict[str, torch.Tensor], d: DistInfo) -> dict[str, float]:
    """Named scalars summed over every rank in one all-reduce (every rank passes the same names, in
    the same order), on the rank's device whatever device each value is on (NCCL has no CPU backend);
    reading the result waits for the device."""
    packed = torch.stack([v.detach().to(d.device, torch.float32).reshape(()) for v in values.values()])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    # .cpu() waits for the device without holding the GIL: guards' watchdog thread must run meanwhile.
    return dict(zip(values, packed.cpu().tolist()))


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


_joined_a_process_group = False  # set by setup(): this process's end goes through end_rank_process


def end_rank_process(code: int) -> int:
    """The last call of a rank's process (its `__main__`, after teardown): ends the process with `code`, skipping
    the interpreter's finalization; returns `code` in a process that never joined a process group (prep, export,
    in-process tests).

    Why: destroy_process_group does not stop gloo's worker threads while anything still holds the group, and
    DeepSpeed does (its `_WORLD_GROUP`, and a destroyed engine that hook cycles keep alive, with its ZeRO-3
    parameters' `ds_process_group`). Such a thread releases the last collectives' work objects, the final
    barrier's with the ZeRO-3 all-gathers it waited for, whose tensors are Python objects, a moment after the
    barrier returns; if the main thread is by then finalizing the interpreter, the decref's GIL acquire ends the
    thread with pthread_exit through a noexcept frame: "terminate called without an active exception", SIGABRT,
    a finished run reported failed (and requeued by Slurm). Seen in 2 of 15 two-rank ZeRO-3 rebuild runs
    (bench/zero3_exit_loop.py; core dump: ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~AsyncAllgatherWork
    -> TensorImpl::decref_pyobject -> take_gil -> pthread_exit), the open pytorch/pytorch#190489. So nothing of
    torch's may run after Python: the atexit handlers (logging's flush, monitors) run here, then os._exit."""
    if not _joined_a_process_group:
        return code
    import atexit

    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")  # mpirun's ranks (DeepSpeed's MPI discovery): mpi4py finalizes MPI in
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():  # Py_AtExit, which os._exit skips,
        mpi.Finalize()  # and mpirun fails a job whose rank exits without MPI_Finalize
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def teardown(clean: bool) -> None:
    """Leave the process group; srun reports a task that exits without doing so as aborted. After an
    error the other ranks may never reach a barrier, so only a clean exit waits for them."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()

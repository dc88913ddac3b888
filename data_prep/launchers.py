"""Which launcher started this process, read from its environment alone (no torch, no mpi4py import):
one place for `earlybert prep` (MPI ranks through mpi4py) and `earlybert train` (torch.distributed).

    env      the deepspeed launcher or torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    slurm    a task of an srun step (the batch script itself, outside any step, is a world of one)
    mpi      mpirun (OpenMPI, MPICH, Intel MPI) or another PMI/PMIx launcher
    single   a plain process
"""

TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# The world size as OpenMPI, PMI (MPICH, Intel MPI) and PMIx launchers set it.
MPI_SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
MPI_ENV = MPI_SIZE_ENV + ("PMIX_RANK",)  # PMIx launchers may set only the rank


def detect_launcher(env) -> str:
    if all(k in env for k in TORCH_ENV):
        return "env"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return "slurm"
    if any(k in env for k in MPI_ENV):
        return "mpi"
    return "single"


def launched_tasks(env) -> int:
    """How many tasks the MPI launcher or the srun step started (1 for a plain process)."""
    return max(int(env.get(v) or 1) for v in MPI_SIZE_ENV + ("SLURM_STEP_NUM_TASKS",))


def launched_rank(env) -> int:
    """This process's global rank as its launcher set it, before any process group exists (0 for a plain
    process): notes printed before the process group is up are printed by rank 0 only."""
    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0

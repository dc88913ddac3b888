"""Which launcher started this process, read from its environment alone (no torch, no mpi4py import):
one place for `earlybert prep` (MPI ranks through mpi4py) and `earlybert train` (torch.distributed).

    env      the deepspeed launcher or torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    slurm    a task of an srun step (the batch script itself, outside any step, is a world of one)
    mpi      mpirun (OpenMPI, MPICH, Intel MPI) or another PMI/PMIx launcher
    single   a plain process

Inside a Slurm allocation the two last ones overlap. mpirun starts its daemons with srun, so its ranks inherit
the daemons' SLURM_PROCID (the node's index), SLURM_NTASKS and SLURM_STEP_ID: read as Slurm's, several ranks
would be rank 0. And srun's own PMI plugins (`srun --mpi=pmix`, `--mpi=pmi2`) set PMIX_RANK or PMI_RANK/PMI_SIZE
in plain srun tasks. So:
- OMPI_COMM_WORLD_SIZE is set by OpenMPI's mpirun/prterun only, never by srun: mpi.
- Other MPI variables in an srun task: srun's plugin when they name the same rank and size as Slurm's, mpi
  (Hydra's mpiexec, another PMI launcher started inside a step) when they do not.
"""

TORCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# The world size as OpenMPI, PMI (MPICH, Intel MPI) and PMIx launchers set it.
MPI_SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
MPI_RANK_ENV = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
MPI_ENV = MPI_SIZE_ENV + ("PMIX_RANK",)  # PMIx launchers may set only the rank


def detect_launcher(env) -> str:
    if all(k in env for k in TORCH_ENV):
        return "env"
    mpi = any(k in env for k in MPI_ENV)
    if _in_srun_step(env) and (not mpi or _srun_pmi(env)):
        return "slurm"
    return "mpi" if mpi else "single"


def _in_srun_step(env) -> bool:
    return "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env


def _srun_pmi(env) -> bool:
    """The MPI variables of an srun task are srun's own PMI plugin's: they agree with Slurm's rank and size."""
    if "OMPI_COMM_WORLD_SIZE" in env:
        return False
    rank = next((env[k] for k in MPI_RANK_ENV if k in env), env["SLURM_PROCID"])
    size = next((env[k] for k in MPI_SIZE_ENV if k in env), _slurm_size(env))
    return rank == env["SLURM_PROCID"] and size == _slurm_size(env)


def _slurm_size(env) -> str:
    return env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"])


def launched_tasks(env) -> int:
    """How many tasks the MPI launcher or the srun step started (1 for a plain process)."""
    launcher = detect_launcher(env)
    if launcher == "slurm":
        return int(_slurm_size(env))
    if launcher == "mpi":
        return max(int(env.get(v) or 1) for v in MPI_SIZE_ENV)
    return 1


def launched_rank(env) -> int:
    """This process's global rank as its launcher set it, before any process group exists (0 for a plain
    process): notes printed before the process group is up are printed by rank 0 only."""
    launcher = detect_launcher(env)
    keys = {"env": ("RANK",), "slurm": ("SLURM_PROCID",), "mpi": MPI_RANK_ENV}.get(launcher, ())
    for key in keys:
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0

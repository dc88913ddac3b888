"""Which launcher started a rank, inside a Slurm allocation and out (common/launchers.py), and the launch
scripts' handling of the environment (launch/*.sh)."""

import subprocess
import sys

import pytest

from cluster import mpi_unavailable, namespaces_unavailable, slurm_cluster, slurm_unavailable, two_node_cluster
from common.launchers import detect_launcher, launched_rank, launched_tasks
from runs import BIN, REPO, run_env

STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n[0-1]"}
TORCH = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}

# (environment, launcher, rank, tasks) of one process
MATRIX = {
    "srun": ({**STEP, "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}, "slurm", 3, 4),
    "srun --mpi=pmix": (
        {**STEP, "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "PMIX_RANK": "3"},
        "slurm",
        3,
        4,
    ),
    "srun --mpi=pmi2": (
        {**STEP, "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "PMI_RANK": "3", "PMI_SIZE": "4"},
        "slurm",
        3,
        4,
    ),
    # OpenMPI's mpirun in an allocation starts its daemons with srun (one task per node): its ranks inherit the
    # daemon's SLURM_PROCID, here node 1's, and rank 2 of 4 is the first rank of node 1
    "mpirun (OpenMPI) in an allocation": (
        {
            **STEP,
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_STEP_NUM_TASKS": "2",
            "OMPI_COMM_WORLD_RANK": "2",
            "OMPI_COMM_WORLD_SIZE": "4",
            "PMIX_RANK": "2",
        },
        "mpi",
        2,
        4,
    ),
    # ranks equal to the daemon's by chance: still mpirun's
    "mpirun (OpenMPI), one rank per node": (
        {
            **STEP,
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_STEP_NUM_TASKS": "2",
            "OMPI_COMM_WORLD_RANK": "1",
            "OMPI_COMM_WORLD_SIZE": "2",
            "PMIX_RANK": "1",
        },
        "mpi",
        1,
        2,
    ),
    "mpiexec (Hydra) in an allocation": (
        {**STEP, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "PMI_RANK": "3", "PMI_SIZE": "4"},
        "mpi",
        3,
        4,
    ),
    "mpirun in the batch script": (
        {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "OMPI_COMM_WORLD_RANK": "3"}
        | {"OMPI_COMM_WORLD_SIZE": "4"},
        "mpi",
        3,
        4,
    ),
    "mpirun": ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, "mpi", 1, 2),
    "deepspeed launcher in an srun task": (
        {**STEP, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", **TORCH},
        "env",
        3,
        1,
    ),
    "batch script": ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, "single", 0, 1),
    "plain": ({}, "single", 0, 1),
}


@pytest.mark.parametrize("case", MATRIX)
def test_launcher_rank_and_tasks_of_each_environment(case):
    env, launcher, rank, tasks = MATRIX[case]
    assert (detect_launcher(env), launched_rank(env), launched_tasks(env)) == (launcher, rank, tasks)


PROBE = (
    "import os; from common.launchers import detect_launcher, launched_rank; "
    "print('probe', detect_launcher(os.environ), launched_rank(os.environ))"
)


@pytest.mark.slow
def test_mpirun_inside_an_srun_step_is_told_from_srun_tasks(tmp_path):
    if reason := slurm_unavailable() or mpi_unavailable():
        pytest.skip(reason)
    mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-c", PROBE]
    with slurm_cluster(tmp_path / "slurm") as slurm:
        inside = slurm.run("srun", "-n", "1", *mpirun, env=run_env(), cwd=REPO, timeout=120).stdout
        tasks = slurm.run("srun", "-n", "2", sys.executable, "-c", PROBE, env=run_env(), cwd=REPO, timeout=120).stdout
    assert sorted(line for line in inside.splitlines() if line.startswith("probe")) == ["probe mpi 0", "probe mpi 1"]
    assert sorted(line for line in tasks.splitlines() if line.startswith("probe")) == ["probe slurm 0", "probe slurm 1"]


@pytest.mark.slow
def test_deepspeed_sh_takes_the_devices_of_cuda_visible_devices(tmp_path):
    # LOCAL_SIZE: the devices DeepSpeed's CPU accelerator counts; the launcher treats CUDA_VISIBLE_DEVICES alike
    env = {
        **run_env(),
        "LOCAL_SIZE": "4",
        "CUDA_VISIBLE_DEVICES": "3,1",
        "NUM_GPUS": "1",
        "DEEPSPEED": str(BIN / "deepspeed"),
    }
    env["PATH"] = f"{BIN}:{env['PATH']}"
    proc = subprocess.run(
        [str(REPO / "launch" / "deepspeed.sh"), str(tmp_path / "missing.yaml")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert "ignoring it" not in out and "Setting CUDA_VISIBLE_DEVICES=3\n" in out, out
    assert "dist_world_size=1" in out and out.count("earlybert train: cannot read run config") == 1, out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if reason := namespaces_unavailable():
        pytest.skip(f"no two-node cluster: {reason}")
    with two_node_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.mark.slow
def test_mpirun_sh_hands_nccl_cuda_and_library_path_to_the_other_node(cluster, tmp_path):
    probe = tmp_path / "probe.sh"  # stands in for python: says what a rank on each node got
    probe.write_text(
        '#!/bin/sh\necho "probe $(hostname) NCCL_DEBUG=$NCCL_DEBUG'
        ' CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS LD_LIBRARY_PATH=$LD_LIBRARY_PATH"\n'
    )
    probe.chmod(0o755)
    given = {"NCCL_DEBUG": "INFO", "CUDA_DEVICE_MAX_CONNECTIONS": "1", "LD_LIBRARY_PATH": "/opt/earlybert-test/lib"}
    env = {**run_env(), **given, "NP": "2", "MPI_ARGS": f"--hostfile {cluster.hostfile}", "PYTHON": str(probe)}
    proc = subprocess.run(
        cluster.nodes[0].cmd(str(REPO / "launch" / "mpirun.sh"), "unused.yaml", cwd=REPO),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = " ".join(f"{k}={v}" for k, v in given.items())
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("probe")) == [
        f"probe ebnode0 {said}",
        f"probe ebnode1 {said}",
    ], proc.stdout + proc.stderr


@pytest.mark.slow
def test_deepspeed_sh_inside_a_two_node_allocation_starts_ranks_on_both(cluster, tmp_path):
    log = tmp_path / "job.out"
    job = cluster.slurm.sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--chdir={REPO}",
        f"--output={log}",
        "--wrap",
        f"{REPO / 'launch' / 'deepspeed.sh'} {tmp_path / 'missing.yaml'}",
        env={**run_env(), "DEEPSPEED": str(BIN / "deepspeed"), "PATH": f"{BIN}:{run_env()['PATH']}"},
        cwd=REPO,
    )
    cluster.slurm.wait(job, timeout=240)
    out = log.read_text()
    assert "1 ranks on each of 2 nodes (ebnode0,ebnode1), master ebnode0" in out, out
    for node in ("ebnode0", "ebnode1"):  # pdsh's prefixes: a rank on each node
        assert f"{node}: earlybert train: cannot read run config" in out, out

"""The pipeline across two nodes (tests/cluster.py: two network/UTS/mount namespaces on this machine, one CPU and
one rank each, sshd and slurmd on both, the host filesystem shared): EarlyBERT pre-training under the deepspeed
launcher (pdsh over ssh, hostfile of both nodes) killed on the other node and resumed, under `sbatch --nodes=2`,
prep and fine-tuning under `mpirun` with a two-host hostfile. Every result must equal one node's with the same
ranks: the same losses (1e-6, fp32) and ticket, byte-identical shards.
"""

import filecmp
import subprocess
import time

import psutil
import pytest

from cluster import namespaces_unavailable, two_node_cluster
from runs import BIN, EARLYBERT, REPO, assert_same_losses, finish, latest, metrics, run_env, ticket, wait_for_step

pytestmark = pytest.mark.slow

FAILED_WITHIN = 90  # seconds from the kill on the other node to the launcher's exit


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if reason := namespaces_unavailable():
        pytest.skip(f"no two-node cluster: {reason}")
    with two_node_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


def on_first_node(cluster, cmd, env=None):
    return subprocess.Popen(
        cluster.nodes[0].cmd(*cmd, cwd=REPO),
        env={**run_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def no_shm_left(cluster):
    for node in cluster.nodes:
        left = subprocess.run(node.cmd("ls", "/dev/shm"), capture_output=True, text=True, check=True).stdout
        assert "deepspeed" not in left, f"{node.name}: {left}"


def test_deepspeed_launcher_killed_on_the_other_node_resumes_to_one_nodes_run(cluster, config, eb_reference, tmp_path):
    run_dir = tmp_path / "run"
    env = {"HOSTFILE": str(cluster.hostfile), "MASTER_ADDR": cluster.nodes[0].name, "DEEPSPEED": str(BIN / "deepspeed")}
    launch = [str(REPO / "launch" / "deepspeed.sh"), str(config), f"run_dir={run_dir}", *EARLYBERT]
    proc = on_first_node(cluster, launch, env)
    wait_for_step(proc, run_dir, 4, timeout=180)
    other = [
        p
        for p in map(psutil.Process, cluster.nodes[1].processes())
        if "pipeline.train" in p.cmdline() and any(a.startswith("--local_rank") for a in p.cmdline())
    ]
    assert len(other) == 1, "one rank on the other node"
    # started over ssh, the rank has the node's one CPU (its intra-op threads, hence its sums, as one node's ranks)
    assert other[0].cpu_affinity() == [cluster.nodes[1].cpu]
    other[0].kill()
    killed = time.monotonic()
    code, out = finish(proc, timeout=FAILED_WITHIN)
    assert code != 0 and time.monotonic() - killed < FAILED_WITHIN
    assert not cluster.nodes[1].processes() or all(
        "pipeline.train" not in psutil.Process(p).cmdline() for p in cluster.nodes[1].processes()
    ), "no rank left behind"
    resumed_from = latest(run_dir)

    code, out = finish(on_first_node(cluster, launch, env), timeout=240)
    assert code == 0, out
    assert f"resumed from {run_dir / 'checkpoints' / resumed_from}" in out
    assert "ebnode0:" in out and "ebnode1:" in out  # pdsh's prefixes: ranks on both nodes
    assert ticket(run_dir)["mask_digest"] == ticket(eb_reference)["mask_digest"]
    assert ticket(run_dir)["draw_step"] == ticket(eb_reference)["draw_step"]
    assert_same_losses(run_dir, eb_reference)
    no_shm_left(cluster)


def test_sbatch_two_nodes_runs_earlybert_as_one_node(cluster, config, eb_reference, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = cluster.slurm.sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        f"--chdir={REPO}",
        f"--output={log}",
        str(REPO / "launch" / "slurm.sbatch"),
        str(config),
        f"run_dir={run_dir}",
        *EARLYBERT,
        env={**run_env(), "PYTHON": str(BIN / "python")},
        cwd=REPO,
    )
    state = cluster.slurm.wait(job, timeout=240)
    out = log.read_text()
    assert state == "COMPLETED", out
    assert "2 tasks on ebnode[0-1], master ebnode0" in out and "1 CPUs per task" in out
    assert ticket(run_dir)["mask_digest"] == ticket(eb_reference)["mask_digest"]
    assert_same_losses(run_dir, eb_reference)
    no_shm_left(cluster)


def test_mpirun_on_two_hosts_preps_identical_shards_and_fine_tunes(cluster, shards, ft_config, tmp_path):
    mpirun = ["mpirun", "--allow-run-as-root", "-x", "PYTHONPATH", "--hostfile", str(cluster.hostfile), "-np", "2"]
    code, out = finish(on_first_node(cluster, [*mpirun, "hostname"]), timeout=60)
    assert code == 0 and sorted(out.split()) == ["ebnode0", "ebnode1"], out  # a rank on each node
    prep = [
        *mpirun,
        str(BIN / "python"),
        "-m",
        "data_prep",
        "--input",
        str(shards / "corpus.txt"),
        "--output",
        str(tmp_path / "seq32"),
        "--tokenizer",
        str(shards / "tok.json"),
        "--seq-len",
        "32",
    ]
    code, out = finish(on_first_node(cluster, prep), timeout=120)
    assert code == 0, out
    files = sorted(p.name for p in (shards / "seq32").iterdir())
    assert sorted(p.name for p in (tmp_path / "seq32").iterdir()) == files
    _, mismatch, errors = filecmp.cmpfiles(shards / "seq32", tmp_path / "seq32", files, shallow=False)
    assert not mismatch and not errors, mismatch + errors

    run_dir = tmp_path / "ft"
    mpi = {
        "PYTHON": str(BIN / "python"),
        "NP": "2",
        "MPI_ARGS": f"--hostfile {cluster.hostfile}",
        "MODULE": "pipeline.finetune",
    }
    launch = [str(REPO / "launch" / "mpirun.sh"), str(ft_config), f"run_dir={run_dir}"]
    code, out = finish(on_first_node(cluster, launch, mpi), timeout=240)
    assert code == 0, out
    assert 4 <= ticket(run_dir)["draw_step"] <= 6
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, len(metrics(run_dir)) + 1))
    assert (run_dir / "results.json").exists()

"""The GPU paths that a CPU can still check (issue 19).

- Collectives on the rank's device: NCCL has no CPU backend, so every tensor a collective gets must be on
  `DistInfo.device`. A CPU cannot run NCCL; a recording stand-in for torch.distributed takes its place, with the
  meta device as the rank's device: a CPU tensor fails there as under NCCL.
- The refusal to train on CPU when GPUs are allocated, with this machine's real CPU build of torch.
- The device a rank binds when its task sees fewer devices than the node has.
- The watchdog that names the step and the missing rank where a collective cannot raise (NCCL), shown with gloo
  ranks whose process-group timeout is far beyond the watchdog's.
"""

import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest
import torch

from pipeline.engine import distributed
from pipeline.engine.distributed import DistInfo, free_port
from pipeline.run import command
from runs import REPO, run_env

META = torch.device("meta")


class Delivered(Exception):
    """The collective got its tensor on the rank's device; a meta tensor has no values to sum, so the call ends here."""


@dataclass
class RecordingDist:
    """torch.distributed under NCCL for a rank whose device is `device`: a tensor elsewhere fails as NCCL fails."""

    device: torch.device
    calls: list = field(default_factory=list)
    ReduceOp = torch.distributed.ReduceOp

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        self.calls.append(("all_reduce", tensor.device))
        if tensor.device != self.device:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        raise Delivered


@pytest.fixture
def nccl_on_meta(monkeypatch):
    recorder = RecordingDist(META)
    monkeypatch.setattr(distributed, "dist", recorder)
    return recorder


def meta_rank(rank: int = 0) -> DistInfo:
    return DistInfo(rank, 2, rank, META, "env")


def test_step_statistics_and_the_stop_flag_are_summed_on_the_ranks_device(nccl_on_meta):
    # the loops' statistics live on the device, the stop flag is made on the CPU (train.py, finetune.py)
    stats = {"loss": torch.zeros((), device=META), "stop": torch.tensor(0.0)}
    with pytest.raises(Delivered):
        distributed.sum_over_ranks(stats, meta_rank())
    assert nccl_on_meta.calls == [("all_reduce", META)]


@pytest.mark.parametrize("rank", [0, 1])
def test_run_directory_lock_is_agreed_on_the_ranks_device(nccl_on_meta, tmp_path, rank):
    with pytest.raises(Delivered), command._locked(tmp_path / "run", "train", meta_rank(rank)):
        pass
    assert nccl_on_meta.calls == [("all_reduce", META)]


@pytest.mark.parametrize(
    ("local_rank", "visible", "ordinal"),
    [(0, 8, 0), (5, 8, 5), (5, 1, 0), (3, 2, 1)],  # all of the node's devices; one per task (--gpus-per-task=1)
)
def test_a_rank_binds_a_device_its_task_sees(local_rank, visible, ordinal):
    assert distributed.device_ordinal(local_rank, visible) == ordinal


SETUP = "from pipeline.engine import distributed; d = distributed.setup(); print('started on', d.device)"
needs_cpu_build = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA works here: nothing to refuse")


# A GPU node as the NVIDIA driver shows one (/proc/driver/nvidia/gpus/<bus id>), made in a private mount namespace.
FAKE_GPU_NODE = 'mount -t tmpfs none /proc/driver && mkdir -p /proc/driver/nvidia/gpus/0000:01:00.0 && exec "$@"'


def start(env: dict, gpu_node: bool = False) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in run_env().items() if k not in ("CUDA_VISIBLE_DEVICES", "EARLYBERT_ALLOW_CPU")}
    command = [sys.executable, "-c", SETUP]
    if gpu_node:
        command = ["unshare", "--mount", "sh", "-c", FAKE_GPU_NODE, "sh", *command]
    return subprocess.run(command, env={**clean, **env}, cwd=REPO, capture_output=True, text=True, timeout=120)


def can_fake_a_gpu_node() -> bool:
    return subprocess.run(["unshare", "--mount", "sh", "-c", FAKE_GPU_NODE, "sh", "true"]).returncode == 0


@needs_cpu_build
@pytest.mark.parametrize("given", [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"SLURM_JOB_GPUS": "0"}])
def test_gpus_allocated_to_a_cpu_build_refuse_to_start(given):
    if not can_fake_a_gpu_node():
        pytest.skip("needs root and mount namespaces (unshare --mount) to show the driver's GPU entries")
    proc = start(given, gpu_node=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    name, value = next(iter(given.items()))
    assert f"GPUs are allocated ({name}={value})" in proc.stderr
    assert "CPU build (torch.version.cuda is None" in proc.stderr
    assert "make setup TORCH=cuda" in proc.stderr and "EARLYBERT_ALLOW_CPU=1" in proc.stderr
    assert "started" not in proc.stdout


@needs_cpu_build
@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "gpu_node"),
    [
        ({"CUDA_VISIBLE_DEVICES": ""}, True),
        ({"CUDA_VISIBLE_DEVICES": "0", "EARLYBERT_ALLOW_CPU": "1"}, True),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, False),  # what the deepspeed launcher sets on a CPU machine
    ],
)
def test_no_gpus_or_cpu_allowed_start_on_cpu(env, gpu_node):
    if gpu_node and not can_fake_a_gpu_node():
        pytest.skip("needs root and mount namespaces (unshare --mount) to show the driver's GPU entries")
    proc = start(env, gpu_node)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "started on cpu" in proc.stdout


RANK = """
import datetime, sys, time
import torch, torch.distributed as dist
from pipeline.engine import guards
from pipeline.engine.distributed import DistInfo

rank, port = int(sys.argv[1]), sys.argv[2]
# gloo would raise after 120 s; NCCL would not raise at all: the watchdog must speak first
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=120))
guards.init_timeout(3)  # the timeout in force, as the watchdog reads it
if rank == 1:
    time.sleep(120)  # hung outside any collective
with guards.watch(lambda: 7, DistInfo(rank, 2, rank, torch.device("cpu"), "env"), True):
    dist.all_reduce(torch.zeros(1))
"""


@pytest.mark.slow
def test_watchdog_names_the_step_and_the_missing_rank_where_collectives_cannot_raise(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), port], env=run_env(), stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        for r in (0, 1)
    ]
    try:
        t0 = time.monotonic()
        _, err = ranks[0].communicate(timeout=100)
        took = time.monotonic() - t0
    finally:
        ranks[1].kill()
        ranks[1].wait()
    assert ranks[0].returncode == 1, err
    assert "earlybert (rank 0): step 7: a collective" in err and "dist_timeout.long_s=3 s" in err, err
    assert "rank(s) [1] did not reach it" in err, err
    assert took < 60  # long before gloo's own timeout

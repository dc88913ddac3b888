"""Engine rebuild after pruning, on 2 ranks over gloo, ZeRO stages 1, 2 and 3 (fp32 and bf16)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.engine.distributed import free_port

pytestmark = pytest.mark.slow  # launches ranks

ROOT = Path(__file__).resolve().parent.parent


def run_two_ranks(script: Path, args: list[str], timeout: int = 300) -> None:
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DS_ACCELERATOR="cpu",
            PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),  # the tests' helper modules too
        )
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    # DeepSpeed's CPU all-reduce segments are released (pipeline.engine.distributed.release_shm_segment).
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.mark.parametrize("stage,dtype", [(1, "bf16"), (2, "fp32"), (3, "bf16")])
def test_rebuild_keeps_fp32_masters_moments_counters_and_lr(tmp_path, stage, dtype):
    out = tmp_path / "result.json"
    run_two_ranks(ROOT / "tests" / "workers" / "rebuild_check.py", [str(stage), dtype, str(out)])
    r = json.loads(out.read_text())
    assert r["heads"] == [4, 4] and sum(r["ffn"]) == 23  # 6 -> 4 heads per layer; 46 -> 23 neurons
    assert r["same_names"] and not r["has_gates"] and r["zero_size"] == []
    # The masters are the sliced fp32 masters exactly (not rounded through bf16), moments likewise.
    assert r["max_weight_diff"] == 0.0
    assert r["moment_keys"] == ["exp_avg", "exp_avg_sq"]
    assert all(v <= 1e-6 for v in r["max_moment_diff"].values()), r["max_moment_diff"]
    assert r["counters_after"] == r["counters_before"] and r["counters_after"]["global_steps"] == 3
    assert r["lr_after"] == r["lr_before"]
    assert r["opt_step_after"] == r["opt_step_before"] == 3
    assert all(math.isfinite(x) for x in r["losses_after"])


def test_rebuild_frees_the_dense_engine_before_building_the_pruned_one(tmp_path):
    """ZeRO-2, 2 ranks, a 27M-parameter model. On a GPU the state carried over waits in host memory and the
    device's peak stays the dense engine's; on the CPU it shares the memory with the dense engine while it is
    read, so the peak is bounded by the dense engine plus the carried state (masters and moments of the kept
    weights), never the dense and the pruned engine together (before: 1.89x the dense RSS, now 1.31x)."""
    out = tmp_path / "result.json"
    run_two_ranks(ROOT / "tests" / "workers" / "rebuild_memory.py", ["2", "fp32", str(out)], timeout=600)
    r = json.loads(out.read_text())
    assert r["alive_at_build"] == [0], r  # nothing of the dense engine is left when the pruned one is built
    # Slack: one parameter's full tensors at a time on the way, and allocator rounding.
    assert r["peak_rss_mb"] <= r["dense_rss_mb"] + 1.25 * r["carried_mb"] + 32, r
    assert r["heads"] == [5] * 8 and all(math.isfinite(x) for x in r["losses_after"])

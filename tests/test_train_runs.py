"""`earlybert train` end to end on CPU: bert-tiny, 2 ranks over gloo, fp32, a small real corpus.

One uninterrupted 2-rank ZeRO-1 run (`reference`) is the yardstick: ZeRO-2 and ZeRO-3, mpirun,
Slurm, and an interrupted-and-resumed run must reproduce its losses. fp32 on CPU with the same
seeds makes those comparisons exact (1e-6), dropout included.
"""

import json
import shutil
import signal
import subprocess

import psutil
import pytest

from cluster import mpi_unavailable, slurm_cluster, slurm_unavailable
from pipeline.engine.distributed import free_port
from pipeline.pretrain.loop import main
from runs import (
    BIN,
    REPO,
    STEPS,
    TOTAL,
    assert_same_losses,
    deepspeed,
    faulty_train,
    finish,
    latest,
    metrics,
    run_env,
    train_cmd,
    wait_for_step,
)

pytestmark = pytest.mark.slow


def test_zero1_trains_two_phases_and_logs_every_step(reference):
    logged = metrics(reference)
    assert [m["step"] for m in logged] == list(range(1, TOTAL + 1))
    assert [m["seq_len"] for m in logged] == [32] * STEPS[0] + [64] * STEPS[1]
    assert logged[-1]["samples"] == 64 * TOTAL
    first, last = logged[0], logged[STEPS[0] - 1]
    assert last["mlm_loss"] < first["mlm_loss"] - 0.3, "the MLM loss goes down within phase 0"
    for m in logged:
        assert {
            "loss",
            "mlm_loss",
            "nsp_loss",
            "mlm_acc",
            "lr",
            "samples",
            "seq_per_s",
            "tokens_per_s",
            "tflops",
            "gate_l1",
            "gate_penalty",
            "step_time_s",
            "data_wait_s",
        } <= set(m)
        assert m["loss"] == pytest.approx(m["mlm_loss"] + m["nsp_loss"], rel=1e-5)  # the task loss; L1 apart
        assert m["gate_penalty"] == pytest.approx(1e-4 * m["gate_l1"], rel=1e-4)
    assert logged[0]["gate_l1"] == pytest.approx(2 * 4 + 2 * 256)  # bert-tiny's gates, all 1.0 at step 0
    ckpt = reference / "checkpoints"
    assert latest(reference) == "step_00000012"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000009", "step_00000012"]  # keep: 2
    tag = ckpt / "step_00000012"
    state = json.loads((tag / "run_state.json").read_text())
    assert state["step"] == TOTAL and state["samples"] == 64 * TOTAL and state["world_size"] == 2
    assert json.loads((tag / "architecture.json").read_text())["num_heads_per_layer"] == [4, 4]
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors"} <= {p.name for p in tag.iterdir()}


@pytest.fixture(scope="session")
def stage_runs(config, reference, tmp_path_factory):
    """The reference run's config on ZeRO stages 2 and 3; DeepSpeed's CSV monitor stands in for
    TensorBoard / W&B (the same monitor interface)."""
    runs = {1: reference}
    for stage in (2, 3):
        root = tmp_path_factory.mktemp(f"zero{stage}")
        monitor = [
            f"deepspeed_overrides.csv_monitor.{k}={v}"
            for k, v in (("enabled", "true"), ("output_path", root / "monitor"), ("job_name", "train"))
        ]
        code, out = finish(
            deepspeed(config, root / "run", f"deepspeed_overrides.zero_optimization.stage={stage}", *monitor)
        )
        assert code == 0, out
        runs[stage] = root / "run"
    return runs


@pytest.mark.parametrize("stage", [2, 3])
def test_zero2_and_zero3_reproduce_zero1(stage_runs, reference, stage):
    run_dir = stage_runs[stage]
    assert_same_losses(run_dir, reference, tol=1e-4, keys=("loss", "mlm_loss", "gate_l1", "lr"))
    rows = (run_dir.parent / "monitor" / "train" / "Train_mlm_loss.csv").read_text().splitlines()
    assert rows[0] == "step,mlm_loss" and len(rows) == TOTAL + 1


def test_kill9_sigterm_and_a_crash_during_save_resume_exactly(config, reference, tmp_path):
    run_dir = tmp_path / "run"
    # 1. kill -9 one rank mid-run: the launcher takes the other down; latest is a complete checkpoint.
    proc = deepspeed(config, run_dir)
    wait_for_step(proc, run_dir, 4)
    rank1 = next(p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank=1" in p.cmdline())
    rank1.kill()
    code, out = finish(proc)
    assert code != 0
    killed_at = latest(run_dir)

    # 2. relaunch: resumes; SIGTERM to the per-node launcher (deepspeed.launcher.launch, which forwards
    # it to the ranks) saves at the current step.
    proc = deepspeed(config, run_dir)
    wait_for_step(proc, run_dir, int(killed_at[5:]) + 2)
    launcher = next(
        p for p in psutil.Process(proc.pid).children(recursive=True) if "deepspeed.launcher.launch" in p.cmdline()
    )
    launcher.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert f"resumed from {run_dir / 'checkpoints' / killed_at}" in out
    assert "stopped by a signal at step" in out
    stopped = metrics(run_dir)[-1]["step"]
    assert latest(run_dir) == f"step_{stopped:08d}" and stopped < TOTAL

    # 3. relaunch, crashing in the middle of the final save (model states written, optimizer states
    # not, `latest` not moved): the previous checkpoint stays the one to resume from.
    crashing = faulty_train(
        tmp_path,
        "deepspeed.runtime.engine:DeepSpeedEngine._save_zero_checkpoint",
        "before",
        condition=f"args[2] == 'step_{TOTAL:08d}'",
    )
    code, out = finish(deepspeed(config, run_dir, script=crashing))
    assert code != 0
    partial = run_dir / "checkpoints" / f"step_{TOTAL:08d}"
    assert (partial / "mp_rank_00_model_states.pt").exists() and not list(partial.glob("*optim_states.pt"))
    before_crash = latest(run_dir)
    assert before_crash != partial.name

    # 4. relaunch: resumes from the checkpoint before the crash, replaces the partial one, finishes.
    code, out = finish(deepspeed(config, run_dir))
    assert code == 0, out
    assert f"resumed from {run_dir / 'checkpoints' / before_crash}" in out
    assert latest(run_dir) == partial.name and list(partial.glob("*optim_states.pt"))
    assert_same_losses(run_dir, reference)


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_on_one_rank_from_a_two_rank_checkpoint(config, stage_runs, tmp_path, stage):
    run_dir = tmp_path / "run"
    shutil.copytree(stage_runs[stage], run_dir)
    (run_dir / "checkpoints" / "latest").write_text("step_00000009")
    shutil.rmtree(run_dir / "checkpoints" / "step_00000012")
    proc = subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "pipeline.train",
            *train_cmd(config, run_dir),
            f"deepspeed_overrides.zero_optimization.stage={stage}",
        ],
        env=run_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "universal checkpoint" in proc.stdout and (run_dir / "checkpoints/step_00000009/universal").is_dir()
    assert json.loads((run_dir / "checkpoints/step_00000012/run_state.json").read_text())["world_size"] == 1
    # The same global batch (now 2 micro-batches on one rank) and the same samples and masks: only
    # dropout draws differ from the 2-rank run.
    assert_same_losses(run_dir, stage_runs[stage], tol=0.05, keys=("loss",))
    assert_same_losses(run_dir, stage_runs[stage], tol=1e-12, keys=("lr", "samples"))


def test_bad_runs_fail_fast_with_a_clear_message(config, reference, shards, tmp_path, capsys):
    """Checked from files before any process group exists: main() returns 2 in this process."""

    def fails(*overrides):
        assert main(["--config", str(config), *overrides]) == 2
        return capsys.readouterr().err

    assert "unknown key(s) optim.learning_rate" in fails(f"run_dir={tmp_path}", "optim.learning_rate=1")
    assert "ZeRO has stages 0, 1, 2 and 3" in fails(
        f"run_dir={tmp_path}", "deepspeed_overrides.zero_optimization.stage=4"
    )
    lamb = tmp_path / "lamb.json"
    lamb.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "LAMB", "params": {}}}))
    assert "LAMB with ZeRO stage 2 is refused" in fails(f"run_dir={tmp_path}", f"deepspeed={lamb}")
    assert "hiden_dropout_prob are not EarlyBertConfig fields" in fails(
        f"run_dir={tmp_path}", "model.overrides.hiden_dropout_prob=0"
    )
    assert "unknown model preset 'bert-huge'" in fails(f"run_dir={tmp_path}", "model.preset=bert-huge")
    assert "prepared with another tokenizer" in fails(f"run_dir={tmp_path}", f"phases.1.shards={shards / 'other32'}")
    assert "manifest.json: not found" in fails(f"run_dir={tmp_path}", f"phases.0.shards={tmp_path}")
    # Resuming the reference run with another tokenizer's shards, or as another model.
    other_tok = fails(
        f"run_dir={reference}", f"phases.0.shards={shards / 'other32'}", f"phases.1.shards={shards / 'other32'}"
    )
    assert "was trained on shards of another tokenizer" in other_tok
    other_model = fails(f"run_dir={reference}", "model.preset=bert-mini")
    assert "checkpoint of another model" in other_model and "hidden_size: checkpoint 64, config 256" in other_model
    assert "steps the phases plan" in fails(f"run_dir={reference}", "phases.1.steps=1")


def test_mpirun_runs_the_same_training(config, reference, tmp_path):
    if reason := mpi_unavailable():
        pytest.skip(reason)
    env = {
        **run_env(),
        "PYTHON": str(BIN / "python"),
        "NP": "2",
        "MASTER_PORT": str(free_port()),
        "MPI_ARGS": "--oversubscribe",
    }
    proc = subprocess.run(
        [str(REPO / "launch" / "mpirun.sh"), str(config), f"run_dir={tmp_path / 'run'}"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_losses(tmp_path / "run", reference)


def test_slurm_sbatch_runs_a_two_task_training_job(config, reference, tmp_path):
    if reason := slurm_unavailable():
        pytest.skip(reason)
    with slurm_cluster(tmp_path / "slurm") as slurm:
        env = {**run_env(), "PYTHON": str(BIN / "python")}
        job = slurm.sbatch(
            "--ntasks=2",
            f"--output={tmp_path / 'job.out'}",
            str(REPO / "launch" / "slurm.sbatch"),
            str(config),
            f"run_dir={tmp_path / 'run'}",
            env=env,
            cwd=REPO,
        )
        state = slurm.wait(job, timeout=240)
        out = (tmp_path / "job.out").read_text()
        assert state == "COMPLETED", out
    assert "2 tasks" in out and "done: 12 steps" in out
    assert_same_losses(tmp_path / "run", reference)

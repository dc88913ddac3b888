"""`earlybert train|finetune --check [--world-size N]`: everything a launch on N ranks would check (config, data,
batch split, checkpoint, detector), printed as the plan with exit 0, or exit 2 naming each problem; no process
group, no GPU, nothing written. The shipped configs run through it with the tests' data at 1 to 64 ranks."""

import shutil
import subprocess

import pytest
import torch

from pipeline.config import plan_batches
from pipeline.engine import distributed
from pipeline.finetune import loop as finetune
from pipeline.pretrain import loop as train
from pipeline.run.command import launched_world_size
from runs import BIN, REPO, run_env

CONFIGS = REPO / "launch" / "configs"
V0_RUNS = REPO / "tests" / "fixtures" / "v0_runs"


@pytest.fixture(autouse=True)
def no_process_group(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a process group was started")

    monkeypatch.setattr(distributed, "setup", refuse)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "PMI_SIZE"):
        monkeypatch.delenv(key, raising=False)  # this process is not a launcher's rank


def check(capsys, stage, *argv) -> tuple[int, str, str]:
    code = stage.main(["--check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_data(shards, run_dir) -> list[str]:
    return [f"phases.0.shards={shards / 'seq32'}", f"phases.1.shards={shards / 'seq64'}", f"run_dir={run_dir}"]


def test_train_check_of_the_shipped_tiny_config_at_1_to_64_ranks(shards, tmp_path, capsys):
    config, run_dir = CONFIGS / "tiny.yaml", tmp_path / "run"
    for w in range(1, 65):
        code, out, err = check(capsys, train, "--config", config, "--world-size", w, *tiny_data(shards, run_dir))
        if 32 % w:  # tiny.yaml: global batch 32
            assert code == 2 and f"global_batch_size=32 cannot be split evenly over {w} ranks" in err, (w, err)
            continue
        assert code == 0, (w, err)
        assert f"checked for {w} rank" in out and plan_batches(32, 16, w).describe() in out
        assert f"phase 0    270 steps at seq 32 from {shards / 'seq32'}" in out
        assert f"step 0: no checkpoint in {run_dir / 'checkpoints'}" in out
        assert "search     earlybert: gate masks every 100 steps" in out
    assert not run_dir.exists()  # no lock, no config, nothing written
    assert not torch.cuda.is_initialized()


def test_check_of_bert_large_with_the_tests_shards(shards, tmp_path, capsys):
    """The README's 2 and 4 nodes of 8 GPUs: refused before, split now."""
    argv = ["--config", CONFIGS / "bert-large.yaml", *tiny_data(shards, tmp_path / "run")]
    for w, split in ((16, "micro-batch 16 x 16 ranks x 1 accumulation step"), (32, "micro-batch 8 x 32 ranks")):
        code, out, err = check(capsys, train, *argv, "--world-size", w)
        assert code == 0 and split in out, err
        assert "24 layers, hidden 1024" in out and "ZeRO stage 2, bf16" in out
        assert "no natural draw before step 20000, a forced one at step 100000" in out


def test_check_names_every_problem(tmp_path, capsys):
    """The shipped bert-large config where its data is not: both phases' shards named, and the split."""
    code, out, err = check(capsys, train, "--config", CONFIGS / "bert-large.yaml", "--world-size", 8)
    assert code == 2 and out == ""
    assert "2 problems" in err and "wiki-books/seq128/manifest.json: not found" in err and "seq512" in err
    code, _, err = check(capsys, train, "--config", CONFIGS / "bert-large.yaml", "--world-size", 3)
    assert code == 2 and "3 problems" in err and "the nearest global batch that can is 255" in err


@pytest.fixture
def old_run(tmp_path):
    """The fixture's run stopped mid-search at step 4 of 4; a second phase gives it more to train."""
    shutil.copytree(V0_RUNS, tmp_path, dirs_exist_ok=True)
    phase = f"{{shards: {tmp_path / 'shards' / 'seq32'}, steps: 4}}"
    return ["--config", tmp_path / "search.yaml", f"run_dir={tmp_path / 'search_run'}", f"phases=[{phase}, {phase}]"]


def test_check_of_a_resume(old_run, capsys):
    code, out, err = check(capsys, train, *old_run, "--world-size", 1)
    assert code == 0, err
    assert "search_run/checkpoints/step_00000004: step 4, 32 samples; written on 1 rank, loaded as saved" in out
    code, out, err = check(capsys, train, *old_run, "--world-size", 2)
    assert code == 0 and "loaded through DeepSpeed's universal checkpoint" in out, err
    assert "global batch 8 = micro-batch 4 x 2 ranks x 1 accumulation step" in out


def test_a_resume_that_cannot_work_is_refused_before_any_process_group(old_run, capsys):
    code, _, err = check(capsys, train, *old_run, "global_batch_size=16")
    assert code == 2 and "was trained with global_batch_size=8, the config says 16" in err
    code, _, err = check(capsys, train, *old_run, "--world-size", 2, "deepspeed_overrides.zero_optimization.stage=3")
    assert code == 2 and "was written by 1 ranks; resuming on 2" in err and "not 3" in err


def test_a_launch_checks_the_ranks_its_launcher_started(shards, tmp_path, capsys, monkeypatch):
    """Without --check the same checks run for the launcher's world size, before the process group."""
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["--config", str(CONFIGS / "tiny.yaml"), *tiny_data(shards, tmp_path / "run")]
    assert train.main(argv) == 2  # the fixture's setup() would raise
    assert "cannot be split evenly over 3 ranks" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, out, _ = check(capsys, train, *argv)
    assert code == 0 and "checked for 4 ranks" in out and "micro-batch 8 x 4 ranks" in out


@pytest.mark.parametrize(
    "env,ranks",
    [
        ({}, 1),
        ({"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "1"}, 16),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "32", "SLURM_STEP_ID": "0"}, 32),
        ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "1"}, 8),
    ],
    ids=["plain", "deepspeed", "srun", "mpirun"],
)
def test_the_launchers_world_size_is_read_before_any_process_group(env, ranks):
    assert launched_world_size(env) == ranks


def test_finetune_check_of_the_shipped_local_config(hf_bert, task_files, tmp_path, capsys):
    argv = [
        "--config",
        CONFIGS / "finetune-local.yaml",  # global batch 32, at most 16 per rank
        f"task.train_files=[{task_files / 'train.csv'}]",
        f"task.validation_files={{validation: [{task_files / 'dev.csv'}]}}",
        "task.text_fields=[sentence]",
        f"model.init_from={hf_bert}",
        f"run_dir={tmp_path / 'run'}",
    ]
    for w in (1, 3, 4, 32, 64):  # 64: more ranks than sequences in a step
        code, out, err = check(capsys, finetune, *argv, "--world-size", w)
        if 32 % w:
            assert code == 2 and f"cannot be split evenly over {w} ranks" in err, (w, err)
            continue
        assert code == 0, (w, err)
        assert plan_batches(32, 16, w).describe() in out
        assert "320 training features, 10 steps per epoch" in out  # epochs count global batches: any ranks
        assert "stages     search until the draw at lr 2e-05 (its LR schedule spans 30 steps), ticket 20 steps" in out
        assert "search     earlybert: gate masks every 1 steps" in out
    assert not (tmp_path / "run").exists()


def test_finetune_check_names_the_split_and_the_missing_data(capsys):
    code, _, err = check(capsys, finetune, "--config", CONFIGS / "finetune-local.yaml", "--world-size", 3)
    assert code == 2 and "2 problems" in err and "over 3 ranks" in err and "runs/task/train.csv" in err


def test_the_console_script_checks_without_a_process_group(shards, tmp_path):
    cmd = [str(BIN / "python"), "-m", "pipeline.cli", "train", "--config", str(CONFIGS / "tiny.yaml")]
    done = subprocess.run(
        [*cmd, "--check", "--world-size", "4", *tiny_data(shards, tmp_path / "run")],
        env={**run_env(), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "checked for 4 ranks, a launch would start" in done.stdout and "micro-batch 8 x 4 ranks" in done.stdout
    assert not (tmp_path / "run").exists()
    done = subprocess.run([*cmd, "--world-size", "4"], env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--world-size N (N >= 1) goes with --check" in done.stderr

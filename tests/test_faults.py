"""Faults and bad inputs, tried as a user would meet them: damaged checkpoints, a full disk, two commands on one
directory, a stopped rank, NaN losses, and bad input to every command. Each test tries the cases of
tests/faults_table.py it names; docs/faults.md is generated from that table and checked here."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import psutil
import pytest

from faults_table import CASES, DOC, cases, claimed, render, tried
from pipeline import checkpoint, runlock
from pipeline.checkpoint import CheckpointError
from pipeline.cli import EXIT_CONFIG, EXIT_FAULT
from runs import BIN, REPO, TOTAL, assert_same_losses, deepspeed, finish, latest, metrics, run_env, train_cmd


def test_the_table_is_current_and_every_case_is_tried():
    counts = claimed()
    assert set(CASES) - set(counts) == set(), "tried by no test in tests/test_*.py"
    assert {name for name, n in counts.items() if n > 1} == set(), "tried by more than one test"
    assert set(counts) - set(CASES) == set(), "not in tests/faults_table.py"
    assert DOC.read_text() == render(), "docs/faults.md is out of date: python -m tests.faults_table"


def _train(config, run_dir, *overrides, script=None, timeout=240):
    """`earlybert train` as one process (no launcher); returns (exit status, stdout + stderr)."""
    target = [script] if script else ["-m", "pipeline.train"]
    done = subprocess.run(
        [str(BIN / "python"), *target, *train_cmd(config, run_dir, *overrides)],
        env=run_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr


def _shard(tag_dir):
    """An optimizer shard of a checkpoint, the file a failing disk or an interrupted copy cuts short."""
    return sorted(tag_dir.glob("*optim_states.pt"))[0]


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# ---- checkpoints ----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_ckpt(tmp_path):
    """Three checkpoints of the project's layout (DeepSpeed's files stood in for by bytes), with manifests."""
    ckpt = tmp_path / "run" / "checkpoints"
    for step in (3, 6, 9):
        tag = ckpt / checkpoint.tag_for(step)
        tag.mkdir(parents=True)
        (tag / checkpoint.RUN_STATE).write_text(json.dumps({"format": 3, "step": step}))
        (tag / checkpoint.ARCHITECTURE).write_text("{}")
        (tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(4096))
        checkpoint.write_manifest(tag, checksum=True)
    (ckpt / "latest").write_text("step_00000009")
    return ckpt


@tried("manifest_checks")
def test_a_manifest_finds_truncated_missing_and_flipped_files(fake_ckpt):
    tag = fake_ckpt / "step_00000009"
    shard = _shard(tag)
    assert checkpoint.damage(tag) is None
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    assert "does not match its checksum" in checkpoint.damage(tag)
    assert checkpoint.damage(tag, verify="size") is None  # sizes only
    _truncate(shard)
    assert f"{shard} has 2048 bytes, 4096 when it was saved" in checkpoint.damage(tag, verify="size")
    shard.unlink()
    assert f"{shard} is missing" in checkpoint.damage(tag)


@tried("no_manifest_accepted")
def test_checkpoints_without_a_manifest_are_accepted():
    ckpt = REPO / "tests" / "fixtures" / "v0_runs" / "drawn_run" / "checkpoints"
    assert checkpoint.resume_tag(ckpt) == checkpoint.latest_tag(ckpt)


@tried("no_intact_checkpoint")
def test_no_intact_checkpoint_is_an_error(fake_ckpt, capsys):
    for tag in fake_ckpt.glob("step_*"):
        _truncate(_shard(tag))
    with pytest.raises(CheckpointError, match="there is no intact checkpoint before it"):
        checkpoint.resume_tag(fake_ckpt)


@pytest.mark.slow
@tried("damaged_latest")
def test_a_damaged_latest_gives_way_to_the_newest_intact_checkpoint(config, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    shard = _shard(run_dir / "checkpoints" / "step_00000012")
    _truncate(shard)
    code, out = finish(deepspeed(config, run_dir))
    assert code == 0, out
    assert f"{shard} has" in out and "Resuming from the newest intact checkpoint, step_00000009" in out
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000009'}" in out
    assert (run_dir / "checkpoints" / "step_00000012.set-aside").is_dir()
    assert latest(run_dir) == "step_00000012" and checkpoint.damage(run_dir / "checkpoints" / "step_00000012") is None
    assert_same_losses(run_dir, reference)


@pytest.mark.slow
@tried("resume_from_older")
def test_resume_from_an_older_checkpoint_by_hand(config, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    code, out = finish(deepspeed(config, run_dir, "resume_from=step_00000009"))
    assert code == 0, out
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000009'}" in out
    assert (run_dir / "checkpoints" / "step_00000012.set-aside").is_dir() and latest(run_dir) == "step_00000012"
    assert_same_losses(run_dir, reference)


@pytest.mark.slow
@tried("disk_full")
def test_a_full_disk_during_a_save_stops_with_the_previous_checkpoint_intact(config, reference, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    tag_bytes = sum(p.stat().st_size for p in (reference / "checkpoints" / "step_00000012").rglob("*") if p.is_file())
    run_dir = tmp_path / "small"
    run_dir.mkdir()
    # Room for one checkpoint and a half: the one at step 3 fits, the one at step 6 does not.
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(tag_bytes * 1.5) + 2**20}", "tmpfs", str(run_dir)], check=True
    )
    try:
        started = time.monotonic()
        code, out = finish(deepspeed(config, run_dir, "log.tensorboard=false", "dist_timeout.long_s=60"), timeout=180)
        assert code != 0 and time.monotonic() - started < 150, out
        assert "saving checkpoint" in out and "MiB free on its filesystem" in out, out
        assert f"{run_dir / 'checkpoints' / 'step_00000003'} is intact and still `latest`" in out
        assert latest(run_dir) == "step_00000003"
        assert checkpoint.damage(run_dir / "checkpoints" / "step_00000003") is None
        assert not (run_dir / "checkpoints" / "step_00000006").exists()
    finally:
        subprocess.run(["umount", "-l", str(run_dir)], check=True)


# ---- locks ----------------------------------------------------------------------------------------------------


def _lock(directory, **holder):
    directory.mkdir(parents=True, exist_ok=True)
    me = psutil.Process()
    record = {
        "host": socket.gethostname(),
        "pid": me.pid,
        "started": me.create_time(),
        "command": "test",
        "slurm_job": None,
        **holder,
    }
    (directory / runlock.LOCK).write_text(json.dumps(record))
    return record


@tried("second_train")
def test_a_second_train_on_a_run_directory_is_refused(config, tmp_path):
    run_dir = tmp_path / "run"
    holder = _lock(run_dir)  # this test's process: alive
    code, out = _train(config, run_dir)
    assert code == EXIT_CONFIG, out
    assert f"{run_dir} is in use by earlybert train on host {holder['host']}, pid {holder['pid']}" in out
    assert json.loads((run_dir / runlock.LOCK).read_text()) == holder
    assert not (run_dir / "checkpoints").exists()


@tried("stale_lock", "lock_other_host")
def test_a_dead_holders_lock_is_taken_over_another_hosts_is_not(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    _lock(tmp_path, pid=dead.pid)
    path = runlock.acquire(tmp_path, "earlybert train")
    assert "taking over" in capsys.readouterr().err
    assert json.loads(path.read_text())["pid"] == os.getpid()
    runlock.release(path)
    assert not path.exists()
    _lock(tmp_path, host="elsewhere")
    with pytest.raises(runlock.LockError, match=f"host elsewhere.*delete {path}"):
        runlock.acquire(tmp_path, "earlybert train")


@tried("second_prep")
def test_a_second_prep_into_one_output_is_refused(shards, tmp_path, capsys):
    from data_prep.cli import main as prep_main

    out = tmp_path / "out"
    _lock(out)
    code = prep_main(
        [
            "--input",
            str(shards / "corpus.txt"),
            "--output",
            str(out),
            "--tokenizer",
            str(shards / "tok.json"),
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 1 and f"{out} is in use by earlybert prep" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [runlock.LOCK]


# ---- ranks and collectives ------------------------------------------------------------------------------------


@pytest.mark.slow
@tried("rank_stopped")
def test_a_stopped_rank_fails_the_others_within_the_timeout_and_the_relaunch_resumes(config, reference, tmp_path):
    from runs import wait_for_step

    run_dir = tmp_path / "run"
    proc = deepspeed(config, run_dir, "dist_timeout.step_s=5")
    wait_for_step(proc, run_dir, 4)
    ranks = {
        r: next(p for p in psutil.Process(proc.pid).children(recursive=True) if f"--local_rank={r}" in p.cmdline())
        for r in (0, 1)
    }
    ranks[1].send_signal(signal.SIGSTOP)
    started = time.monotonic()
    ranks[0].wait(timeout=60)
    assert time.monotonic() - started < 30
    ranks[1].kill()
    code, out = finish(proc)
    assert code != 0
    message = r"\(rank 0\): step \d+: a collective .* dist_timeout.step_s=5 s .*rank\(s\) \[1\] did not reach it"
    assert re.search(message, out), out
    code, out = finish(deepspeed(config, run_dir))
    assert code == 0, out
    assert "resumed from" in out
    assert_same_losses(run_dir, reference)


NAN_SCRIPT = """import sys
from pipeline import model
from pipeline.train import main
original, calls = model.EarlyBertForPreTraining.forward, [0]
def forward(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    calls[0] += 1
    if calls[0] in {calls_with_nan}:
        out.loss = out.loss * float("nan")
    return out
model.EarlyBertForPreTraining.forward = forward
sys.exit(main(sys.argv[1:]))
"""


def _nan_script(tmp_path, steps):
    """`earlybert train` whose loss is NaN in the first micro-batch of `steps` (one rank, 2 micro-batches a step)."""
    script = tmp_path / "nan_train.py"
    script.write_text(NAN_SCRIPT.replace("{calls_with_nan}", repr({2 * s - 1 for s in steps})))
    return str(script)


@pytest.mark.slow
@tried("nan_stop", "nan_skip", "nan_skip_limit")
def test_a_nan_loss_stops_or_is_skipped_by_option(config, tmp_path):
    stop = tmp_path / "stop"
    code, out = _train(config, stop, script=_nan_script(tmp_path, [5]))
    assert code == EXIT_FAULT and "step 5: the loss is nan; stopping" in out, out
    assert latest(stop) == "step_00000003" and checkpoint.damage(stop / "checkpoints" / "step_00000003") is None
    skip = tmp_path / "skip"
    code, out = _train(
        config, skip, "nonfinite.action=skip", "nonfinite.max_skipped=1", script=_nan_script(tmp_path, [5])
    )
    assert code == 0, out
    logged = metrics(skip)
    assert [m["nonfinite_skipped"] for m in logged] == [0] * 4 + [1] * (TOTAL - 4)
    assert logged[4]["skipped_steps"] == 1  # DeepSpeed did not apply it
    limit = tmp_path / "limit"
    code, out = _train(
        config, limit, "nonfinite.action=skip", "nonfinite.max_skipped=1", script=_nan_script(tmp_path, [5, 7])
    )
    assert code == EXIT_FAULT and "step 7: the loss is nan, after 1 skipped" in out, out


# ---- bad input ------------------------------------------------------------------------------------------------


def _refused(main, config, tmp_path, capsys, argv, message):
    """`main(argv)` (overrides of `config` on a new run_dir, or a whole command line) exits with EXIT_CONFIG and
    `message`, writing nothing."""
    if argv[0] != "--config":
        argv = ["--config", str(config), f"run_dir={tmp_path / 'run'}", *argv]
    assert main(argv) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "run").exists(), "nothing written"


@cases(
    "train_config_missing",
    "train_config_not_mapping",
    "train_wrong_type",
    "train_bad_choice",
    "train_bad_timeout",
    "train_bad_verify",
    "train_run_dir_is_file",
    "train_no_shards",
    "train_other_model",
    "resume_from_missing",
    "resume_from_malformed",
)
def test_bad_train_input(config, reference, tmp_path, capsys, case):
    from pipeline.train import main

    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    a_file = tmp_path / "file"
    a_file.write_text("")
    args = {
        "train_config_missing": (["--config", "nothere.yaml"], "cannot read run config nothere.yaml"),
        "train_config_not_mapping": (["--config", str(listed)], "expected a mapping at the top level"),
        "train_wrong_type": (["phases.0.steps=ten"], "phases.0.steps: expected int"),
        "train_bad_choice": (["nonfinite.action=ignore"], "choose one of stop, skip"),
        "train_bad_timeout": (["dist_timeout.step_s=0"], "dist_timeout.step_s must be > 0"),
        "train_bad_verify": (["checkpoint.verify=md5"], "choose one of checksum, size"),
        "train_run_dir_is_file": ([f"run_dir={a_file}"], f"run_dir {a_file} is a file, not a directory"),
        "train_no_shards": ([f"phases.0.shards={tmp_path}"], "manifest.json: not found"),
        "train_other_model": ([f"run_dir={reference}", "model.preset=bert-mini"], "checkpoint of another model"),
        "resume_from_missing": ([f"run_dir={reference}", "resume_from=step_00000099"], "resume_from step_00000099: "),
        "resume_from_malformed": (["resume_from=latest"], "expected a checkpoint tag such as step_00001000"),
    }
    _refused(main, config, tmp_path, capsys, *args[case])


@pytest.mark.slow
@cases(
    "finetune_config_missing",
    "finetune_wrong_type",
    "finetune_init_from_missing",
    "finetune_pretraining_run_dir",
    "finetune_resume_from_missing",
)
def test_bad_finetune_input(ft_config, reference, tmp_path, capsys, case):
    from pipeline.finetune import main

    args = {
        "finetune_config_missing": (["--config", "nothere.yaml"], "cannot read run config nothere.yaml"),
        "finetune_wrong_type": (["seed=abc"], "seed: expected int"),
        "finetune_init_from_missing": ([f"model.init_from={tmp_path / 'missing'}"], "does not exist"),
        "finetune_pretraining_run_dir": ([f"run_dir={reference}"], "a checkpoint of another task head"),
        "finetune_resume_from_missing": (["resume_from=step_00000099"], "resume_from step_00000099: "),
    }
    _refused(main, ft_config, tmp_path, capsys, *args[case])


@pytest.fixture
def damaged_run(reference, tmp_path):
    run_dir = tmp_path / "damaged"
    shutil.copytree(reference, run_dir)
    shard = _shard(run_dir / "checkpoints" / "step_00000012")
    _truncate(shard)
    return run_dir, shard


@cases(
    "eval_run_missing",
    "eval_shards_missing",
    "eval_damaged",
    "export_run_missing",
    "export_bad_tag",
    "export_damaged",
    "export_output_is_file",
    "report_run_missing",
    "report_metrics_corrupt",
    "report_metrics_empty",
    "prep_output_is_file",
)
def test_bad_input_to_eval_export_report_and_prep(shards, reference, damaged_run, tmp_path, capsys, case):
    from data_prep.cli import main as prep_main
    from pipeline.evaluate import main as eval_main
    from pipeline.export import main as export_main
    from pipeline.report import main as report_main

    missing, out, damaged = tmp_path / "missing", tmp_path / "out", damaged_run[0]
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    corrupt, empty = tmp_path / "corrupt", tmp_path / "empty"
    for run_dir in (corrupt, empty):
        run_dir.mkdir()
    (corrupt / "metrics.jsonl").write_text((reference / "metrics.jsonl").read_text()[:-20] + "\n")
    (empty / "metrics.jsonl").write_text("")
    runs = {
        "eval_run_missing": (eval_main, [str(missing), "--shards", str(shards / "seq32")], f"{missing}/checkpoints"),
        "eval_shards_missing": (eval_main, [str(reference), "--shards", str(missing)], "manifest.json: not found"),
        "eval_damaged": (eval_main, [str(damaged), "--shards", str(shards / "seq32")], str(damaged_run[1])),
        "export_run_missing": (export_main, [str(missing), "--output", str(out)], "has no complete checkpoint"),
        "export_bad_tag": (
            export_main,
            [str(reference), "--tag", "step_00000099", "--output", str(out)],
            "has no complete checkpoint step_00000099",
        ),
        "export_damaged": (export_main, [str(damaged), "--output", str(out)], str(damaged_run[1])),
        "export_output_is_file": (
            export_main,
            [str(reference), "--output", str(a_file)],
            "exists and is not a directory",
        ),
        "report_run_missing": (report_main, [str(missing)], f"{missing}/metrics.jsonl not found"),
        "report_metrics_corrupt": (report_main, [str(corrupt)], f"{corrupt}/metrics.jsonl: line {TOTAL} is not JSON"),
        "report_metrics_empty": (report_main, [str(empty)], "has no records yet"),
        "prep_output_is_file": (
            prep_main,
            [
                "--input",
                str(shards / "corpus.txt"),
                "--output",
                str(a_file),
                "--tokenizer",
                str(shards / "tok.json"),
                "--no-progress",
            ],
            "exists and is not a directory",
        ),
    }
    command, argv, message = runs[case]
    assert command(argv) == (2 if command is export_main else 1)
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists() and not missing.exists() and a_file.read_text() == "keep me"
    assert not (corrupt / "report").exists() and not (empty / "report").exists()

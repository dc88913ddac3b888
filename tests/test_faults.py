"""Faults and bad inputs, tried as a user would meet them: damaged checkpoints, a full disk, two commands on one
directory, a stopped rank, NaN losses, and bad input to every command. Each test tries the cases of
tests/faults_table.py it names; docs/faults.md is generated from that table and checked here."""

import argparse
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
from pipeline.config import ConfigError
from pipeline.pretrain.config import load_pretrain_config
from pipeline.run import checkpoint, runlock
from pipeline.run.checkpoint import CheckpointError
from pipeline.run.command import EXIT_CONFIG, EXIT_FAULT
from pipeline.run.metrics import truncate_after
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


@tried("latest_unreadable")
def test_an_unreadable_latest_gives_way_to_the_newest_intact_checkpoint(fake_ckpt, capsys):
    (fake_ckpt / "latest").write_bytes(b"\xff\xfe step_\x00")
    assert checkpoint.resume_tag(fake_ckpt) == "step_00000009"
    err = capsys.readouterr().err
    assert f"{fake_ckpt / 'latest'} cannot be read as a checkpoint tag" in err, err
    assert "Resuming from the newest intact checkpoint, step_00000009" in err


@tried("metrics_torn_line")
def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(json.dumps({"step": s}).encode() + b"\n" for s in range(1, 6)) + b'{"step": 6, "lo')
    truncate_after(path, 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert f"{path}: line 6 is not a metrics record" in capsys.readouterr().err


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
    assert code == CASES["second_prep"].exit and f"{out} is in use by earlybert prep" in capsys.readouterr().err
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
from pipeline.pretrain.loop import main
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


@pytest.mark.slow
@tried("train_ctrl_c")
def test_ctrl_c_stops_a_run_with_130_and_its_latest_checkpoint_intact(config, tmp_path):
    from runs import wait_for_step

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [str(BIN / "python"), "-m", "pipeline.train", *train_cmd(config, run_dir)],
        env=run_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_step(proc, run_dir, 4, timeout=600)  # a loaded CI machine: start-up alone can take minutes
    proc.send_signal(signal.SIGINT)
    code, out = finish(proc, timeout=120)
    assert code == CASES["train_ctrl_c"].exit and "interrupted (Ctrl-C)" in out and "Traceback" not in out, out
    assert checkpoint.damage(run_dir / "checkpoints" / latest(run_dir)) is None


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
    from pipeline.pretrain.loop import main

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


# A YAML "billion laughs": nine levels of nine aliases, 387 million values once expanded.
BOMB = "deepspeed_overrides:\n  l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)
)


@cases(
    "train_config_not_utf8",
    "train_python_tag",
    "train_duplicate_key",
    "train_cyclic_alias",
    "train_deep_nesting",
    "train_yaml_bomb",
    "train_not_finite",
    "train_bad_override_value",
    "train_out_of_range",
    "train_deepspeed_unknown_key",
    "train_micro_batch_beyond_data",
    "train_vocab_beyond_model",
)
def test_hostile_train_input(config, shards, tmp_path, capsys, case):
    """Each refused before any process group, with a message naming the file or key; nothing written."""
    from pipeline.pretrain.loop import main

    def config_with(extra: bytes) -> list[str]:
        path = tmp_path / f"hostile_{hash(extra)}.yaml"  # one per case of the table below, built at once
        path.write_bytes(
            config.read_bytes().replace(b"run_dir: unused", f"run_dir: {tmp_path / 'run'}".encode()) + extra
        )
        return ["--config", str(path)]

    args = {
        "train_config_not_utf8": (config_with(b"seed: \xff\xfe\n"), "not UTF-8 text (byte"),
        "train_python_tag": (
            config_with(b"compile: !!python/object/apply:os.system [true]\n"),
            "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'",
        ),
        "train_duplicate_key": (config_with(b"seed: 8\n"), "duplicate key 'seed'"),
        "train_cyclic_alias": (
            config_with(b"deepspeed_overrides: {x: &a [*a]}\n"),
            "nested deeper than 32 levels (an alias that contains itself?)",
        ),
        "train_deep_nesting": (
            config_with(b"deepspeed_overrides: {x: " + b"[" * 5000 + b"]" * 5000 + b"}\n"),
            "nested deeper than 32 levels",
        ),
        "train_yaml_bomb": (config_with(BOMB.encode()), "more than 100000 values once its aliases are expanded"),
        "train_not_finite": (["optim.lr=.nan"], "optim.lr: expected a finite number, got nan"),
        "train_bad_override_value": (["optim.lr=[1"], "override 'optim.lr=[1': while parsing a flow sequence"),
        "train_out_of_range": ([f"seed={2**70}"], f"seed: {2**70} is out of the 64-bit integer range"),
        "train_deepspeed_unknown_key": (
            ["deepspeed_overrides={zero_optimization: {bogus: 1}}"],
            "DeepSpeed refuses it: 1 validation error for DeepSpeedZeroConfig bogus",
        ),
        "train_micro_batch_beyond_data": (
            [f"micro_batch_size={2**20}", f"global_batch_size={2**20}"],
            f"sequences, fewer than one micro-batch of {2**20} per rank",
        ),
        "train_vocab_beyond_model": (
            ["model.overrides={vocab_size: 1000}"],
            f"the model's vocabulary (1000 embeddings) is smaller than phases.0.shards' ({shards / 'seq32'}): a "
            f"tokenizer of 2000 ids, ids up to",
        ),
    }
    argv, message = args[case]
    started = time.monotonic()
    _refused(main, config, tmp_path, capsys, argv, message)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.overrides={hidden_dropout_prob: 1.5}"],
            "hidden_dropout_prob: a probability, expected a number in [0, 1]",
        ),
        (["model.overrides={intermediate_size: -3}"], "intermediate_size: a size, expected a whole number in [1, "),
        (["dist_timeout.step_s=.inf"], "dist_timeout.step_s: expected a finite number, got inf"),
        (["earlybert.lambda_heads=.nan"], "earlybert.lambda_heads: expected a finite number"),
        (["seed=-1"], "seed=-1 must be in [0, 4294967295]"),
        (["deepspeed_overrides={bogus: 1}"], "bogus are not DeepSpeed settings"),
    ],
)
def test_out_of_range_values_are_named(config, tmp_path, overrides, message):
    """More of train_out_of_range, train_not_finite and train_deepspeed_unknown_key, at the loader."""
    with pytest.raises(ConfigError) as refused:
        load_pretrain_config(str(config), [f"run_dir={tmp_path}", *overrides])
    assert message in str(refused.value)


def _fake_resume(config, run_dir):
    """RUN/checkpoints/step_00000003 as a run of `config` saves it (run state and architecture; DeepSpeed's files
    are not read before the process group), and the prepared fresh start it came from."""
    from pipeline.pretrain.loop import prepare

    cfg, datasets, start = prepare(argparse.Namespace(config=str(config), overrides=[f"run_dir={run_dir}"]), 1)
    tag = run_dir / "checkpoints" / "step_00000003"
    tag.mkdir(parents=True)
    state = {**start.state.to_dict(), "step": 3, "samples": 3 * cfg.global_batch_size, "phase_samples": 3 * 64}
    (tag / checkpoint.RUN_STATE).write_text(json.dumps(state))
    (tag / checkpoint.ARCHITECTURE).write_text(json.dumps(start.model_config.to_dict()))
    (run_dir / "checkpoints" / "latest").write_text("step_00000003")
    return start


@tried("resume_model_changed", "resume_shards_changed")
def test_a_resume_on_another_model_shape_or_other_shards_is_refused(config, shards, tmp_path, capsys):
    from pipeline.pretrain.loop import main, prepare

    run_dir = tmp_path / "run"
    start = _fake_resume(config, run_dir)
    base = ["--config", str(config), f"run_dir={run_dir}"]
    ffn = start.model_config.intermediate_size
    assert main([*base, f"model.overrides={{intermediate_size: {2 * ffn}}}"]) == CASES["resume_model_changed"].exit
    err = capsys.readouterr().err
    assert f"model.overrides.intermediate_size: checkpoint {ffn}, config {2 * ffn}" in err, err
    swapped = [*base, f"phases.0.shards={shards / 'seq64'}"]
    assert main(swapped) == CASES["resume_shards_changed"].exit
    err = capsys.readouterr().err
    assert f"phases.0: the run trained on {shards / 'seq32'} (seq_len 32," in err, err
    assert f"the config gives {shards / 'seq64'} (seq_len 64," in err and "accept_new_shards=true" in err
    cfg, _, accepted = prepare(
        argparse.Namespace(config=str(config), overrides=swapped[2:] + ["accept_new_shards=true"]), 1
    )
    assert accepted.tag == "step_00000003" and accepted.state.phases[0]["seq_len"] == 64  # recorded from here on
    assert [p.name for p in run_dir.iterdir()] == ["checkpoints"]  # nothing written by the refusals


@pytest.mark.slow
@cases(
    "finetune_config_missing",
    "finetune_wrong_type",
    "finetune_init_from_missing",
    "finetune_pretraining_run_dir",
    "finetune_resume_from_missing",
)
def test_bad_finetune_input(ft_config, reference, tmp_path, capsys, case):
    from pipeline.finetune.loop import main

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
    "export_latest_unreadable",
    "report_run_missing",
    "report_metrics_corrupt",
    "report_metrics_empty",
    "report_metrics_binary",
    "prep_output_is_file",
)
def test_bad_input_to_eval_export_report_and_prep(shards, reference, damaged_run, tmp_path, capsys, case):
    from data_prep.cli import main as prep_main
    from pipeline.tools.export import main as export_main
    from pipeline.tools.masked_lm_eval import main as eval_main
    from pipeline.tools.report import main as report_main

    missing, out, damaged = tmp_path / "missing", tmp_path / "out", damaged_run[0]
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    corrupt, empty, binary, garbled = (
        tmp_path / "corrupt",
        tmp_path / "empty",
        tmp_path / "binary",
        tmp_path / "garbled",
    )
    for run_dir in (corrupt, empty, binary, garbled / "checkpoints"):
        run_dir.mkdir(parents=True)
    (corrupt / "metrics.jsonl").write_text((reference / "metrics.jsonl").read_text()[:-20] + "\n")
    (empty / "metrics.jsonl").write_text("")
    (binary / "metrics.jsonl").write_bytes(bytes(range(256)) * 4)
    (garbled / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00")
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
        "export_latest_unreadable": (
            export_main,
            [str(garbled), "--output", str(out)],
            f"{garbled}/checkpoints/latest cannot be read as a checkpoint tag",
        ),
        "report_run_missing": (report_main, [str(missing)], f"{missing}/metrics.jsonl not found"),
        "report_metrics_corrupt": (report_main, [str(corrupt)], f"{corrupt}/metrics.jsonl: line {TOTAL} is not JSON"),
        "report_metrics_empty": (report_main, [str(empty)], "has no records yet"),
        "report_metrics_binary": (report_main, [str(binary)], f"{binary}/metrics.jsonl: line 1 is not JSON"),
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
    assert command(argv) == CASES[case].exit
    err = capsys.readouterr().err
    assert message in err, err
    assert not out.exists() and not missing.exists() and a_file.read_text() == "keep me"
    assert not any((run_dir / "report").exists() for run_dir in (corrupt, empty, binary))


@cases("eval_bad_arguments")
def test_bad_eval_arguments_are_usage_errors(tmp_path, capsys, case):
    from pipeline.tools.masked_lm_eval import main as eval_main

    run = [str(tmp_path), "--shards", str(tmp_path)]
    for argv, message in (
        (["--batch-size", "0"], "expected a whole number >= 1, got '0'"),
        (["--max-sequences", "-1"], "expected a whole number >= 1, got '-1'"),
        (["--device", "tpu9"], "'tpu9' is not a torch device"),
    ):
        with pytest.raises(SystemExit) as exit_:
            eval_main(run + argv)
        assert exit_.value.code == CASES[case].exit
        assert message in capsys.readouterr().err

"""`make gpu-check` (bench/gpu_check.py) where there is no GPU: it says so and exits 0; its plan can be printed, and
its CPU parts (the prep, the configs it writes) run here."""

import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from bench import gpu_check

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine `make gpu-check` runs the check")
def test_make_gpu_check_without_a_gpu_says_so_and_exits_0():
    done = subprocess.run(["make", "gpu-check"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpu-check: no CUDA GPU on this machine" in done.stdout


def test_the_dry_run_prints_every_command(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--work", str(tmp_path)]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)
    for precision, ds_config in (("bf16", "zero2_bf16.json"), ("fp16", "zero2_fp16.json")):
        config = tmp_path / f"pretrain-{precision}.yaml"
        assert yaml.safe_load(config.read_text())["deepspeed"].endswith(ds_config)
        # the reference and the relaunch through launch/deepspeed.sh, the killed run through faulty_train's script
        assert "launch/deepspeed.sh" in lines[f"{precision} reference"] and str(config) in lines[f"{precision} resumed"]
        assert lines[f"{precision} killed"].split()[5] == str(tmp_path / "exit_after_write_ticket.py")
        assert "earlybert.detector.max_search_steps=6" in lines[f"{precision} killed"]
    assert lines["bf16 reference"].split()[1] != lines["fp16 reference"].split()[1]  # MASTER_PORT: side by side
    assert "--module pipeline.finetune" in lines["fine-tune"] and "export" in lines["export fine-tuned"]
    assert list(lines)[:3] == ["prep 1", "prep 2", "prep 3"] and "bench" in lines
    assert not (tmp_path / "seq128").exists()  # nothing ran


@pytest.mark.slow
def test_the_cpu_smoke_preps_the_data_and_loads_the_configs(tmp_path, capsys):
    assert gpu_check.main(["--cpu-smoke", "--work", str(tmp_path)]) == 0
    assert "prep done, configs load" in capsys.readouterr().out
    assert (tmp_path / "seq128" / "manifest.json").is_file()
    assert len((tmp_path / "task" / "train.csv").read_text().splitlines()) == 321  # header + 320 rows

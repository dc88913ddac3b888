"""Shared by the end-to-end run tests: a real corpus and shards, a tiny run config, the launcher
helpers, and the uninterrupted 2-rank ZeRO-1 `reference` run the others are compared with."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STEPS = (8, 4)  # phase 0 at seq 32, phase 1 at seq 64
TOTAL = sum(STEPS)


def run_env() -> dict:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
            "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """A real corpus (text on this machine), a WordPiece tokenizer, NSP shards at seq 32 and 64,
    plus seq-32 shards of another tokenizer."""
    root = tmp_path_factory.mktemp("data")
    prep = [str(BIN / "python"), "-m", "data_prep"]

    def run(*args):
        subprocess.run(prep + list(args), check=True, cwd=root, capture_output=True)

    run("local-corpus", "--output", "corpus.txt", "--max-mb", "1")
    run("tokenizer", "--input", "corpus.txt", "--output", "tok.json", "--vocab-size", "2000", "--lowercase")
    run("tokenizer", "--input", "corpus.txt", "--output", "other.json", "--vocab-size", "1500")
    for name, tok, seq_len in (("seq32", "tok.json", 32), ("seq64", "tok.json", 64), ("other32", "other.json", 32)):
        run("--input", "corpus.txt", "--output", name, "--tokenizer", tok, "--seq-len", str(seq_len), "--workers", "1")
    return root


@pytest.fixture(scope="session")
def config(shards, tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": "unused", "seed": 7,
        "model": {"preset": "bert-tiny"},
        "deepspeed": str(REPO / "ds_configs" / "zero1.json"),
        "phases": [{"shards": str(shards / "seq32"), "steps": STEPS[0]},
                   {"shards": str(shards / "seq64"), "steps": STEPS[1]}],
        # 32 sequences per rank: steps long enough (~0.1 s) to be interrupted at a chosen point
        "micro_batch_size": 32, "global_batch_size": 64,
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "checkpoint": {"interval": 3, "keep": 2},
        "log": {"interval": 4},
    }))
    return path


def train_cmd(config, run_dir, *overrides) -> list[str]:
    return ["--config", str(config), f"run_dir={run_dir}", *overrides]


def deepspeed(config, run_dir, *overrides, ranks=2, script=None):
    """Start `earlybert train` under the deepspeed launcher; returns the launcher's Popen."""
    target = [script] if script else ["--module", "pipeline.train"]
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), *target,
           *train_cmd(config, run_dir, *overrides)]
    return subprocess.Popen(cmd, env=run_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def latest(run_dir) -> str:
    return (Path(run_dir) / "checkpoints" / "latest").read_text()


def wait_for_step(proc, run_dir, step, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logged = metrics(run_dir)
        if logged and logged[-1]["step"] >= step:
            return logged[-1]["step"]
        assert proc.poll() is None, f"training exited ({proc.returncode}) before step {step}:\n{proc.stdout.read()}"
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def assert_same_losses(run_dir, reference, tol=1e-6, keys=("loss", "mlm_loss", "nsp_loss", "lr", "samples"), until=TOTAL):
    """Every step's losses (up to step `until`) equal the reference run's within tol."""
    got, ref = metrics(run_dir), metrics(reference)
    assert [m["step"] for m in got] == list(range(1, TOTAL + 1)), "one metrics line per step, none twice"
    for g, r in zip(got[:until], ref[:until]):
        for k in keys:
            assert g[k] == pytest.approx(r[k], abs=tol), f"step {g['step']} {k}: {g[k]} != reference {r[k]}"


@pytest.fixture(scope="session")
def reference(config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, out = finish(deepspeed(config, run_dir))
    assert code == 0, out
    return run_dir



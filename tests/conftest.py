"""Fixtures shared by the test files: a real corpus and its shards, the tiny run config, and the
uninterrupted 2-rank ZeRO-1 `reference` run that the interrupted and other-launcher runs are compared
with. Helpers that work on them are in runs.py."""
import subprocess

import pytest
import yaml

from runs import BIN, REPO, STEPS, deepspeed, finish


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


@pytest.fixture(scope="session")
def reference(config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, out = finish(deepspeed(config, run_dir))
    assert code == 0, out
    return run_dir



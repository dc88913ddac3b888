"""Training-loop throughput of `earlybert train` itself, launched as a user would and timed from
its RUN/metrics.jsonl (first steps dropped as warm-up):

  - CPU suite (default): bert-tiny and bert-base at seq 128, on 1 and 2 ranks (deepspeed launcher,
    fp32, ZeRO-1, 32 / 8 sequences per rank): sequences/s, time per step, and the time the loop
    waited on the loader as a share of the step (target < 1%); plus what one micro-batch costs the
    loader thread (read + mask) on its own.
  - GPU suite (where a GPU is present): bert-large, seq 128, bf16, ZeRO-1 on one GPU: sequences/s
    and MFU (goal >= 50%, about 1,900 sequences/s on an H100).

Vocabulary 30,522 (BERT's) for the MLM head's cost; shards from text on this machine.

    python -m bench.bench_train                 # CPU suite, or the GPU suite where there is a GPU
    python -m bench.bench_train --suite cpu
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bench.common import write_results
from data_prep import ShardDataset
from pipeline.pretrain.loader import PhaseLoader
from pipeline.run.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# (preset, ranks, micro batch per rank, steps, warm-up steps dropped, DeepSpeed config)
CPU_CASES = [
    ("bert-tiny", 1, 32, 40, 5, "zero1.json"),
    ("bert-tiny", 2, 32, 40, 5, "zero1.json"),
    ("bert-base", 1, 8, 8, 3, "zero1.json"),
    ("bert-base", 2, 8, 8, 3, "zero1.json"),
]
GPU_CASES = [("bert-large", 1, 128, 60, 20, "zero1_bf16.json")]
VOCAB = 30522


def prep_commands(root: Path, corpus_mb: int) -> list[list[str]]:
    """`earlybert prep` under root: a corpus of text already on this machine (corpus.txt), a WordPiece tokenizer
    (tok.json), seq-128 shards (seq128/)."""
    prep = [sys.executable, "-m", "data_prep"]
    corpus, tok = str(root / "corpus.txt"), str(root / "tok.json")
    return [
        [*prep, "local-corpus", "--output", corpus, "--max-mb", str(corpus_mb)],
        [*prep, "tokenizer", "--input", corpus, "--output", tok, "--vocab-size", "8192", "--lowercase"],
        [*prep, "--input", corpus, "--output", str(root / "seq128"), "--tokenizer", tok, "--seq-len", "128"],
    ]


def prepare_shards(root: Path, corpus_mb: int) -> Path:
    for cmd in prep_commands(root, corpus_mb):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    return root / "seq128"


def run_case(root: Path, shards: Path, preset: str, ranks: int, micro: int, steps: int, ds_file: str) -> list[dict]:
    run_dir = root / f"{preset}-{ranks}"
    config = root / f"{preset}-{ranks}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run_dir),
                "model": {"preset": preset, "overrides": {"vocab_size": VOCAB}},
                "deepspeed": str(ROOT / "ds_configs" / ds_file),
                "phases": [{"shards": str(shards), "steps": steps}],
                "micro_batch_size": micro,
                "global_batch_size": micro * ranks,
                "optim": {"lr": 1e-4, "warmup_steps": 1},
                "checkpoint": {"interval": 10**9},
                "log": {"interval": 10},
            }
        )
    )
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(29500 + os.getpid() % 1000),
        "--module",
        "pipeline.train",
        "--config",
        str(config),
    ]
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")),
    }
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return RunDir(run_dir).read_metrics()


def loader_cost_s(shards: Path, micro: int, reps: int = 20) -> float:
    """Median time to build one micro-batch (read, pad, mask, to torch) outside the training loop."""
    loader = PhaseLoader(
        ShardDataset(shards),
        seed=0,
        phase=0,
        start_sample=0,
        steps=0,
        micro_batch_size=micro,
        grad_accum=1,
        world_size=1,
        rank=0,
        mask_prob=0.15,
        prefetch=1,
        pin_memory=False,
    )
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        loader.micro_batch(i, 0)
        times.append(time.perf_counter() - t0)
    loader.close()
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    cases = GPU_CASES if args.suite == "gpu" else CPU_CASES

    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        shards = prepare_shards(root, corpus_mb=20 if args.suite == "gpu" else 4)
        for preset, ranks, micro, steps, warmup, ds_file in cases:
            print(f"== {preset} on {ranks} rank(s), {micro} sequences per rank, {steps} steps", flush=True)
            timed = run_case(root, shards, preset, ranks, micro, steps, ds_file)[warmup:]
            step_s = statistics.median(m["step_time_s"] for m in timed)
            wait_share = sum(m["data_wait_s"] for m in timed) / sum(m["step_time_s"] for m in timed)
            mfu = [m["mfu"] for m in timed if "mfu" in m]
            r = {
                "preset": preset,
                "ranks": ranks,
                "micro_batch": micro,
                "global_batch": micro * ranks,
                "seq_len": timed[0]["seq_len"],
                "deepspeed": ds_file,
                "timed_steps": len(timed),
                "step_time_s": step_s,
                "seq_per_s": micro * ranks / step_s,
                "tflops": statistics.median(m["tflops"] for m in timed),
                "mfu": statistics.median(mfu) if mfu else None,
                "data_wait_share": wait_share,
                "loader_cost_per_micro_batch_s": loader_cost_s(shards, micro),
            }
            results.append(r)
            rows.append(
                [
                    preset,
                    ranks,
                    micro * ranks,
                    f"{step_s:.3f}",
                    f"{r['seq_per_s']:.1f}",
                    f"{r['tflops']:.3g}",
                    f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a",
                    f"{100 * wait_share:.2f}%",
                    f"{1000 * r['loader_cost_per_micro_batch_s']:.1f}",
                ]
            )
    notes = (
        f"`earlybert train` under the deepspeed launcher, seq 128, vocabulary {VOCAB}, median over the "
        f"timed steps (warm-up dropped). Data wait: time the loop blocked on the loader thread / step time "
        f"(target < 1%). Loader cost: one micro-batch built outside the loop (read + mask), which the "
        f"thread overlaps with the step."
    )
    if args.suite == "cpu":
        notes += (
            " GPU suite (bert-large, seq 128, bf16, one GPU; goal >= 50% MFU, ~1,900 seq/s on an H100): "
            "`python -m bench.bench_train --suite gpu` on a GPU machine; not run here (no GPU)."
        )
    header = [
        "preset",
        "ranks",
        "global batch",
        "step (s)",
        "seq/s",
        "TFLOP/s",
        "MFU",
        "data wait",
        "loader ms/micro-batch",
    ]
    print(write_results("train", {"suite": args.suite, "cases": results}, header, rows, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

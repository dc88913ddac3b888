"""EarlyBERT against dense BERT and random pruning, end to end: same corpus, steps, seed and launcher.

    corpus (local text) -> 95% train / 5% held-out documents -> tokenizer -> shards
    -> `earlybert train` x {earlybert, dense, random} (2 ranks, deepspeed launcher, ZeRO-2)
    -> wall time, and MLM loss / accuracy on the held-out shards (identical masks for every run)

The random baseline prunes at EarlyBERT's draw step, at the same ratios. Targets, as in the paper:
EarlyBERT saves >= 30% of the dense run's training time with held-out MLM loss within 3% of dense,
and beats random pruning.

    python -m bench.bench_e2e                    # bert-mini on CPU (about 20 minutes on 2 cores)
    python -m bench.bench_e2e --steps 1000 --preset bert-small
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS, write_results
from data_prep import ShardDataset
from pipeline.distributed import free_port
from pipeline.evaluate import evaluate
from pipeline.export import load_run_model
from pipeline.report import read_metrics, write_report

ROOT = Path(__file__).resolve().parent.parent
PY = str(Path(sys.executable))


def split_documents(corpus: Path, train: Path, heldout: Path, every: int = 20) -> tuple[int, int]:
    """Every `every`-th document (blank-line separated) goes to the held-out file."""
    docs = [d for d in corpus.read_text(encoding="utf-8", errors="replace").split("\n\n") if d.strip()]
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    kept = [d for i, d in enumerate(docs) if i % every != every - 1]
    train.write_text("\n\n".join(kept) + "\n", encoding="utf-8")
    heldout.write_text("\n\n".join(held) + "\n", encoding="utf-8")
    return len(kept), len(held)


def prep(work: Path, corpus_mb: int) -> tuple[Path, Path]:
    prep_cmd = [PY, "-m", "data_prep"]
    corpus = work / "corpus.txt"
    if not corpus.exists():
        subprocess.run(prep_cmd + ["local-corpus", "--output", str(corpus), "--max-mb", str(corpus_mb)], check=True)
    split_documents(corpus, work / "train.txt", work / "heldout.txt")
    subprocess.run(prep_cmd + ["tokenizer", "--input", str(work / "train.txt"), "--output", str(work / "tokenizer.json"),
                               "--vocab-size", "8000", "--lowercase"], check=True)
    for name in ("train", "heldout"):
        subprocess.run(prep_cmd + ["--input", str(work / f"{name}.txt"), "--output", str(work / name),
                                   "--tokenizer", str(work / "tokenizer.json"), "--seq-len", "128", "--no-progress"], check=True)
    return work / "train", work / "heldout"


def train(work: Path, name: str, shards: Path, args, *overrides: str) -> tuple[Path, float]:
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(Path(PY).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "pipeline.train", "--config", str(ROOT / "launch/configs/demo.yaml"), f"run_dir={run_dir}",
           f"phases=[{{shards: {shards}, steps: {args.steps}}}]", f"model.preset={args.preset}",
           f"checkpoint.interval={args.steps}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return run_dir, wall


def summarize(run_dir: Path, wall: float, heldout: ShardDataset) -> dict:
    records = read_metrics(run_dir)
    model, _ = load_run_model(run_dir)
    ticket = json.loads((run_dir / "ticket.json").read_text()) if (run_dir / "ticket.json").exists() else None
    return {
        "process_wall_s": wall,
        "train_s": records[-1]["wall_s"],
        "steps": records[-1]["step"],
        "train_loss_last20": sum(r["loss"] for r in records[-20:]) / 20,
        "heldout": evaluate(model, heldout),
        "draw_step": ticket["draw_step"] if ticket else None,
        "heads_per_layer": model.config.num_heads_per_layer,
        "ffn_per_layer": model.config.intermediate_size_per_layer,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="bert-mini")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--search-steps", type=int, default=80, help="max_search_steps (the paper searches ~10%% of the budget)")
    parser.add_argument("--corpus-mb", type=int, default=12)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_e2e")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)

    train_shards, heldout_dir = prep(args.work, args.corpus_mb)
    heldout = ShardDataset(heldout_dir)
    detector = (f"earlybert.detector.interval={max(1, args.search_steps // 8)}", "earlybert.detector.min_search_steps="
                f"{args.search_steps // 2}", f"earlybert.detector.max_search_steps={args.search_steps}")
    runs = {}
    runs["earlybert"] = train(args.work, "earlybert", train_shards, args, "earlybert.mode=earlybert", *detector)
    draw = json.loads((runs["earlybert"][0] / "ticket.json").read_text())["draw_step"]
    runs["dense"] = train(args.work, "dense", train_shards, args, "earlybert.mode=dense")
    runs["random"] = train(args.work, "random", train_shards, args, "earlybert.mode=random", f"earlybert.draw_step={draw}")
    summary = {name: summarize(run_dir, wall, heldout) for name, (run_dir, wall) in runs.items()}

    dense, eb, rnd = summary["dense"], summary["earlybert"], summary["random"]
    saving = 1 - eb["train_s"] / dense["train_s"]
    loss_gap = eb["heldout"]["mlm_loss"] / dense["heldout"]["mlm_loss"] - 1
    results = {"preset": args.preset, "steps": args.steps, "max_search_steps": args.search_steps, "runs": summary,
               "time_saving_vs_dense": saving, "heldout_loss_gap_vs_dense": loss_gap,
               "beats_random": eb["heldout"]["mlm_loss"] < rnd["heldout"]["mlm_loss"]}
    rows = [[name, s["draw_step"] or "-", f"{s['train_s'] / 60:.2f}", f"{s['process_wall_s'] / 60:.2f}",
             f"{s['heldout']['mlm_loss']:.4f}", f"{s['heldout']['mlm_acc']:.4f}", str(s["heads_per_layer"])]
            for name, s in summary.items()]
    report = write_report([runs["earlybert"][0], runs["dense"][0], runs["random"][0]])
    figures = RESULTS / "e2e"
    figures.mkdir(parents=True, exist_ok=True)
    for png in report.parent.glob("*.png"):
        shutil.copyfile(png, figures / png.name)
    path = write_results(
        "e2e", results, ["run", "draw step", "training (min)", "process (min)", "held-out MLM loss", "held-out MLM acc",
                         "heads per layer"], rows,
        notes=f"{args.preset}, {args.steps} steps of 32 sequences (seq 128), 2 ranks, ZeRO-2, fp32, same seed. "
              f"EarlyBERT saves {100 * saving:.1f}% of dense training time (target >= 30%); held-out MLM loss "
              f"{100 * loss_gap:+.1f}% vs dense (target within 3%); beats random pruning: {results['beats_random']}. "
              f"Figures: bench/results/e2e/.")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

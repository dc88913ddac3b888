"""Shared benchmark plumbing: repeated timing with medians, whole jobs run side by side by
time-slicing, and results written as JSON + markdown."""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from data_prep.shards import atomic_write
from pipeline.rundir import RunDir

RESULTS = Path(__file__).resolve().parent / "results"


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


def write_results(name: str, results: dict, table_header: list[str], table_rows: list[list], notes: str = "") -> Path:
    """bench/results/NAME.json and NAME.md, each written atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), **results}
    md = [f"# {name}", "", f"Machine: {results['machine']}", ""]
    md += ["| " + " | ".join(table_header) + " |", "|" + "---|" * len(table_header)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in table_rows]
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
    jobs: dict[str, Callable[[], list[str] | None]], logs: Path, slice_s: float = 10.0, cwd: Path | None = None
) -> dict[str, SlicedJob]:
    """Run whole jobs side by side on a noisy machine: one job at a time runs for slice_s while the
    others are suspended (SIGSTOP/SIGCONT on each job's process group, so the launcher and all its
    ranks stop together), round-robin until all exit. A slow spell of the machine then falls on
    every job alike instead of on whichever ran during it; each job still has every core while it
    runs. A job starts once its callable returns a command (polled every round), so a baseline can
    wait for a value another job produces. Output goes to LOGS/NAME.log."""
    logs.mkdir(parents=True, exist_ok=True)
    pending, procs, result = dict(jobs), {}, {name: SlicedJob() for name in jobs}

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


def take_out_pauses(run_dir: Path, pauses: list[list[float]]) -> None:
    """Subtract the time each step spent suspended from its step time and rates; the raw records
    stay in metrics.wallclock.jsonl."""
    raw = RunDir(run_dir).metrics_file
    lines = raw.read_text().splitlines()
    shutil.copyfile(raw, run_dir / "metrics.wallclock.jsonl")  # before the rewrite below, which is atomic
    corrected = []
    for line in lines:
        r = json.loads(line)
        paused = paused_within(pauses, r["time"] - r["step_time_s"], r["time"])
        if paused > 0:
            active = r["step_time_s"] - paused
            for key in RATES:
                if key in r:
                    r[key] *= r["step_time_s"] / active
            r["step_time_s"] = active
            if "data_wait_s" in r:  # pre-training records
                r["data_wait_s"] = min(r["data_wait_s"], active)
        corrected.append(json.dumps(r))
    atomic_write(raw, lambda f: f.write(("\n".join(corrected) + "\n").encode()))


def kernel_docs_root(work: Path) -> Path:
    """The Linux kernel's Documentation directory from Debian's linux-doc package."""

    def newest(root: Path) -> Path | None:
        found = sorted(root.glob("usr/share/doc/linux-doc-*/Documentation"))
        return found[-1] if found else None

    root = newest(Path("/")) or newest(work / "linux-doc")
    if root:
        return root
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        depends = subprocess.run(
            ["apt-cache", "depends", "linux-doc"], capture_output=True, text=True, check=True
        ).stdout
        package = next(line.split(":", 1)[1].strip() for line in depends.splitlines() if "Depends:" in line)
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
        deb = next(debs.glob(f"{package}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "linux-doc")], check=True)
    except (OSError, subprocess.CalledProcessError, StopIteration) as err:
        raise SystemExit(
            f"kernel-docs corpus: cannot get Debian's linux-doc package ({err!r}). Install it "
            f"(apt-get install linux-doc) or run with --corpus python-docs."
        ) from err
    root = newest(work / "linux-doc")
    if root is None:
        raise SystemExit(f"kernel-docs corpus: {deb} holds no usr/share/doc/linux-doc-*/Documentation")
    return root

"""Shared benchmark plumbing: repeated timing with medians, and results written as JSON + markdown."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from data_prep.shards import atomic_write

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

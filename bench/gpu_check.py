"""`make gpu-check`: what only a GPU can show, in one command of at most 10 minutes on one GPU.

    1. prep       `earlybert prep` of a small corpus of text already on the machine, a tokenizer, seq-128 shards
    2. pre-train  per precision (bf16, fp16; side by side on the GPU): an EarlyBERT run through the deepspeed
                  launcher (launch/deepspeed.sh): search, draw (natural or forced), prune, rebuild; the same run
                  killed hard just after the draw (os._exit(9), tests/runs.py's faulty_train) and relaunched: it
                  must resume to the same ticket and the same losses as the uninterrupted run
    3. fine-tune  EarlyBERT fine-tuning (bf16) of the pre-trained export on a task made from the corpus; its
                  export reloaded by transformers alone (Auto classes, remote code), no project code imported
    4. bench      bench_gpu's core cases: bert-large seq 128 dense and pruned, bf16, through the DeepSpeed engine
                  (tokens/s, MFU, peak memory, the rebuild's time)

It writes bench/results/gpu-check-<device>.json and .md, naming the device: each step's outcome, the targets
(bert-large bf16 seq 128 dense MFU >= 50%, pruned step >= 90% of its FLOPs ratio, rebuild <= 10 dense steps) met or
missed. Exit status 0 when every step passed (the targets are reported, not enforced), 1 otherwise.

    python -m bench.gpu_check              # on a GPU machine; without a CUDA GPU it says so and exits 0
    python -m bench.gpu_check --dry-run    # prints the plan's commands, runs nothing
    python -m bench.gpu_check --cpu-smoke  # the prep for real on the CPU (a small corpus), the plan's commands,
                                           # its configs loaded

It runs under the python that runs it: the project's venv, or a GPU image's python3 with torch, DeepSpeed and
transformers installed (the repository goes on PYTHONPATH; the deepspeed launcher is run as a module). The project's
modules are imported where they are used, so that a machine without a GPU has its answer after importing torch.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = {"bf16": "zero2_bf16.json", "fp16": "zero2_fp16.json"}
STEPS = 12  # the search settings of runs.EARLYBERT draw by step 6
KILL = ("pipeline.run.rundir:RunDir.write_ticket", "after")  # hard exit just after the draw is recorded
LOSS_KEYS = ("loss", "mlm_loss", "nsp_loss", "lr", "samples")
LOSS_TOL = 1e-6
TARGETS = {"dense_mfu": 0.50, "pruned_share_of_flops_ideal": 0.90, "rebuild_in_dense_steps": 10.0}
AT_MOST = {"rebuild_in_dense_steps"}  # the other targets are floors
BUDGET_S = 570  # the whole check, under the 10 minutes


@dataclass
class Work:
    """The check's files, under `root`, and the environment of its commands."""

    root: Path

    @property
    def shards(self) -> Path:
        return self.root / "seq128"

    @property
    def launcher(self) -> Path:
        return self.root / "deepspeed"

    @property
    def killed_script(self) -> Path:
        return self.root / f"exit_{KILL[1]}_{KILL[0].rpartition('.')[2]}.py"

    def env(self, project: bool = True) -> dict:
        """The repository on PYTHONPATH (before a GPU image's own entries, e.g. carried wheels); project=False:
        without it, so that only installed packages are seen."""
        path = [str(ROOT)] if project else []
        path += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(path),
            "PYTHONUNBUFFERED": "1",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions")),
            "DEEPSPEED": str(self.launcher),  # launch/deepspeed.sh runs it
            "NUM_GPUS": "1",
        }


def test_helpers():
    """tests/runs.py: the run tests' search settings (EARLYBERT), command line (train_cmd) and hard exit
    (faulty_train)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import runs

    return runs


def prep_commands(work: Work, corpus_mb: int) -> list[list[str]]:
    from bench.bench_train import prep_commands

    return prep_commands(work.root, corpus_mb)


def write_scripts(work: Work) -> None:
    """The deepspeed launcher as a module of this python (a GPU image's DeepSpeed may come without its script),
    and the run that exits hard just after the draw (tests/runs.py faulty_train)."""
    work.launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m deepspeed.launcher.runner "$@"\n')
    work.launcher.chmod(0o755)
    assert test_helpers().faulty_train(work.root, *KILL) == str(work.killed_script)


def pretrain_config(work: Work, precision: str) -> Path:
    path = work.root / f"pretrain-{precision}.yaml"
    config = {
        "run_dir": str(work.root / precision / "reference"),
        "seed": 1,
        "model": {"preset": "bert-small"},
        "deepspeed": str(ROOT / "ds_configs" / PRECISIONS[precision]),
        "phases": [{"shards": str(work.shards), "steps": STEPS}],
        "micro_batch_size": 32,
        "global_batch_size": 32,
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "checkpoint": {"interval": 4, "keep": 2},
        "log": {"interval": 4},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def pretrain_commands(work: Work, precision: str) -> dict[str, list[str]]:
    """The uninterrupted run, the run killed just after the draw, its relaunch: launch/deepspeed.sh, but for the
    killed run, which is faulty_train's script under the same launcher. Each precision has its own port."""
    config, runs, helpers = pretrain_config(work, precision), work.root / precision, test_helpers()
    port = str(29600 + list(PRECISIONS).index(precision))
    launch = ["env", f"MASTER_PORT={port}", "bash", str(ROOT / "launch/deepspeed.sh"), str(config)]
    search = helpers.EARLYBERT
    killed = helpers.train_cmd(config, runs / "killed", *search)
    return {
        "reference": [*launch, f"run_dir={runs / 'reference'}", *search],
        "killed": [str(work.launcher), "--num_gpus", "1", "--master_port", port, str(work.killed_script), *killed],
        "resumed": [*launch, f"run_dir={runs / 'killed'}", *search],
    }


def export_command(run: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "export", str(run), "--output", str(out)]


def finetune_config(work: Work, init_from: Path) -> Path:
    """EarlyBERT fine-tuning with the run tests' recipe (10 steps an epoch, a draw between steps 4 and 6), bf16."""
    path = work.root / "finetune.yaml"
    config = test_helpers().finetune_test_config(
        work.root / "finetune", work.root / "task", init_from, ROOT / "ds_configs" / "zero1_bf16.json"
    )
    path.write_text(yaml.safe_dump(config))
    return path


def task_files(work: Work) -> None:
    """A two-class task from the corpus, as the fine-tuning tests make theirs: is a line longer than the median
    (320 training rows, 80 validation rows)."""
    lines = [x.strip() for x in (work.root / "corpus.txt").read_text().splitlines() if len(x.split()) >= 4][:400]
    median = sorted(len(x.split()) for x in lines)[len(lines) // 2]
    rows = [{"sentence": x, "label": "long" if len(x.split()) > median else "short"} for x in lines]
    (work.root / "task").mkdir(exist_ok=True)
    for name, part in (("train.csv", rows[:320]), ("dev.csv", rows[320:])):
        with open(work.root / "task" / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["sentence", "label"])
            writer.writeheader()
            writer.writerows(part)


# Run without the repository on the path, from the check's directory: the export and transformers alone.
RELOAD = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
batch = tok(["a short line", "a much longer line of text that goes on for a while"], padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
print(json.dumps({"class": type(model).__name__, "labels": model.config.id2label, "logits": logits.tolist(),
                  "finite": bool(torch.isfinite(logits).all())}))
"""


def finetune_commands(work: Work) -> dict[str, list[str]]:
    pretrained, tuned = work.root / "exports" / "pretrained", work.root / "exports" / "finetuned"
    config = finetune_config(work, pretrained)
    launch = [str(work.launcher), "--num_gpus", "1", "--master_port", "29610"]
    return {
        "export pre-trained": export_command(work.root / "bf16" / "killed", pretrained),
        "fine-tune": [*launch, "--module", "pipeline.finetune", "--config", str(config)],
        "export fine-tuned": export_command(work.root / "finetune", tuned),
        "reload in transformers": [sys.executable, "-c", RELOAD, str(tuned)],
    }


def plan(work: Work, corpus_mb: int) -> dict[str, list[str]]:
    """Every command of the check by name, in order (the two precisions run side by side)."""
    commands = {f"prep {i + 1}": cmd for i, cmd in enumerate(prep_commands(work, corpus_mb))}
    for precision in PRECISIONS:
        commands.update({f"{precision} {k}": v for k, v in pretrain_commands(work, precision).items()})
    commands.update(finetune_commands(work))
    commands["bench"] = [sys.executable, "-m", "bench.bench_gpu", "--core"]  # run in this process
    return commands


def run(work: Work, name: str, cmd: list[str], deadline: float, project: bool = True) -> tuple[int, str]:
    """One command, from the check's directory, its output to WORK/NAME.log; (exit code, output)."""
    log = work.root / (re.sub(r"\W+", "-", name) + ".log")
    started = time.monotonic()
    try:
        done = subprocess.run(
            cmd,
            cwd=work.root,
            env=work.env(project),
            capture_output=True,
            text=True,
            timeout=max(1.0, deadline - started),
        )
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code, out = 124, f"stopped at the check's time budget\n{err.stdout or ''}{err.stderr or ''}"
    log.write_text(out if isinstance(out, str) else out.decode(errors="replace"))
    print(f"[gpu-check] {name}: exit {code} in {time.monotonic() - started:.0f} s ({log.name})", flush=True)
    return code, out


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def ticket(run_dir: Path) -> dict:
    path = run_dir / "ticket.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def check_pretraining(work: Work, precision: str, deadline: float) -> dict:
    codes, outputs = {}, {}
    for name, cmd in pretrain_commands(work, precision).items():
        codes[name], outputs[name] = run(work, f"{precision} {name}", cmd, deadline)
    runs = work.root / precision
    reference, resumed = metrics(runs / "reference"), metrics(runs / "killed")
    first, second = ticket(runs / "reference"), ticket(runs / "killed")
    diffs = [abs(g[k] - r[k]) for g, r in zip(resumed, reference) for k in LOSS_KEYS if k in r and k in g]
    mfus = sorted(m["mfu"] for m in reference if "mfu" in m)
    result = {
        "exit codes": codes,
        "resumed from a checkpoint": "resumed from" in outputs["resumed"],
        "draw": {k: first.get(k) for k in ("draw_step", "forced", "reason", "heads_per_layer", "ffn_per_layer")},
        "same ticket": bool(first) and first.get("mask_digest") == second.get("mask_digest"),
        "steps logged (reference, resumed)": [len(reference), len(resumed)],
        "max loss difference after resume": max(diffs, default=None),
        "median mfu": mfus[len(mfus) // 2] if mfus else None,
    }
    result["ok"] = (
        codes["reference"] == 0
        and codes["killed"] != 0
        and codes["resumed"] == 0
        and result["resumed from a checkpoint"]
        and result["same ticket"]
        and len(reference) == len(resumed) == STEPS
        and max(diffs, default=1.0) <= LOSS_TOL
    )
    return result


def prep(work: Work, corpus_mb: int, deadline: float) -> bool:
    """Corpus, tokenizer and shards (`earlybert prep`), then the fine-tuning task made from the corpus."""
    for i, cmd in enumerate(prep_commands(work, corpus_mb)):
        if run(work, f"prep {i + 1}", cmd, deadline)[0] != 0:
            return False
    task_files(work)
    return True


def check_finetuning(work: Work, deadline: float) -> dict:
    codes, reloaded = {}, None
    for name, cmd in finetune_commands(work).items():
        reload = name == "reload in transformers"
        codes[name], out = run(work, name, cmd, deadline, project=not reload)
        if codes[name] != 0:
            break
        if reload:
            reloaded = json.loads(out.strip().splitlines()[-1])
    drawn = bool(ticket(work.root / "finetune"))
    ok = len(codes) == 4 and all(c == 0 for c in codes.values()) and drawn and reloaded["finite"]
    return {"exit codes": codes, "drawn": drawn, "reloaded": reloaded, "ok": ok}


def check_bench() -> dict:
    """bench_gpu's core cases in this process, and the targets met or missed."""
    from bench import bench_gpu
    from pipeline.engine import distributed

    distributed.setup()  # a world of one
    rows, rebuilds = bench_gpu.run_cases(bench_gpu.cases(core=True), "cuda", dry_run=False, steps=10)
    pruned_vs_dense = bench_gpu.summary(rows, rebuilds)["128"]
    measured = {
        "dense_mfu": next(r for r in rows if not r["pruned"])["mfu"],
        "pruned_share_of_flops_ideal": pruned_vs_dense["speedup_share_of_flops_ideal"],
        "rebuild_in_dense_steps": pruned_vs_dense["rebuild_in_dense_steps"],
    }
    met = {k: v is not None and (v <= TARGETS[k] if k in AT_MOST else v >= TARGETS[k]) for k, v in measured.items()}
    return {"cases": rows, "pruned_vs_dense": pruned_vs_dense, "measured": measured, "met": met, "ok": True}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the plan's commands, run nothing")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="run the prep on the CPU, print the plan, load its configs"
    )
    parser.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "gpu-check", help="where its files go (emptied first)"
    )
    args = parser.parse_args(argv)
    import torch

    if not (args.dry_run or args.cpu_smoke or torch.cuda.is_available()):
        print("gpu-check: no CUDA GPU on this machine: nothing to check; run it on a GPU machine", flush=True)
        return 0
    work = Work(args.work.resolve())
    if not args.dry_run:  # an earlier check's runs would be resumed and its shards refused, not redone
        shutil.rmtree(work.root, ignore_errors=True)
    work.root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUDGET_S
    corpus_mb = 1 if args.cpu_smoke else 4
    if args.dry_run or args.cpu_smoke:
        if args.cpu_smoke and not prep(work, corpus_mb, deadline):
            return 1
        for name, cmd in plan(work, corpus_mb).items():
            print(f"{name}: {shlex.join(cmd)}")
        if args.cpu_smoke:  # the configs the plan wrote load as the commands will load them
            from pipeline.finetune.config import load_finetune_config
            from pipeline.pretrain.config import load_pretrain_config

            for precision in PRECISIONS:
                load_pretrain_config(str(pretrain_config(work, precision)), list(test_helpers().EARLYBERT))
            load_finetune_config(str(work.root / "finetune.yaml"))
            print("gpu-check --cpu-smoke: prep done, configs load")
        return 0

    write_scripts(work)
    steps = {"prep": {"ok": prep(work, corpus_mb, deadline)}}
    if steps["prep"]["ok"]:
        with ThreadPoolExecutor(len(PRECISIONS)) as pool:  # both precisions side by side on the GPU
            futures = {p: pool.submit(check_pretraining, work, p, deadline) for p in PRECISIONS}
            steps.update({f"pre-training {p}": f.result() for p, f in futures.items()})
        if steps["pre-training bf16"]["ok"]:
            steps["fine-tuning"] = check_finetuning(work, deadline)
    try:
        steps["bench"] = check_bench()
    except Exception as err:  # an out-of-memory or a failed build: said in the results, not a lost run
        steps["bench"] = {"error": f"{type(err).__name__}: {err}", "ok": False}
    ok = all(step["ok"] for step in steps.values()) and "fine-tuning" in steps
    device = torch.cuda.get_device_name()
    rows = [[name, "pass" if step["ok"] else "FAIL", ""] for name, step in steps.items()]
    for k, v in steps["bench"].get("measured", {}).items():
        rows.append(
            [
                f"{k} {'<=' if k in AT_MOST else '>='} {TARGETS[k]}",
                "n/a" if v is None else f"{v:.3f}",
                "met" if steps["bench"]["met"][k] else "missed",
            ]
        )
    from bench.common import write_results

    path = write_results(
        "gpu-check-" + re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-"),
        {"device": device, "ok": ok, "steps": steps},
        ["check", "result", "target"],
        rows,
        notes=f"`make gpu-check` (bench/gpu_check.py) on one {device}; every command's log is under {work.root}.",
    )
    print(path.read_text())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

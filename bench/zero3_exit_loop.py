"""Repeat a small ZeRO-3 two-rank run under the real deepspeed launcher and count the runs whose exit failed
(issue 21 item 3: a rank aborting at interpreter exit with "terminate called without an active exception").

    python bench/zero3_exit_loop.py --runs 30 [--stage 3] [--keep DIR]

Each run trains a tiny model 3 steps on 2 CPU ranks, destroys the engine in a function that returns (as
pipeline/train.py does), calls pipeline.distributed.teardown, and lets the interpreter finish normally. Every
rank prints the native threads still alive after teardown (gloo's `pt_gloo_runloop` / `gloo_tcp_loop` ones
are those of process groups that outlived destroy_process_group). Core dumps are allowed in the ranks: with
`echo /tmp/core.%p > /proc/sys/kernel/core_pattern`, an aborting rank leaves a core for
`gdb -batch -ex 'thread apply all bt' .venv/bin/python /tmp/core.PID`. The output of each failed run goes to
--keep. The abort was seen under load (a full test suite on 2 cores): run it with the machine busy.
"""

import argparse
import glob
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(stage: int) -> None:
    import deepspeed
    import torch

    from pipeline import distributed

    def train() -> None:  # the engine's last reference goes when this returns, as in pipeline/train.py
        ds = {
            "train_micro_batch_size_per_gpu": 4,
            "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
            "bf16": {"enabled": True},
        }
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        for _ in range(3):
            loss = engine(torch.randn(4, 32, dtype=torch.bfloat16)).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        engine.destroy()

    rank = distributed.setup().rank
    train()
    distributed.teardown(clean=True)
    threads = sorted(Path(p).read_text().strip() for p in glob.glob("/proc/self/task/*/comm"))
    print(f"rank {rank} threads after teardown: {' '.join(threads)}", flush=True)


def allow_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def run_once(stage: int, timeout: int) -> tuple[int, str]:
    from pipeline.distributed import free_port

    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    cmd += [__file__, "--worker", "--stage", str(stage)]
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": str(REPO),
        "PYTHONFAULTHANDLER": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
    }
    p = subprocess.run(
        cmd,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=allow_core_dumps,
    )
    return p.returncode, p.stdout + p.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run")
    parser.add_argument("--keep", type=Path, default=Path("/tmp/zero3_exit_loop"), help="failed runs' output")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.stage)
        return 0
    failed = 0
    for i in range(1, args.runs + 1):
        t0 = time.monotonic()
        code, out = run_once(args.stage, args.timeout)
        aborted = "terminate called" in out
        gloo_left = sum(line.count("pt_gloo_runloop") for line in out.splitlines() if "after teardown" in line)
        if code != 0 or aborted:
            failed += 1
            args.keep.mkdir(parents=True, exist_ok=True)
            (args.keep / f"run{i}.log").write_text(out)
        print(
            f"run {i}: exit {code}{' ABORT' if aborted else ''}, gloo worker threads left after teardown "
            f"(both ranks): {gloo_left}, {time.monotonic() - t0:.0f} s",
            flush=True,
        )
    print(f"ZeRO-{args.stage}: {failed} failed of {args.runs} runs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

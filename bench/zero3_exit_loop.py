"""Repeat a two-rank ZeRO run that ends like `earlybert train` and count the runs in which a rank aborted at exit
(issue 21 item 3: "terminate called without an active exception", SIGABRT, after the work was done).

    python -m bench.zero3_exit_loop --runs 40 [--stage 3] [--exit product|interpreter]

Each run is tests/workers/rebuild_check.py on 2 CPU ranks: a tiny gated BERT trained under ZeRO, masks drawn,
the engine rebuilt around the pruned model, trained on, destroyed, the process group left. `--exit product`
(the default) ends each rank through pipeline.engine.distributed.end_rank_process, as `earlybert train` and `finetune`
do; `--exit interpreter` lets the interpreter finalize, as they did before: then a gloo worker thread that
releases the final barrier's work (and the ZeRO-3 all-gathers it holds, whose tensors are Python objects) while
the interpreter finalizes aborts the rank. Failed runs' output goes to --keep; with
`echo /tmp/core.%p > /proc/sys/kernel/core_pattern`, an aborting rank leaves a core for
`gdb -batch -ex 'thread apply all bt' .venv/bin/python /tmp/core.PID`. The race widens under load: run it with
the machine busy (a test suite, or `--busy N` CPU-bound processes beside it).
"""

import argparse
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from pipeline.engine.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "rebuild_check.py"


def allow_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def run_once(stage: int, exit_mode: str, out: Path, timeout: int) -> tuple[list[int], str]:
    port, procs = free_port(), []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu",
            "PYTHONFAULTHANDLER": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
            "REBUILD_CHECK_EXIT": exit_mode,
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
        }
        cmd = [sys.executable, str(WORKER), str(stage), "bf16", str(out)]
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=allow_core_dumps,
            )
        )
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], "\n===== rank 1 =====\n".join(outputs)


def busy() -> None:
    while True:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--exit", dest="exit_mode", choices=("product", "interpreter"), default="product")
    parser.add_argument("--busy", type=int, default=0, help="CPU-bound processes running beside the ranks")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run")
    parser.add_argument("--keep", type=Path, default=Path("/tmp/zero3_exit_loop"), help="failed runs' output")
    args = parser.parse_args(argv)
    args.keep.mkdir(parents=True, exist_ok=True)
    burners = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.busy)]
    for b in burners:
        b.start()
    failed = 0
    try:
        for i in range(1, args.runs + 1):
            t0 = time.monotonic()
            codes, out = run_once(args.stage, args.exit_mode, args.keep / f"result{i}.json", args.timeout)
            aborted = "terminate called" in out
            if any(codes) or aborted:
                failed += 1
                (args.keep / f"run{i}.log").write_text(out)
            print(
                f"run {i}: exit codes {codes}{' ABORT' if aborted else ''}, {time.monotonic() - t0:.0f} s", flush=True
            )
    finally:
        for b in burners:
            b.terminate()
    print(f"ZeRO-{args.stage}, exit through the {args.exit_mode}: {failed} failed of {args.runs} runs")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

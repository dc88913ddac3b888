"""The shape of `earlybert train` and `earlybert finetune`, and the exit codes of every command.

run_config_stage   the command line, everything checked from files before any process group (--check
                   stops there), the process group, the run directory's lock, the run, a clean teardown;
                   each kind of failure its exit code
"""

import contextlib
import sys

from common.launchers import detect_launcher, launched_tasks
from pipeline.cli import config_parser

EXIT_CONFIG = 2  # a config, checkpoint or input that cannot work: nothing was trained
EXIT_FAULT = 1  # a fault stopped the run (a hung rank, a non-finite loss, a full disk): fix it and relaunch
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: checkpointed after SIGTERM/SIGUSR1; relaunch the same command to resume
EXIT_CTRL_C = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C ended: the latest checkpoint is intact


def run_config_stage(stage: str, argv: list[str] | None, prepare, run, errors: tuple, plan) -> int:
    """The shape of `earlybert train` and `earlybert finetune`. `prepare(args, world_size)` checks everything that
    can be checked from files before any process group exists, for the ranks the launcher started, so a bad
    config fails in seconds on every rank alike (`errors`: a message and EXIT_CONFIG), and returns (config, ...);
    `--check` prints `plan(prepared, world_size)` (lines) and stops there. Then the process group (its timeout:
    dist_timeout.long_s), rank 0 takes the run directory's lock (pipeline/run/runlock.py), `run(*prepared, dist)`, a
    clean teardown. A fault of the run (pipeline/engine/guards.py) exits with EXIT_FAULT."""
    import logging
    import os

    from pipeline.engine import distributed, guards
    from pipeline.run import runlock

    parser = config_parser(stage)
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if args.world_size is not None and (not args.check or args.world_size < 1):
        parser.error("--world-size N (N >= 1) goes with --check; a launch runs on the ranks its launcher starts")
    world_size = args.world_size or launched_world_size(os.environ)
    try:
        prepared = prepare(args, world_size)
    except errors as e:
        print(f"earlybert {stage}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        ranks = f"{world_size} rank{'s' if world_size > 1 else ''}"
        print(f"earlybert {stage} --config {args.config}: checked for {ranks}, a launch would start")
        print("\n".join(f"  {line}" for line in plan(prepared, world_size)))
        return 0
    cfg = prepared[0]
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    dist = distributed.setup(timeout=guards.init_timeout(cfg.dist_timeout.long_s))
    distributed.set_cpu_threads(dist)
    clean = False
    try:
        with _locked(cfg.run_files.path, stage, dist):
            code = run(*prepared, dist)
        clean = True
        return code
    except (*errors, runlock.LockError) as e:
        print(f"earlybert {stage} (rank {dist.rank}): {e}", file=sys.stderr)
        return EXIT_CONFIG
    except guards.RunFault as e:
        print(f"earlybert {stage} (rank {dist.rank}): {e}", file=sys.stderr)
        return EXIT_FAULT
    except KeyboardInterrupt:  # not a traceback through DeepSpeed: `latest` only ever names a complete checkpoint
        print(
            f"earlybert {stage} (rank {dist.rank}): interrupted (Ctrl-C); {cfg.run_files.checkpoints / 'latest'} "
            f"names the last complete checkpoint: relaunch the same command to resume",
            file=sys.stderr,
        )
        return EXIT_CTRL_C
    finally:
        distributed.teardown(clean)


def launched_world_size(env) -> int:
    """The ranks the launcher started, read from its environment before any process group exists (as
    pipeline/engine/distributed.py will find them): what `prepare` checks the batch split and the resume for."""
    return int(env["WORLD_SIZE"]) if detect_launcher(env) == "env" else launched_tasks(env)  # srun, mpirun or 1


@contextlib.contextmanager
def _locked(run_dir, stage: str, dist):
    """The run directory's lock (pipeline/run/runlock.py), held by rank 0; every rank learns whether it was taken."""
    import torch

    from pipeline.engine import distributed
    from pipeline.run import runlock

    refused, path = "", None
    if dist.is_main:
        try:
            path = runlock.acquire(run_dir, f"earlybert {stage}")
        except runlock.LockError as e:
            refused = str(e)
    if distributed.sum_over_ranks({"refused": torch.tensor(float(bool(refused)))}, dist)["refused"]:
        raise runlock.LockError(refused or f"{run_dir} is in use by another command (rank 0 says which)")
    try:
        yield
    finally:
        if path is not None:
            runlock.release(path)

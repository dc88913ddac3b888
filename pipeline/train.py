"""`python -m pipeline.train`: the entry point of `earlybert train` for launchers that run a module
(the deepspeed launcher's `--module`, srun, mpirun); the loop is pipeline/pretrain/loop.py."""

import sys

from pipeline.engine.distributed import end_rank_process
from pipeline.pretrain.loop import main

if __name__ == "__main__":
    sys.exit(end_rank_process(main()))

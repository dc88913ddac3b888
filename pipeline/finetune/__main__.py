"""`python -m pipeline.finetune`: the entry point of `earlybert finetune` for launchers that run a module;
the loop is pipeline/finetune/loop.py."""

import sys

from pipeline.engine.distributed import end_rank_process
from pipeline.finetune.loop import main

sys.exit(end_rank_process(main()))

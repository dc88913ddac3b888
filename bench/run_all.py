"""`make bench`: run every bench/bench_*.py in turn (each writes bench/results/NAME.json and .md), the long
ones in their quick form (the full runs: `python -m bench.bench_e2e`, `python -m bench.bench_finetune`,
`python -m bench.bench_modernbert`, see each module's docstring; their quick forms write bench/results/e2e_quick.*,
finetune_quick.* and modernbert_quick.*, leaving the full runs' results)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"bench_e2e": ["--quick"], "bench_finetune": ["--quick"], "bench_modernbert": ["--quick"]}
GPU_ONLY = {"bench_gpu"}  # refuses to run without CUDA (exit 2): left out on CPU machines


def main() -> int:
    import torch

    failed = []
    for script in sorted((ROOT / "bench").glob("bench_*.py")):
        if script.stem in GPU_ONLY and not torch.cuda.is_available():
            print(f"== bench.{script.stem}: skipped, no CUDA device", flush=True)
            continue
        module = f"bench.{script.stem}"
        print(f"== {module}", flush=True)
        if subprocess.call([sys.executable, "-m", module, *QUICK.get(script.stem, [])], cwd=ROOT) != 0:
            failed.append(module)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

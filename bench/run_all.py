"""`make bench`: run every bench/bench_*.py in turn (each writes bench/results/NAME.json and .md), the long
ones in their quick form (the full runs: `python -m bench.bench_finetune`, see each module's docstring)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"bench_finetune": ["--quick"]}


def main() -> int:
    failed = []
    for script in sorted((ROOT / "bench").glob("bench_*.py")):
        module = f"bench.{script.stem}"
        print(f"== {module}", flush=True)
        if subprocess.call([sys.executable, "-m", module, *QUICK.get(script.stem, [])], cwd=ROOT) != 0:
            failed.append(module)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

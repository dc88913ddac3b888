"""Progress of prep's long loops on stderr.

On a terminal: a tqdm bar. Elsewhere (srun, mpirun, nohup, a log file), where a redrawn bar is one
endless line and no output at all looks like a hung job: a line when the loop starts and ends and,
in between, at most one every EARLYBERT_PROGRESS_SECONDS (default 30) with the rate and the time left.
"""

import os
import sys
import time

from tqdm import tqdm

INTERVAL_ENV = "EARLYBERT_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def progress_bar(desc: str, total: int, unit: str, enabled: bool = True):
    """Counts up to `total` (bytes when unit is "B"); update(n), set_postfix(**fields) and `with`, as tqdm."""
    if enabled and not sys.stderr.isatty():
        return ProgressLines(desc, total, unit, float(os.environ.get(INTERVAL_ENV) or DEFAULT_INTERVAL))
    return tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc, disable=not enabled, smoothing=0.1)


class ProgressLines:
    """tqdm's update / set_postfix / context manager, written as lines for a log."""

    def __init__(self, desc: str, total: int, unit: str, interval: float):
        self.desc, self.total, self.unit, self.interval = desc, total, unit, interval
        self.n, self.postfix = 0, {}
        self.started = self.printed = time.monotonic()
        self._print(f"{self._amount(total)} to do")

    def update(self, n: int = 1):
        self.n += n
        now = time.monotonic()
        if now - self.printed < self.interval:
            return
        self.printed = now
        rate = self.n / max(now - self.started, 1e-9)
        left = tqdm.format_interval(max(self.total - self.n, 0) / rate) if rate else "?"
        percent = 100 * self.n / self.total if self.total else 100
        done = tqdm.format_sizeof(self.n, "B") if self.unit == "B" else f"{self.n:,}"
        self._print(f"{done}/{self._amount(self.total)} ({percent:.0f}%), {self._rate(rate)}, {left} left")

    def set_postfix(self, refresh: bool = True, **fields):
        self.postfix = fields

    def close(self):
        seconds = time.monotonic() - self.started
        self._print(
            f"{self._amount(self.n)} done in {tqdm.format_interval(seconds)}, {self._rate(self.n / max(seconds, 1e-9))}"
        )

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:  # a failed loop gets its error message, not a "done" line
            self.close()

    def _amount(self, n: int) -> str:
        return tqdm.format_sizeof(n, "B") if self.unit == "B" else f"{n:,} {self.unit}"

    def _rate(self, per_second: float) -> str:
        return (
            tqdm.format_sizeof(per_second, "B/s")
            if self.unit == "B"
            else f"{tqdm.format_sizeof(per_second)} {self.unit}/s"
        )

    def _print(self, text: str):
        fields = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {text}{fields}", file=sys.stderr, flush=True)

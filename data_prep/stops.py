"""How the commands of `earlybert prep` stop, and with which exit status (data_prep/cli.py maps them):

    2    bad input or usage (InputError, OutputError, PrepError): nothing was written
    1    a failure during the work (an OSError: a full disk, an I/O error)
    75   a requested stop (SIGTERM, as Slurm sends before preemption): what is done is kept; rerun to resume
    130  Ctrl-C (SIGINT to the process group, as a terminal sends it): the same as a kill; rerun to resume

A stop is an exception in the main process only. Worker processes (start_pool) ignore SIGINT and die of SIGTERM,
so that the main process, whatever it waits on, is the one that stops them: a worker that died of KeyboardInterrupt
with a task in hand left multiprocessing's pool waiting forever for that task's result.
"""

import signal
from contextlib import contextmanager

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_STOPPED = 75  # EX_TEMPFAIL, as `earlybert train` after SIGTERM
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended


class Failure(Exception):
    """A failure during the work (exit 1), as every rank of a prep reports it: an I/O error, a bug."""


class StopRequested(BaseException):
    """SIGTERM in the main process. A BaseException, as KeyboardInterrupt: no `except Exception` swallows it."""


def _raise_stop(signum, frame):
    raise StopRequested()


@contextmanager
def stop_on_sigterm():
    """SIGTERM raises StopRequested in this (main) thread while the block runs."""
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_pool(ctx, processes: int, initializer=None, initargs=()):
    """ctx.Pool(processes) whose workers leave SIGINT to this process and die of SIGTERM. Both signals stay blocked
    while the workers are forked and until each has set its own handlers: a SIGTERM in that window reached the
    Python handler a worker inherited (stop_on_sigterm's), which was replaced before it could run; the worker then
    survived Pool.terminate, and the join waited forever (seen: a zero-byte input, refused at once)."""
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        return ctx.Pool(processes, initializer=_start_worker, initargs=(initializer, initargs))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_worker(initializer, initargs):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if initializer is not None:
        initializer(*initargs)

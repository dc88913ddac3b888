"""Faults the training loops of `earlybert train` and `earlybert finetune` turn into a message and an exit.

collective timeouts   the process group waits `dist_timeout.long_s` at start-up, in checkpoints and in
                      the draw's rebuild (patient()), `dist_timeout.step_s` in the steps (steps()), long_s
                      again in a step that compiles (patient(compiling)); a collective that fails or times
                      out stops the rank with the step and the ranks that did not answer a roll call through
                      the rendezvous store. gloo raises the timeout in the waiting thread. NCCL does not: its
                      own watchdog thread aborts the process (SIGABRT) with no word of the step. So on NCCL a
                      watchdog of ours (watch()) runs beside the steps: a step that makes no progress within
                      the timeout in force gets the same roll call and message, then the process exits 1;
                      NCCL's own timeout is set NCCL_GRACE_S later, so that ours speaks first.
non-finite losses     fp16: DeepSpeed's loss scaler skips the step and counts it (skipped_steps);
                      bf16 and fp32: `nonfinite.action` stop (the last checkpoint stays the one to
                      resume from), or skip up to `nonfinite.max_skipped` steps that DeepSpeed did not
                      apply (RunState.nonfinite_skipped, logged as nonfinite_skipped)
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import threading
import time
from contextlib import contextmanager

import torch.distributed as dist

from pipeline.run.command import EXIT_FAULT  # the watchdog exits as any fault of the run

ROLL_CALL_S = 5.0  # how long a failed rank waits for the others to answer the roll call
NCCL_GRACE_S = ROLL_CALL_S + 30.0  # NCCL aborts this much after our watchdog's deadline: the roll call goes first
WATCH_EVERY_S = 1.0


class RunFault(RuntimeError):
    """A run stopped by a fault (a hung or dead rank, a non-finite loss, a full disk); relaunch to resume."""


_patient: datetime.timedelta | None = None  # the process group's timeout outside the steps
_now: datetime.timedelta | None = None  # the one in force (torch has no getter)


def init_timeout(long_s: float) -> datetime.timedelta:
    """The process group's timeout at start-up (pass it to distributed.setup)."""
    global _patient, _now
    _patient = _now = datetime.timedelta(seconds=long_s)
    return _patient


@contextmanager
def _timeout(value: datetime.timedelta | None):
    global _now
    if value is None or _now is None or not dist.is_initialized():
        yield
        return
    before, _now = _now, value
    _set_all(value)
    try:
        yield
    finally:
        _now = before
        _set_all(before)


def _set_all(value: datetime.timedelta) -> None:
    """Every process group: DeepSpeed reduces gradients in groups of its own, created with torch's default."""
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    if dist.get_backend() == "nccl":
        value += datetime.timedelta(seconds=NCCL_GRACE_S)
    for group in list(_world.pg_map):
        _set_pg_timeout(value, group)


def patient(when: bool = True):
    """Collectives that may legitimately wait long (a checkpoint, the draw's rebuild, a step that compiles: the
    first after a torch.compile or on new shapes, minutes on some ranks) get the start-up timeout, `when` true."""
    return _timeout(_patient if when else None)


@contextmanager
def steps(step_s: float, next_step, d):
    """The training loop: collectives time out after step_s; a failed collective becomes a RunFault naming the
    step (`next_step()`) and the ranks that did not answer."""
    try:
        nccl = dist.is_initialized() and dist.get_backend() == "nccl"
        with _timeout(datetime.timedelta(seconds=step_s)), watch(next_step, d, nccl):
            yield
    except RuntimeError as err:
        if isinstance(err, RunFault) or not (isinstance(err, dist.DistError) or "gloo" in str(err)):
            raise
        step = next_step()
        error = str(err).strip()[:300]
        raise RunFault(_fault(step, f"dist_timeout.step_s={step_s:g}", error, roll_call(step, d))) from None


def _fault(step: int, limit: str, error: str, missing: str) -> str:
    return (
        f"step {step}: a collective of the process group failed or waited more than {limit} s ({error}); "
        f"{missing}. Check that rank's log and host; relaunch the same command to resume from the latest checkpoint"
    )


@contextmanager
def watch(next_step, d, on: bool):
    """While `on`, a thread that stops this process (exit EXIT_FAULT) with the steps' diagnosis when neither the
    step (`next_step()`) nor the timeout in force (patient() entered or left) changed for longer than that
    timeout: a rank stuck in a NCCL collective cannot raise, and NCCL's watchdog would abort it wordlessly."""
    if not on:
        yield
        return
    done = threading.Event()
    thread = threading.Thread(target=_watch, args=(next_step, d, done), name="earlybert-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _watch(next_step, d, done: threading.Event) -> None:
    seen, since = None, time.monotonic()
    while not done.wait(WATCH_EVERY_S):
        now = (next_step(), _now)
        if now != seen:
            seen, since = now, time.monotonic()
        elif _now is not None and time.monotonic() - since > _now.total_seconds():
            step, limit = now[0], f"dist_timeout.{'long_s' if _now == _patient else 'step_s'}={_now.total_seconds():g}"
            waited = f"no progress for {time.monotonic() - since:.0f} s in a NCCL collective, which cannot raise"
            message = _fault(step, limit, waited, roll_call(step, d))
            print(f"earlybert (rank {d.rank}): {message}", file=sys.stderr, flush=True)
            os._exit(EXIT_FAULT)


def roll_call(step: int, d) -> str:
    """Which ranks are missing: every rank that failed posts its name in the rendezvous store, then looks
    for the others'."""
    from torch.distributed.distributed_c10d import _get_default_store

    key = f"earlybert/roll_call/{step}/"
    try:
        store = _get_default_store()
        store.set_timeout(datetime.timedelta(seconds=ROLL_CALL_S))
        store.set(f"{key}{d.rank}", "here")
        time.sleep(ROLL_CALL_S)
        missing = [r for r in range(d.world_size) if not store.check([f"{key}{r}"])]
    except RuntimeError:  # the store lives in rank 0's process
        return "the rendezvous store (in rank 0) does not answer: rank 0 is stopped, hung or dead"
    return (
        f"rank(s) {missing} did not reach it (stopped, hung or dead)"
        if missing
        else "every rank answered the roll call afterwards: a network fault or a rank slower than the timeout"
    )


def check_finite(loss_sum: float, applied: bool, nonfinite, fp16: bool, state) -> None:
    """After the step's all-reduce (the same on every rank): stop, or count a skipped step, on a NaN or inf
    loss. `applied`: DeepSpeed applied the update (it skips steps whose gradients are not finite under ZeRO
    1-3, not under ZeRO-0)."""
    if math.isfinite(loss_sum) or fp16:  # fp16: the loss scaler's business
        return
    step = state.step + 1
    if applied:
        raise RunFault(
            f"step {step}: the loss is {loss_sum} and DeepSpeed applied the update (it skips non-finite "
            f"gradients under ZeRO stages 1-3 only): stopping before the weights are saved; relaunch "
            f"resumes from the latest checkpoint, or lower optim.lr / enable gradient_clipping"
        )
    if nonfinite.action == "skip" and state.nonfinite_skipped < nonfinite.max_skipped:
        state.nonfinite_skipped += 1
        print(
            f"[earlybert] step {step}: the loss is {loss_sum}; the update was skipped "
            f"({state.nonfinite_skipped} of nonfinite.max_skipped={nonfinite.max_skipped})",
            flush=True,
        )
        return
    limit = f", after {state.nonfinite_skipped} skipped" if nonfinite.action == "skip" else ""
    raise RunFault(
        f"step {step}: the loss is {loss_sum}{limit}; stopping (nonfinite.action={nonfinite.action}): "
        f"the latest checkpoint is intact and a relaunch resumes from it; set nonfinite.action=skip "
        f"(nonfinite.max_skipped=N) to skip such steps, or lower optim.lr"
    )

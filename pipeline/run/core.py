"""The training core that pre-training (pipeline/pretrain/loop.py) and fine-tuning (pipeline/finetune/loop.py)
both run on. The loops keep only what differs: their data, their phases or stages, their evaluation.

    Run           the run being trained: config, ranks, run state, engine, search stage, metrics, stop request
    start_engine  the engine's weights from the checkpoint resumed (or a fresh dropout stream), ranks recorded
    train_to_end  the frame of a run: the step watchdog, its parts until done or a signal, then teardown
    synced_step   one optimizer step on every rank: the engine's step, its statistics summed over ranks in one
                  collective (the stop flag with them), the non-finite check, the counters
    step_record   the metrics.jsonl fields both loops log
    draw          prune to the ticket and rebuild the engine in place, then record the ticket
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from pipeline.config import TrainingConfig, zero_stage
from pipeline.earlybert.detector import Decision
from pipeline.earlybert.search import SearchStage
from pipeline.engine import distributed, guards
from pipeline.engine.deepspeed_engine import EngineSpec, prune_engine, read_gates, train_step
from pipeline.run import checkpoint
from pipeline.run.checkpoint import RunState
from pipeline.run.command import EXIT_INTERRUPTED
from pipeline.run.metrics import MetricsLog, optimizer_stats
from pipeline.run.resume import Start, resumes_on_other_ranks

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


@dataclass
class Run:
    """What a training loop works on. The draw replaces the engine in place: the run holds the only
    reference to it, so the dense engine is freed before the pruned one is built."""

    command: str  # "train" or "finetune": the prefix of the run's messages
    cfg: TrainingConfig
    dist: distributed.DistInfo
    state: RunState
    search: SearchStage
    spec: EngineSpec  # what the current engine is built with; the draw builds the pruned one with it too
    stop: distributed.StopRequest
    engine: DeepSpeedEngine | None = None  # None only while a rebuild is under way (or failed)
    log: MetricsLog | None = None

    def say(self, msg: str) -> None:
        say(self.dist, self.command, msg)

    def save(self) -> None:
        self.say(f"checkpoint {checkpoint.save_run(self)}")


def say(dist: distributed.DistInfo, command: str, msg: str) -> None:
    if dist.is_main:
        print(f"[earlybert {command}] {msg}", flush=True)


def prepare_universal(cfg: TrainingConfig, start: Start, dist: distributed.DistInfo, command: str) -> bool:
    """True when the checkpoint resumed was written by another number of ranks: it is converted to DeepSpeed's
    universal checkpoint first (ZeRO 1 and 2; resumes_on_other_ranks refuses ZeRO-3)."""
    universal = resumes_on_other_ranks(cfg, start, dist.world_size)
    if universal:
        say(
            dist,
            command,
            f"resuming the {start.state.world_size}-rank checkpoint {start.tag} on {dist.world_size} ranks "
            f"(DeepSpeed universal checkpoint)",
        )
        checkpoint.make_universal(cfg.run_files.checkpoints, start.tag, dist)
    return universal


def start_engine(run: Run, start: Start, universal: bool) -> None:
    """The engine's weights, optimizer and LR schedule from the checkpoint resumed, with the search stage's
    state; or, on a fresh start, a dropout stream of the rank's own."""
    state, dist = run.state, run.dist
    if start.tag:
        checkpoints = run.cfg.run_files.checkpoints
        checkpoint.load(run.engine, checkpoints, start.tag, state, dist, universal)
        run.search.load_state_dict(state.search)
        run.say(f"resumed from {checkpoints / start.tag}: step {state.step}, {state.samples} samples")
    else:
        torch.manual_seed(run.cfg.seed + 1 + dist.rank)  # dropout: a different stream on each rank
    state.world_size, state.zero_stage = dist.world_size, zero_stage(run.spec.ds_config)


def open_metrics(run: Run, total_steps: int) -> MetricsLog:
    """RUN/metrics.jsonl and the monitors (TensorBoard, W&B, DeepSpeed's), from the run's current step."""
    return MetricsLog(
        run.cfg.run_files,
        run.cfg.log,
        total_steps=total_steps,
        start_step=run.state.step,
        config=run.cfg.to_dict(),
        monitor=run.engine.monitor,
        is_main=run.dist.is_main,
    )


def train_to_end(run: Run, parts_left: Callable[[], bool], train_part: Callable[[], bool]) -> int:
    """Train the run's parts (pre-training's phases, fine-tuning's stages) while `parts_left()`: each
    `train_part()` trains to its end (True) or stops at a signal, checkpointed (False: EXIT_INTERRUPTED). The
    collectives of every step are watched (dist_timeout.step_s); the metrics and the engine are closed
    whatever happens, the engine before the process group goes (ZeRO-3's hooks and buffers)."""
    try:
        with guards.steps(run.cfg.dist_timeout.step_s, lambda: run.state.step + 1, run.dist):
            while parts_left():
                if not train_part():
                    run.say(f"stopped by a signal at step {run.state.step}; relaunch the same command to resume")
                    return EXIT_INTERRUPTED
    finally:
        run.log.close()
        if run.engine is not None:  # None when a rebuild failed after freeing the dense engine
            run.engine.destroy()
    return 0


@dataclass
class Step:
    """One optimizer step as every rank saw it: the named statistics summed over ranks."""

    totals: dict[str, float]
    lr: float  # the step's learning rate
    seconds: float
    searching: bool  # the step carried the L1 penalty on the gates

    @property
    def stopping(self) -> bool:
        """A rank received SIGTERM/SIGUSR1: every rank checkpoints and stops after this step."""
        return self.totals["stop"] > 0


def synced_step(
    run: Run,
    micro_batches,
    stats_of: Callable,
    *,
    searching: bool,
    compiling: bool,
    **forward_options,
) -> Step:
    """One optimizer step over this rank's `micro_batches`; `stats_of(output)` names a micro-batch's sums
    ("loss": the loss backpropagated, "micro_batches", "gate_l1", "gate_penalty", and the loop's own), summed over ranks
    in the step's one collective of its own, with the stop flag; `forward_options` go to the model's forward. A
    non-finite loss stops or skips (nonfinite); the run state counts the step and its samples."""
    cfg, state, engine = run.cfg, run.state, run.engine
    t0, lr = time.perf_counter(), engine.lr_scheduler.get_last_lr()[0]
    lambdas = run.search.gate_lambdas() if searching else None
    skipped = engine.skipped_steps
    with guards.patient(compiling):  # a rank may compile for minutes while the others wait
        stats = train_step(engine, micro_batches, run.dist.device, stats_of, gate_lambdas=lambdas, **forward_options)
        stats["stop"] = torch.tensor(float(run.stop.signum != 0))
        totals = distributed.sum_over_ranks(stats, run.dist)
    guards.check_finite(totals["loss"], engine.skipped_steps == skipped, cfg.nonfinite, engine.fp16_enabled(), state)
    seconds = time.perf_counter() - t0
    state.step += 1
    state.samples += cfg.global_batch_size
    state.phase_samples += cfg.global_batch_size
    return Step(totals, lr, seconds, lambdas is not None)


def gate_stats(out) -> dict[str, torch.Tensor]:
    """The sums of a micro-batch's output that every step logs: the loss (the task's plus the gate penalty),
    micro-batches, gates."""
    zero = torch.zeros((), device=out.loss.device)
    return {
        "loss": out.loss,  # what the step backpropagates: its finiteness is checked (the gate penalty included)
        "micro_batches": zero + 1,
        "gate_l1": zero if out.gate_l1 is None else sum(out.gate_l1),
        "gate_penalty": zero if out.gate_penalty is None else out.gate_penalty,
    }


def step_record(run: Run, step: Step) -> dict:
    """The metrics.jsonl fields of a step that both loops log: averages over every rank's micro-batches,
    whole-job throughput. "loss" is the task loss, comparable between EarlyBERT and dense runs; the search
    stage's L1 term is "gate_penalty". "time" is the unix time at the step's end: it lines steps up with
    cluster logs, and lets a benchmark take out the time a scheduler held the job suspended."""
    totals, micro = step.totals, step.totals["micro_batches"]
    record = {
        "step": run.state.step,
        "loss": (totals["loss"] - totals["gate_penalty"]) / micro,
        "lr": step.lr,
        "samples": run.state.samples,
        "time": time.time(),
        "step_time_s": step.seconds,
        "seq_per_s": run.cfg.global_batch_size / step.seconds,
        **optimizer_stats(run.engine),
        "nonfinite_skipped": run.state.nonfinite_skipped,
    }
    if run.engine.module.config.use_gates:
        record["gate_l1"] = totals["gate_l1"] / micro
    if step.searching:
        record["gate_penalty"] = totals["gate_penalty"] / micro
    return record


def draw(run: Run, decision: Decision, seq_len: int, **rebuild) -> dict:
    """Prune to the ticket and rebuild the engine in place (every rank; `rebuild`: prune_engine's choices of
    what the ticket starts from), then record the ticket (RUN/ticket.json) and return its record."""
    before = run.engine.module.config
    t0 = time.perf_counter()
    with guards.patient():
        prune_engine(run, run.spec, decision.masks, fold_gates=run.cfg.earlybert.fold_gates, **rebuild)
    return run.search.record_draw(decision, before, run.engine.module.config, seq_len, time.perf_counter() - t0)


def search_decision(run: Run) -> Decision | None:
    """After the step just done: the ticket to draw now, the same on every rank, or None (every rank calls it:
    reading the gates, the broadcast and the mask check are collectives)."""
    if not run.search.due(run.state.step):
        return None
    heads, ffn = read_gates(run.engine.module)
    return run.search.decide(run.engine.module.config, run.state.step, heads, ffn)

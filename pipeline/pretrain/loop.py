"""`earlybert train --config FILE [key=value ...]`: DeepSpeed ZeRO pre-training, resumable to the sample.

    main        config, shards and the starting point (pipeline/run/resume.py), checked before any
                process group exists; then the process group (pipeline/engine/distributed.py)
    train       the engine (pipeline/engine/deepspeed_engine.py), the search stage (pipeline/earlybert/search.py), the phases; a fresh run
                from a Hugging Face checkpoint first warms up the pre-training heads it lacks
                (pretrained_model, pipeline/pretrain/head_warmup.py)
    run_phase   the loop: a step, its statistics summed over ranks, metrics, the search stage's
                decision, checkpoints
    draw        prune and rebuild the engine around the ticket, record it

One command for every launcher (plain python, the deepspeed launcher, srun, mpirun). Relaunching it
resumes from RUN/checkpoints/latest: the model is built with the saved structure, then DeepSpeed loads
weights, optimizer and LR schedule into it. SIGTERM/SIGUSR1 (Slurm time limit, preemption)
checkpoint and exit with EXIT_INTERRUPTED so job scripts can requeue.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from functools import partial

import torch

from data_prep import ShardDataset, ShardError
from pipeline.cli import EXIT_INTERRUPTED, run_config_stage
from pipeline.config import (
    ConfigError,
    RunConfig,
    batch_plan,
    check_resumed_batch,
    deepspeed_config,
    gather_problems,
    load_config,
    precision,
    zero_stage,
)
from pipeline.earlybert.detector import Decision
from pipeline.earlybert.search import SearchStage, read_random_like, warn_if_no_natural_draw
from pipeline.engine import distributed, guards
from pipeline.engine.deepspeed_engine import EngineSpec, build_engine, full_weights, prune_engine, train_step
from pipeline.model import EarlyBertForPreTraining, attention_kernels
from pipeline.pretrain import head_warmup
from pipeline.pretrain.loader import PhaseLoader
from pipeline.run import checkpoint
from pipeline.run.check import launch_plan, search_plan
from pipeline.run.checkpoint import CheckpointError, RunState
from pipeline.run.metrics import MetricsLog, device_peak_tflops, mfu, model_flops, optimizer_stats
from pipeline.run.resume import Start, check_batch_fits_data, find_start, open_phases, resumes_on_other_ranks

ERRORS = (ConfigError, CheckpointError, ShardError)


def main(argv: list[str] | None = None) -> int:
    return run_config_stage(
        "train", sys.argv[1:] if argv is None else argv, prepare, lambda prepared, d: train(*prepared, d), ERRORS, plan
    )


def prepare(args, world_size: int) -> tuple[RunConfig, list[ShardDataset], Start]:
    """The config, the shards and where the run starts, all checked from files for a launch on world_size ranks."""
    cfg = load_config(args.config, args.overrides)
    batches, datasets = gather_problems(ERRORS, lambda: batch_plan(cfg, world_size), lambda: open_data(cfg))
    check_batch_fits_data(batches.micro, datasets)
    start = find_start(cfg, datasets)
    if start.tag:
        check_resumed_batch(cfg, start.state, cfg.rundir.checkpoints / start.tag)
        resumes_on_other_ranks(cfg, start, world_size)  # refuses ZeRO-3 on other ranks
    read_random_like(cfg.earlybert, start.model_config)
    warn_if_no_natural_draw(
        cfg.earlybert, start.state.step, start.model_config, cfg.optim.warmup_steps, "earlybert train"
    )
    return cfg, datasets, start


def open_data(cfg: RunConfig) -> list[ShardDataset]:
    """The phases' shards (open_phases), naming every phase whose shards cannot be opened, not only the first."""
    try:
        return open_phases(cfg)
    except ShardError:
        gather_problems((ShardError,), *(partial(ShardDataset, p.shards) for p in cfg.phases))
        raise


def plan(prepared: tuple[RunConfig, list[ShardDataset], Start], world_size: int) -> list[str]:
    """What a launch on world_size ranks would do (`earlybert train --check`)."""
    cfg, datasets, start = prepared
    lines = [f"run_dir    {cfg.run_dir}"]
    for i, (phase, data) in enumerate(zip(cfg.phases, datasets)):
        epochs = phase.steps * cfg.global_batch_size / len(data)
        lines.append(
            f"phase {i}    {phase.steps} steps at seq {data.seq_len} from {data.directory} ({len(data)} sequences: "
            f"{epochs:,.2f} epochs)"
        )
    return lines + launch_plan(cfg, start, world_size) + [search_plan(cfg.earlybert, start.state, cfg.total_steps)]


@dataclass
class Run:
    """What the loop works on. The draw replaces the engine in place."""

    cfg: RunConfig
    dist: distributed.DistInfo
    state: RunState
    engine: object
    spec: EngineSpec  # every engine of the run, the pruned one included, is built with it
    search: SearchStage
    log: MetricsLog
    stop: distributed.StopRequest
    peak_tflops: float | None  # per device, for MFU

    def save(self) -> None:
        _say(self.dist, f"checkpoint {checkpoint.save_run(self)}")


def train(cfg: RunConfig, datasets: list[ShardDataset], start: Start, d: distributed.DistInfo) -> int:
    state, rundir = start.state, cfg.rundir
    if state.plan_step == cfg.total_steps:
        _say(d, f"{rundir.checkpoints / start.tag} is at step {state.step}: the run is complete")
        return 0
    if d.is_main:  # the resolved config of the latest launch, overrides included
        rundir.write_config(cfg.to_dict())
    universal = resumes_on_other_ranks(cfg, start, d.world_size)
    if universal:
        _say(
            d,
            f"resuming the {state.world_size}-rank checkpoint {start.tag} on {d.world_size} ranks "
            f"(DeepSpeed universal checkpoint)",
        )
        checkpoint.make_universal(rundir.checkpoints, start.tag, d)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank: ZeRO-3 partitions its own copy
    stop = distributed.StopRequest()
    if start.tag is None and cfg.model.init_from:
        model = pretrained_model(cfg, datasets[0], start, d, stop)
        if model is None:
            _say(d, "stopped by a signal during the head warm-up; relaunch the same command to resume")
            return EXIT_INTERRUPTED
    else:
        model = EarlyBertForPreTraining(start.model_config)
    model.train()  # from_pretrained returns a model in eval mode: dropout would be off
    ds_config = deepspeed_config(cfg, d.world_size, load_universal=universal)
    _say(d, batch_plan(cfg, d.world_size).describe())
    spec = EngineSpec(ds_config, cfg.optim, cfg.total_steps, compile=cfg.compile)
    engine = build_engine(model, spec)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(ds_config), torch.float32)
    _say(d, attention_kernels(model.config, d.device, dtype))
    search = SearchStage(cfg.earlybert, cfg.seed, rundir, d.is_main, start.model_config)
    if start.tag:
        checkpoint.load(engine, rundir.checkpoints, start.tag, state, d, universal)
        search.load_state_dict(state.search)
        _say(d, f"resumed from {rundir.checkpoints / start.tag}: step {state.step}, {state.samples} samples")
    else:
        torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout: a different stream on each rank
    state.world_size, state.zero_stage = d.world_size, zero_stage(ds_config)

    log = MetricsLog(
        rundir,
        cfg.log,
        total_steps=cfg.total_steps + state.rewound,
        start_step=state.step,
        config=cfg.to_dict(),
        monitor=engine.monitor,
        is_main=d.is_main,
    )
    run = Run(
        cfg,
        d,
        state,
        engine,
        spec,
        search,
        log,
        stop=stop,
        peak_tflops=cfg.log.peak_tflops or device_peak_tflops(d.device, precision(ds_config)),
    )
    del model, engine  # run.engine is the only reference: the draw frees the dense engine before building the next
    save_rewind_weights(run)
    try:
        with guards.steps(cfg.dist_timeout.step_s, lambda: state.step + 1, d):
            while state.phase < len(cfg.phases):
                if not run_phase(run, datasets[state.phase]):
                    _say(d, f"stopped by a signal at step {state.step}; relaunch the same command to resume")
                    return EXIT_INTERRUPTED
    finally:
        run.log.close()
        if run.engine is not None:  # None when a rebuild failed after freeing the dense engine
            run.engine.destroy()  # ZeRO-3's hooks and buffers go before the process group does
    _say(d, f"done: {state.step} steps, {state.samples} samples")
    return 0


def pretrained_model(
    cfg: RunConfig, data: ShardDataset, start: Start, d: distributed.DistInfo, stop: distributed.StopRequest
) -> EarlyBertForPreTraining | None:
    """The model of `model.init_from`, the pre-training heads it lacks warmed up on the frozen encoder
    (pipeline/pretrain/head_warmup.py); None when a signal stopped the warm-up (its state saved)."""
    model, loading = EarlyBertForPreTraining.from_pretrained(
        cfg.model.init_from, config=start.model_config, output_loading_info=True
    )
    warmup = head_warmup.plan(cfg.model.head_warmup_steps, loading["missing_keys"])
    _say(d, head_warmup.describe(warmup, cfg.model.init_from))
    if warmup.steps and not head_warmup.run(model, warmup, cfg, data, d, stop):
        return None
    return model


def run_phase(run: Run, data: ShardDataset) -> bool:
    """Train the current phase to its end (True), or until a signal (False), checkpointing on the way."""
    cfg, state = run.cfg, run.state
    phase = state.phase
    phase_end = sum(p.steps for p in cfg.phases[: phase + 1])  # in plan steps (RunState.plan_step)
    global_batch = cfg.global_batch_size
    loader = phase_loader(run, data, phase_end)
    compiling = cfg.compile  # torch.compile compiles in a phase's first step (new shapes) and the first after the draw
    try:
        while state.plan_step < phase_end:
            t0, wait0, lr = time.perf_counter(), loader.wait_s, run.engine.lr_scheduler.get_last_lr()[0]
            # MLM (+ NSP where the shards have sentence pairs) + EarlyBERT's L1 penalty on the gates, once per
            # micro-batch; the model adds the penalty inside its forward, the only place where ZeRO-3 has the
            # gates whole. The vocabulary projection runs on the masked tokens only.
            lambdas, skipped = run.search.gate_lambdas(), run.engine.skipped_steps
            with guards.patient(compiling):  # a rank may compile for minutes while the others wait
                stats = train_step(
                    run.engine,
                    loader.next_step(),
                    run.dist.device,
                    pretraining_stats,
                    gate_lambdas=lambdas,
                    masked_logits_only=True,
                )
                stats["stop"] = torch.tensor(float(run.stop.signum != 0))
                totals = distributed.sum_over_ranks(stats, run.dist)  # the step's one collective of its own
            compiling = False
            guards.check_finite(
                totals["loss"], run.engine.skipped_steps == skipped, cfg.nonfinite, run.engine.fp16_enabled(), state
            )
            step_time = time.perf_counter() - t0
            state.step += 1
            state.samples += global_batch
            state.phase_samples += global_batch
            run.log.log(
                step_record(
                    run,
                    totals,
                    lambdas is not None,
                    phase=phase,
                    seq_len=data.seq_len,
                    lr=lr,
                    step_time=step_time,
                    data_wait=loader.wait_s - wait0,
                )
            )
            save_rewind_weights(run)
            decision = run.search.decide(run.engine.module, state.step)
            if decision is not None:
                with guards.patient():
                    draw(run, decision, data.seq_len)
                compiling = cfg.compile  # the rebuilt engine is compiled again
                if state.rewound:  # the phase is longer now: a stream for its new length, from where it was
                    loader.close()
                    loader = phase_loader(run, data, phase_end)
            if state.plan_step == phase_end:  # after the draw: a rewind on the phase's last step extends it
                state.phase, state.phase_samples = phase + 1, 0
            stopping = totals["stop"] > 0
            # A checkpoint right after the draw: a relaunch then starts from the pruned engine.
            if stopping or decision or state.step % cfg.checkpoint.interval == 0 or state.plan_step == cfg.total_steps:
                run.save()
            if stopping:
                return False
    finally:
        loader.close()
    return True


def phase_loader(run: Run, data: ShardDataset, phase_end: int) -> PhaseLoader:
    """The micro-batches of the current phase from the run's position in it to its end."""
    cfg, state = run.cfg, run.state
    batches = batch_plan(cfg, run.dist.world_size)
    return PhaseLoader(
        data,
        seed=cfg.seed,
        phase=state.phase,
        start_sample=state.phase_samples,
        steps=phase_end - state.plan_step,
        micro_batch_size=batches.micro,
        grad_accum=batches.accumulation,
        world_size=run.dist.world_size,
        rank=run.dist.rank,
        mask_prob=cfg.data.mask_prob,
        prefetch=cfg.data.prefetch,
        pin_memory=run.dist.device.type == "cuda",
    )


def save_rewind_weights(run: Run) -> None:
    """`after_draw: rewind`: the full weights of `rewind_step`, kept for the draw (a collective)."""
    eb = run.cfg.earlybert
    if run.search.searching and eb.after_draw == "rewind" and run.state.step == eb.rewind_step:
        weights = full_weights(run.engine)
        if run.dist.is_main:
            run.cfg.rundir.save_start_weights(weights, eb.rewind_step)


def pretraining_stats(out) -> dict[str, torch.Tensor]:
    """The named sums a pre-training step logs, from one micro-batch's output."""
    zero = torch.zeros((), device=out.loss.device)
    return {
        "loss": out.loss,
        "mlm_loss": out.mlm_loss,
        "mlm_correct": out.mlm_correct,
        "mlm_masked": out.mlm_count,
        "tokens": out.token_count,  # real tokens and their query-key pairs: the step's model FLOPs
        "token_pairs": out.token_pairs,
        "micro_batches": zero + 1,
        "nsp_loss": zero if out.nsp_loss is None else out.nsp_loss,
        "gate_l1": zero if out.gate_l1 is None else sum(out.gate_l1),
        "gate_penalty": zero if out.gate_penalty is None else out.gate_penalty,
    }


def draw(run: Run, decision: Decision, seq_len: int) -> None:
    """Prune to the ticket and rebuild the engine in place (every rank), then record the ticket. A rewind
    prunes the weights of rewind_step instead, and puts the LR schedule and the phases back to that step."""
    eb, d, state = run.cfg.earlybert, run.dist, run.state
    _say(d, f"ticket drawn at step {decision.step}: {decision.reason}")
    before = run.engine.module.config
    rewind = eb.after_draw == "rewind"
    t0 = time.perf_counter()
    prune_engine(  # replaces run.engine; the run holds the only reference to the dense engine
        run,
        run.spec,
        decision.masks,
        fold_gates=eb.fold_gates,
        carry_moments=eb.optimizer_after_draw == "carry" and not rewind,
        start_weights=run.cfg.rundir.load_start_weights(eb.rewind_step) if rewind else None,
        schedule_step=eb.rewind_step if rewind else None,
    )
    record = run.search.record_draw(decision, before, run.engine.module.config, seq_len, time.perf_counter() - t0)
    _say(
        d,
        f"pruned to heads {record['heads_per_layer']}, FFN {record['ffn_per_layer']}: "
        f"{record['params_before'] / 1e6:.2f}M -> {record['params_after'] / 1e6:.2f}M parameters, "
        f"engine rebuilt in {record['rebuild_s']:.1f} s; {run.cfg.rundir.ticket_file.name} written",
    )
    if rewind:
        state.rewound = state.step - eb.rewind_step
        run.log.total = run.cfg.total_steps + state.rewound
        _say(
            d,
            f"rewound to the weights and LR schedule of step {eb.rewind_step}: the ticket trains the "
            f"{run.cfg.total_steps - eb.rewind_step} steps from there, the run ends at step {run.log.total}",
        )


def step_record(
    run: Run,
    s: dict[str, float],
    searching: bool,
    *,
    phase: int,
    seq_len: int,
    lr: float,
    step_time: float,
    data_wait: float,
) -> dict:
    """One metrics.jsonl line: global averages over every rank's micro-batches, whole-job throughput.
    "time" is the unix time at the step's end: it lines steps up with cluster logs, and lets a
    benchmark take out the time a scheduler held the job suspended."""
    config, micro = run.engine.module.config, s["micro_batches"]
    seq_per_s = run.cfg.global_batch_size / step_time
    flops = model_flops(config, s["tokens"], s["token_pairs"], s["mlm_masked"])  # real tokens only, as the benches
    # "loss" is the task loss (MLM + NSP), comparable between EarlyBERT and dense runs; the search
    # stage's L1 term is "gate_penalty".
    r = {
        "step": run.state.step,
        "phase": phase,
        "seq_len": seq_len,
        "loss": (s["loss"] - s["gate_penalty"]) / micro,
        "mlm_loss": s["mlm_loss"] / micro,
        "mlm_acc": s["mlm_correct"] / max(s["mlm_masked"], 1.0),
        "lr": lr,
        "samples": run.state.samples,
        "time": time.time(),
        "step_time_s": step_time,
        "data_wait_s": data_wait,
        "seq_per_s": seq_per_s,
        "tokens_per_s": s["tokens"] / step_time,  # real tokens
        "tflops": flops / step_time / 1e12,
        **optimizer_stats(run.engine),
        "nonfinite_skipped": run.state.nonfinite_skipped,
    }
    if config.use_nsp:
        r["nsp_loss"] = s["nsp_loss"] / micro
    if config.use_gates:
        r["gate_l1"] = s["gate_l1"] / micro
    if searching:
        r["gate_penalty"] = s["gate_penalty"] / micro
    if run.peak_tflops:
        r["mfu"] = mfu(flops, step_time, run.peak_tflops, run.dist.world_size)
    return r


def _say(d: distributed.DistInfo, msg: str) -> None:
    if d.is_main:
        print(f"[earlybert train] {msg}", flush=True)


if __name__ == "__main__":
    sys.exit(distributed.end_rank_process(main()))

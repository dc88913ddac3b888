"""`earlybert train --config FILE [key=value ...]`: DeepSpeed ZeRO pre-training, resumable to the sample.

    main        config, shards and the starting point (pipeline/run/resume.py), checked before any
                process group exists (pipeline/run/command.py); then the process group
    train       the model, its engine and the search stage, the phases (pipeline/run/core.py: the training
                core both loops share); a fresh run from a Hugging Face checkpoint first warms up the
                pre-training heads it lacks (pretrained_model, pipeline/pretrain/head_warmup.py)
    run_phase   the loop: a step on every rank, metrics, the search stage's decision, checkpoints
    draw        prune and rebuild the engine around the ticket (a rewind goes back to earlier weights)

One command for every launcher (plain python, the deepspeed launcher, srun, mpirun). Relaunching it
resumes from RUN/checkpoints/latest: the model is built with the saved structure, then DeepSpeed loads
weights, optimizer and LR schedule into it. SIGTERM/SIGUSR1 (Slurm time limit, preemption)
checkpoint and exit with EXIT_INTERRUPTED so job scripts can requeue.
"""

from __future__ import annotations

import sys
from functools import partial

import torch

from data_prep import ShardDataset, ShardError
from pipeline.config import ConfigError, batch_plan, check_resumed_batch, deepspeed_config, gather_problems, precision
from pipeline.earlybert.detector import Decision
from pipeline.earlybert.search import SearchStage, read_random_like, warn_if_no_natural_draw
from pipeline.engine import distributed
from pipeline.engine.deepspeed_engine import EngineSpec, build_engine, full_weights
from pipeline.families import family_of
from pipeline.model import attention_kernels
from pipeline.pretrain import head_warmup
from pipeline.pretrain.config import PretrainConfig, load_pretrain_config
from pipeline.pretrain.loader import PhaseLoader
from pipeline.pretrain.start import check_batch_fits_data, find_start, open_phases
from pipeline.run import core
from pipeline.run.check import launch_plan, search_plan
from pipeline.run.checkpoint import CheckpointError
from pipeline.run.command import EXIT_INTERRUPTED, run_config_stage
from pipeline.run.metrics import device_peak_tflops, mfu, model_flops
from pipeline.run.resume import Start, resumes_on_other_ranks

ERRORS = (ConfigError, CheckpointError, ShardError)


def main(argv: list[str] | None = None) -> int:
    return run_config_stage("train", argv, prepare, train, ERRORS, plan)


def prepare(args, world_size: int) -> tuple[PretrainConfig, list[ShardDataset], Start]:
    """The config, the shards and where the run starts, all checked from files for a launch on world_size ranks."""
    cfg = load_pretrain_config(args.config, args.overrides)
    batches, datasets = gather_problems(ERRORS, lambda: batch_plan(cfg, world_size), lambda: open_data(cfg))
    check_batch_fits_data(batches.micro, datasets)
    start = find_start(cfg, datasets)
    if start.tag:
        check_resumed_batch(cfg, start.state, cfg.run_files.checkpoints / start.tag)
        resumes_on_other_ranks(cfg, start, world_size)  # refuses ZeRO-3 on other ranks
    read_random_like(cfg.earlybert, start.model_config)
    warn_if_no_natural_draw(
        cfg.earlybert, start.state.step, start.model_config, cfg.optim.warmup_steps, "earlybert train"
    )
    return cfg, datasets, start


def open_data(cfg: PretrainConfig) -> list[ShardDataset]:
    """The phases' shards (open_phases), naming every phase whose shards cannot be opened, not only the first."""
    try:
        return open_phases(cfg)
    except ShardError:
        gather_problems((ShardError,), *(partial(ShardDataset, p.shards) for p in cfg.phases))
        raise


def plan(prepared: tuple[PretrainConfig, list[ShardDataset], Start], world_size: int) -> list[str]:
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


def train(cfg: PretrainConfig, datasets: list[ShardDataset], start: Start, dist: distributed.DistInfo) -> int:
    state, run_files = start.state, cfg.run_files
    if state.plan_step == cfg.total_steps:
        core.say(dist, "train", f"{run_files.checkpoints / start.tag} is at step {state.step}: the run is complete")
        return 0
    if dist.is_main:  # the resolved config of the latest launch, overrides included
        run_files.write_config(cfg.to_dict())
    universal = core.prepare_universal(cfg, start, dist, "train")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank: ZeRO-3 partitions its own copy
    stop = distributed.StopRequest()
    family = family_of(start.model_config)
    if not family.nsp and any(d.has_nsp for d in datasets):
        note = "the shards' sentence pairs are read as text, their next-sentence labels are not used"
        core.say(dist, "train", f"{family.name} trains MLM only: {note}")
    if start.tag is None and cfg.model.init_from:
        model = pretrained_model(cfg, datasets[0], start, dist, stop)
        if model is None:
            core.say(dist, "train", "stopped by a signal during the head warm-up; relaunch the same command to resume")
            return EXIT_INTERRUPTED
    else:
        model = family.pretraining_class(start.model_config)
    model.train()  # from_pretrained returns a model in eval mode: dropout would be off
    ds_config = deepspeed_config(cfg, dist.world_size, load_universal=universal)
    core.say(dist, "train", batch_plan(cfg, dist.world_size).describe())
    run = core.Run(
        "train",
        cfg,
        dist,
        state,
        SearchStage(cfg.earlybert, cfg.seed, run_files, dist.is_main, start.model_config),
        EngineSpec(ds_config, cfg.optim, cfg.total_steps, compile=cfg.compile),
        stop,
    )
    run.engine = build_engine(model, run.spec)
    del model  # run.engine is the only reference: the draw frees the dense engine before building the next
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision(ds_config), torch.float32)
    run.say(attention_kernels(run.engine.module.config, dist.device, dtype))
    core.start_engine(run, start, universal)
    run.log = core.open_metrics(run, cfg.total_steps + state.rewound)
    peak_tflops = cfg.log.peak_tflops or device_peak_tflops(dist.device, precision(ds_config))
    save_rewind_weights(run)
    code = core.train_to_end(
        run, lambda: state.phase < len(cfg.phases), lambda: run_phase(run, datasets[state.phase], peak_tflops)
    )
    if code == 0:
        run.say(f"done: {state.step} steps, {state.samples} samples")
    return code


def pretrained_model(
    cfg: PretrainConfig, data: ShardDataset, start: Start, dist: distributed.DistInfo, stop: distributed.StopRequest
) -> torch.nn.Module | None:
    """The pre-training model of `model.init_from` (its family's), the pre-training heads it lacks warmed up on the
    frozen encoder (pipeline/pretrain/head_warmup.py); None when a signal stopped the warm-up (its state saved)."""
    model, loading = family_of(start.model_config).pretraining_class.from_pretrained(
        cfg.model.init_from, config=start.model_config, output_loading_info=True
    )
    warmup = head_warmup.plan(cfg.model.head_warmup_steps, loading["missing_keys"])
    core.say(dist, "train", head_warmup.describe(warmup, cfg.model.init_from))
    if warmup.steps and not head_warmup.run(model, warmup, cfg, data, dist, stop):
        return None
    return model


def run_phase(run: core.Run, data: ShardDataset, peak_tflops: float | None) -> bool:
    """Train the current phase to its end (True), or until a signal (False), checkpointing on the way."""
    cfg, state = run.cfg, run.state
    phase = state.phase
    phase_end = sum(p.steps for p in cfg.phases[: phase + 1])  # in plan steps (RunState.plan_step)
    loader = phase_loader(run, data, phase_end)
    compiling = cfg.compile  # torch.compile compiles in a phase's first step (new shapes) and the first after the draw
    try:
        while state.plan_step < phase_end:
            # MLM (BERT: + NSP where the shards have sentence pairs) + EarlyBERT's L1 penalty on the gates, once per
            # micro-batch; the model adds the penalty inside its forward, the only place where ZeRO-3 has the
            # gates whole. The vocabulary projection runs on the masked tokens only.
            wait0 = loader.wait_s
            step = core.synced_step(
                run,
                loader.next_step(),
                pretraining_stats,
                searching=run.search.searching,
                compiling=compiling,
                masked_logits_only=True,
            )
            compiling = False
            run.log.log(pretraining_record(run, step, phase, data.seq_len, loader.wait_s - wait0, peak_tflops))
            save_rewind_weights(run)
            decision = core.search_decision(run)
            if decision is not None:
                draw(run, decision, data.seq_len)
                compiling = cfg.compile  # the rebuilt engine is compiled again
                if state.rewound:  # the phase is longer now: a stream for its new length, from where it was
                    loader.close()
                    loader = phase_loader(run, data, phase_end)
            if state.plan_step == phase_end:  # after the draw: a rewind on the phase's last step extends it
                state.phase, state.phase_samples = phase + 1, 0
            # A checkpoint right after the draw: a relaunch then starts from the pruned engine.
            due = state.step % cfg.checkpoint.interval == 0 or state.plan_step == cfg.total_steps
            if step.stopping or decision or due:
                run.save()
            if step.stopping:
                return False
    finally:
        loader.close()
    return True


def phase_loader(run: core.Run, data: ShardDataset, phase_end: int) -> PhaseLoader:
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


def save_rewind_weights(run: core.Run) -> None:
    """`after_draw: rewind`: the full weights of `rewind_step`, kept for the draw (a collective)."""
    method = run.cfg.earlybert
    if run.search.searching and method.after_draw == "rewind" and run.state.step == method.rewind_step:
        weights = full_weights(run.engine)
        if run.dist.is_main:
            run.cfg.run_files.save_start_weights(weights, method.rewind_step)


def pretraining_stats(out) -> dict[str, torch.Tensor]:
    """The named sums a pre-training step logs, from one micro-batch's output."""
    zero = torch.zeros((), device=out.loss.device)
    stats = {
        **core.gate_stats(out),
        "mlm_loss": out.mlm_loss,
        "mlm_correct": out.mlm_correct,
        "mlm_masked": out.mlm_count,
        "tokens": out.token_count,  # real tokens and their query-key pairs: the step's model FLOPs
        "token_pairs": out.token_pairs,
        "nsp_loss": zero if out.nsp_loss is None else out.nsp_loss,
    }
    if out.get("window_pairs") is not None:  # ModernBERT: the pairs its sliding-window layers attend to
        stats["window_pairs"] = out.window_pairs
    return stats


def pretraining_record(
    run: core.Run, step: core.Step, phase: int, seq_len: int, data_wait: float, peak_tflops: float | None
) -> dict:
    """One metrics.jsonl line: the core's fields (pipeline/run/core.py core.step_record), then MLM, NSP and the
    model FLOPs of the real tokens, as the benchmarks count them."""
    totals, micro, config = step.totals, step.totals["micro_batches"], run.engine.module.config
    flops = model_flops(
        config, totals["tokens"], totals["token_pairs"], totals["mlm_masked"], totals.get("window_pairs")
    )
    record = {
        **core.step_record(run, step),
        "phase": phase,
        "seq_len": seq_len,
        "mlm_loss": totals["mlm_loss"] / micro,
        "mlm_acc": totals["mlm_correct"] / max(totals["mlm_masked"], 1.0),
        "data_wait_s": data_wait,
        "tokens_per_s": totals["tokens"] / step.seconds,  # real tokens
        "tflops": flops / step.seconds / 1e12,
    }
    if family_of(config).nsp and config.use_nsp:
        record["nsp_loss"] = totals["nsp_loss"] / micro
    if peak_tflops:
        record["mfu"] = mfu(flops, step.seconds, peak_tflops, run.dist.world_size)
    return record


def draw(run: core.Run, decision: Decision, seq_len: int) -> None:
    """Prune to the ticket and rebuild the engine in place (every rank), then record the ticket. A rewind
    prunes the weights of rewind_step instead, and puts the LR schedule and the phases back to that step."""
    method, state = run.cfg.earlybert, run.state
    run.say(f"ticket drawn at step {decision.step}: {decision.reason}")
    rewind = method.after_draw == "rewind"
    record = core.draw(
        run,
        decision,
        seq_len,
        carry_moments=method.optimizer_after_draw == "carry" and not rewind,
        start_weights=run.cfg.run_files.load_start_weights(method.rewind_step) if rewind else None,
        schedule_step=method.rewind_step if rewind else None,
    )
    run.say(
        f"pruned to heads {record['heads_per_layer']}, FFN {record['ffn_per_layer']}: "
        f"{record['params_before'] / 1e6:.2f}M -> {record['params_after'] / 1e6:.2f}M parameters, "
        f"engine rebuilt in {record['rebuild_s']:.1f} s; {run.cfg.run_files.ticket_file.name} written",
    )
    if rewind:
        state.rewound = state.step - method.rewind_step
        run.log.total = run.cfg.total_steps + state.rewound
        run.say(
            f"rewound to the weights and LR schedule of step {method.rewind_step}: the ticket trains the "
            f"{run.cfg.total_steps - method.rewind_step} steps from there, the run ends at step {run.log.total}",
        )


if __name__ == "__main__":
    sys.exit(distributed.end_rank_process(main()))

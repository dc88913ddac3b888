"""`earlybert train --config FILE [key=value ...]`: DeepSpeed ZeRO pre-training, resumable to the sample.

One command for every launcher (plain python, the deepspeed launcher, srun, mpirun; see
pipeline/distributed.py). Relaunching it resumes from RUN/checkpoints/latest: the run state and
architecture are read first, the model is built with the saved structure, then DeepSpeed loads
weights, optimizer and LR schedule into it. SIGTERM/SIGUSR1 (Slurm time limit, preemption)
checkpoint and exit with EXIT_INTERRUPTED so job scripts can requeue.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
import time
from functools import partial
from pathlib import Path

import torch
import yaml

from data_prep import ShardDataset, ShardError
from pipeline import EarlyBertConfig, EarlyBertForPreTraining, checkpoint, distributed
from pipeline.checkpoint import CheckpointError, RunState
from pipeline.config import (ConfigError, EarlyBertSection, OptimConfig, RunConfig, deepspeed_config, load_config,
                             precision, read_deepspeed, zero_stage)
from pipeline.loader import PhaseLoader
from pipeline.metrics import MetricsLog, device_peak_tflops
from pipeline.model import flops_per_sequence

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: checkpointed after SIGTERM/SIGUSR1; relaunch the same command to resume
EXIT_CONFIG = 2
# Fields that make a checkpoint belong to a model; the per-layer structure may legitimately change (pruning).
IDENTITY_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "head_size",
                   "max_position_embeddings", "type_vocab_size", "use_nsp", "hidden_act")
# Per-micro-batch sums all-reduced once per step: loss, mlm_loss, nsp_loss, correct, masked, micro-batches, stop.
LOSS, MLM, NSP, CORRECT, MASKED, MICRO, STOP = range(7)


# ---- model and engine -------------------------------------------------------------------------

def model_config_for(cfg: RunConfig, data: ShardDataset) -> EarlyBertConfig:
    """The architecture of a fresh run: a preset (vocabulary from the shards) or a HF checkpoint's."""
    overrides = {"use_gates": cfg.earlybert.use_gates, "use_nsp": data.has_nsp, **cfg.model.overrides}
    if cfg.model.init_from:
        return EarlyBertConfig.from_pretrained(cfg.model.init_from, **overrides)
    return EarlyBertConfig.from_preset(cfg.model.preset, vocab_size=data.vocab_size,
                                       pad_token_id=data.special_ids["pad"], **overrides)


def build_model(model_config: EarlyBertConfig, cfg: RunConfig, fresh: bool) -> EarlyBertForPreTraining:
    # Same seed on every rank: ZeRO-3 partitions each rank's own copy without a broadcast.
    torch.manual_seed(cfg.seed)
    if fresh and cfg.model.init_from:
        return EarlyBertForPreTraining.from_pretrained(cfg.model.init_from, config=model_config)
    return EarlyBertForPreTraining(model_config)


def lr_factor(optim: OptimConfig, total_steps: int, step: int) -> float:
    """Multiplier of the peak lr for the optimizer step that follows `step` completed steps. Unlike
    DeepSpeed's WarmupLR, the first step already trains (lr / warmup_steps, not 0)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    if optim.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Weight decay on matrices only: not on biases, LayerNorm, or gates (EarlyBERT: gates decay 0)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: EarlyBertForPreTraining, cfg: RunConfig, ds_config: dict):
    """(engine, optimizer, lr scheduler) for `model`. Call again with a pruned model after
    `engine.destroy()`; the scheduler continues from `scheduler.last_epoch` once restored."""
    import deepspeed

    _check_gates_unpartitioned(model, ds_config)
    schedule = partial(lr_factor, cfg.optim, cfg.total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine, optimizer, scheduler


def _check_gates_unpartitioned(model: EarlyBertForPreTraining, ds_config: dict) -> None:
    """The gate penalty reads the gates outside their modules' forward. ZeRO-3 would have partitioned
    them (an empty tensor on each rank: a silent zero penalty) unless they are below its persistence
    threshold, which keeps small parameters whole on every rank."""
    if zero_stage(ds_config) != 3 or not model.config.use_gates:
        return
    threshold = ds_config["zero_optimization"].get("stage3_param_persistence_threshold", 100_000)
    largest = max(g.numel() for g in model.head_gates() + model.ffn_gates())
    if largest > threshold:
        raise ConfigError(f"ZeRO-3 with gates needs zero_optimization.stage3_param_persistence_threshold >= "
                          f"{largest} (the widest gate vector), got {threshold}")


def compute_loss(engine, batch: dict, earlybert: EarlyBertSection) -> tuple[torch.Tensor, torch.Tensor]:
    """The training objective of one micro-batch, and its statistics (rows LOSS..MICRO).

    EarlyBERT's search stage adds the L1 norm of the gates, once per micro-batch."""
    out = engine(**batch)
    loss = out.loss
    if earlybert.use_gates:
        loss = loss + engine.module.gate_penalty(earlybert.lambda_heads, earlybert.lambda_ffn)
    zero = torch.zeros((), device=loss.device)
    stats = torch.stack([loss.detach().float(), out.mlm_loss.detach().float(),
                         (out.nsp_loss if out.nsp_loss is not None else zero).detach().float(),
                         out.mlm_correct.float(), out.mlm_count.float(), torch.ones((), device=loss.device),
                         zero])
    return loss, stats


def train_step(engine, micro_batches: list[dict], earlybert: EarlyBertSection, device: torch.device) -> torch.Tensor:
    """One optimizer step: DeepSpeed accumulates over the micro-batches and steps on the last one."""
    stats = torch.zeros(STOP + 1, device=device)
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss, s = compute_loss(engine, batch, earlybert)
        engine.backward(loss)
        engine.step()
        stats += s
    return stats


# ---- checks before anything is built ----------------------------------------------------------

def open_phases(cfg: RunConfig) -> list[ShardDataset]:
    datasets = [ShardDataset(p.shards) for p in cfg.phases]
    for i, d in enumerate(datasets[1:], 1):
        if d.tokenizer_hash != datasets[0].tokenizer_hash:
            raise ConfigError(f"phases.{i}.shards ({d.directory}) was prepared with another tokenizer than "
                              f"phases.0.shards ({datasets[0].directory}); prepare both with the same tokenizer.json")
    return datasets


def check_model_fits_data(model_config: EarlyBertConfig, datasets: list[ShardDataset]) -> None:
    d = datasets[0]
    if model_config.vocab_size < d.vocab_size:
        raise ConfigError(f"the model's vocabulary ({model_config.vocab_size}) is smaller than the shards' "
                          f"tokenizer ({d.vocab_size} ids, {d.directory})")
    longest = max(x.seq_len for x in datasets)
    if model_config.max_position_embeddings < longest:
        raise ConfigError(f"shards of seq_len {longest} need max_position_embeddings >= {longest}, "
                          f"the model has {model_config.max_position_embeddings}")


def check_resume(cfg: RunConfig, state: RunState, architecture: dict, datasets: list[ShardDataset], tag: str) -> None:
    """Refuse a checkpoint of another model or tokenizer, or a phase plan it does not fit."""
    where = cfg.checkpoint_dir / tag
    if state.tokenizer_hash != datasets[0].tokenizer_hash:
        raise ConfigError(f"{where} was trained on shards of another tokenizer (sha256 {state.tokenizer_hash[:12]}) "
                          f"than {datasets[0].directory} ({datasets[0].tokenizer_hash[:12]}); use the run's shards "
                          f"or a new run_dir")
    configured = model_config_for(cfg, datasets[0]).to_dict()
    diff = [f"{k}: checkpoint {architecture.get(k)!r}, config {configured.get(k)!r}"
            for k in IDENTITY_FIELDS if architecture.get(k) != configured.get(k)]
    if diff:
        raise ConfigError(f"{where} is a checkpoint of another model than the run config describes:\n  "
                          + "\n  ".join(diff) + "\nuse a new run_dir, or the model settings of that run")
    if state.step > cfg.total_steps:
        raise ConfigError(f"{where} is at step {state.step}, after the {cfg.total_steps} steps the phases plan")
    if state.phase != phase_at(cfg, state.step):
        raise ConfigError(f"{where} is in phase {state.phase} at step {state.step}, but the configured phases put "
                          f"step {state.step} in phase {phase_at(cfg, state.step)}; keep the earlier phases' steps")


def phase_at(cfg: RunConfig, step: int) -> int:
    """The phase the next step belongs to (len(phases) when done)."""
    end = 0
    for i, p in enumerate(cfg.phases):
        end += p.steps
        if step < end:
            return i
    return len(cfg.phases)


# ---- signals ----------------------------------------------------------------------------------

class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the loop agrees on it across ranks after each step, then saves."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


# ---- the loop ---------------------------------------------------------------------------------

def train(cfg: RunConfig, d: distributed.DistInfo) -> int:
    datasets = open_phases(cfg)
    if d.is_main:  # the resolved config of the latest launch, overrides included
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    ds_json = read_deepspeed(cfg)
    ckpt_dir = cfg.checkpoint_dir
    tag = checkpoint.latest_tag(ckpt_dir)
    if tag:
        state, architecture = checkpoint.read_tag(ckpt_dir, tag)
        check_resume(cfg, state, architecture, datasets, tag)
        model_config = EarlyBertConfig.from_dict(architecture)
    else:
        state = RunState(world_size=d.world_size, zero_stage=zero_stage(ds_json),
                         tokenizer_hash=datasets[0].tokenizer_hash)
        model_config = model_config_for(cfg, datasets[0])
    check_model_fits_data(model_config, datasets)
    if state.step == cfg.total_steps:
        _say(d, f"{ckpt_dir / tag} is at step {state.step} of {cfg.total_steps}: the run is complete")
        return 0

    universal = tag is not None and state.world_size != d.world_size
    if universal:
        if state.zero_stage == 3 or zero_stage(ds_json) == 3:
            raise ConfigError(f"{ckpt_dir / tag} was written by {state.world_size} ranks; resuming on {d.world_size} "
                              f"goes through DeepSpeed's universal checkpoint, supported here for ZeRO stages 1 "
                              f"and 2, not 3: relaunch on {state.world_size} ranks")
        _say(d, f"resuming {state.world_size}-rank checkpoint {tag} on {d.world_size} ranks (universal checkpoint)")
        checkpoint.make_universal(ckpt_dir, tag, d)

    model = build_model(model_config, cfg, fresh=tag is None)
    ds_config = deepspeed_config(cfg, d.world_size, load_universal=universal)
    engine, _, scheduler = build_engine(model, cfg, ds_config)
    if tag:
        checkpoint.load(engine, ckpt_dir, tag, state, d, universal)
        _say(d, f"resumed from {ckpt_dir / tag}: step {state.step}, {state.samples} samples")
    else:
        torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout: a different stream on each rank
    state.world_size, state.zero_stage = d.world_size, zero_stage(ds_config)
    if cfg.log.tensorboard and "tensorboard" not in ds_config:
        _say(d, "log.tensorboard: the tensorboard package is not installed; metrics go to metrics.jsonl only")
    if cfg.log.wandb and "wandb" not in ds_config:
        _say(d, "log.wandb: the wandb package is not installed; metrics go to metrics.jsonl only")

    stop = StopRequest()
    log = MetricsLog(cfg.run_dir, total_steps=cfg.total_steps, start_step=state.step, interval=cfg.log.interval,
                     monitor=engine.monitor, is_main=d.is_main)
    peak = cfg.log.peak_tflops or device_peak_tflops(d.device, precision(ds_config))
    grad_accum = ds_config["gradient_accumulation_steps"]
    try:
        while state.phase < len(cfg.phases):
            phase_idx = state.phase
            data = datasets[phase_idx]
            phase_end = sum(p.steps for p in cfg.phases[:phase_idx + 1])
            flops = flops_per_sequence(engine.module.config, data.seq_len)
            loader = PhaseLoader(data, seed=cfg.seed, phase=phase_idx, start_sample=state.phase_samples,
                                 steps=phase_end - state.step, micro_batch_size=cfg.micro_batch_size,
                                 grad_accum=grad_accum, world_size=d.world_size, rank=d.rank,
                                 mask_prob=cfg.data.mask_prob, prefetch=cfg.data.prefetch,
                                 pin_memory=d.device.type == "cuda")
            try:
                while state.step < phase_end:
                    t0, wait0, lr = time.perf_counter(), loader.wait_s, scheduler.get_last_lr()[0]
                    stats = train_step(engine, loader.next_step(), cfg.earlybert, d.device)
                    stats[STOP] = float(stop.signum != 0)
                    distributed.all_reduce_sum(stats)  # also the point where a step's time is settled
                    step_time = time.perf_counter() - t0
                    state.step += 1
                    state.samples += cfg.global_batch_size
                    state.phase_samples += cfg.global_batch_size
                    if state.step == phase_end:
                        state.phase, state.phase_samples = state.phase + 1, 0
                    log.log(_record(engine, state, stats, cfg, step_time, loader.wait_s - wait0, flops, peak,
                                    d.world_size, phase=phase_idx, seq_len=data.seq_len, lr=lr))
                    stopping = stats[STOP].item() > 0
                    if stopping or state.step % cfg.checkpoint.interval == 0 or state.step == cfg.total_steps:
                        saved = checkpoint.save(engine, ckpt_dir, state, engine.module.config.to_dict(), d,
                                                cfg.checkpoint.keep)
                        _say(d, f"checkpoint {ckpt_dir / saved}")
                    if stopping:
                        _say(d, f"stopped by a signal at step {state.step}; relaunch the same command to resume")
                        return EXIT_INTERRUPTED
            finally:
                loader.close()
    finally:
        log.close()
    _say(d, f"done: {state.step} steps, {state.samples} samples")
    return 0


def _record(engine, state: RunState, stats: torch.Tensor, cfg: RunConfig, step_time: float, data_wait: float,
            flops: float, peak: float | None, world: int, *, phase: int, seq_len: int, lr: float) -> dict:
    s = stats.tolist()
    micro = s[MICRO]
    seq_per_s = cfg.global_batch_size / step_time
    r = {"step": state.step, "phase": phase, "seq_len": seq_len, "loss": s[LOSS] / micro,
         "mlm_loss": s[MLM] / micro, "mlm_acc": s[CORRECT] / max(s[MASKED], 1.0), "lr": lr,
         "samples": state.samples, "step_time_s": step_time, "data_wait_s": data_wait,
         "seq_per_s": seq_per_s, "tokens_per_s": seq_per_s * seq_len, "tflops": flops * seq_per_s / 1e12}
    if engine.module.config.use_nsp:
        r["nsp_loss"] = s[NSP] / micro
    if engine.module.config.use_gates:
        with torch.no_grad():
            r["gate_l1"] = engine.module.gate_penalty(1.0, 1.0).item()
    if peak:
        r["mfu"] = r["tflops"] / (peak * world)
    return r


def _say(d: distributed.DistInfo, msg: str) -> None:
    if d.is_main:
        print(f"[earlybert train] {msg}", flush=True)


def _set_cpu_threads(d: distributed.DistInfo) -> None:
    """Split the CPU cores between the ranks of a host (each would otherwise use them all)."""
    if d.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    hosts = [None] * d.world_size
    torch.distributed.all_gather_object(hosts, socket.gethostname())
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // hosts.count(socket.gethostname())))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="earlybert train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: earlybert train --config launch/configs/tiny.yaml optim.lr=5e-4 "
                                       "phases.0.steps=200")
    p.add_argument("--config", required=True, help="YAML run config (see launch/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. checkpoint.interval=50")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"earlybert train: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    d = distributed.setup()
    _set_cpu_threads(d)
    clean = False
    try:
        code = train(cfg, d)
        clean = True
        return code
    except (ConfigError, CheckpointError, ShardError) as e:
        print(f"earlybert train (rank {d.rank}): {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        distributed.teardown(clean)


if __name__ == "__main__":
    sys.exit(main())

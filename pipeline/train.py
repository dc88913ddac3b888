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
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save

from data_prep import ShardDataset, ShardError
from data_prep.shards import atomic_write
from pipeline import EarlyBertConfig, EarlyBertForPreTraining, checkpoint, distributed
from pipeline.checkpoint import CheckpointError, RunState
from pipeline.config import (ConfigError, EarlyBertSection, OptimConfig, RunConfig, deepspeed_config, load_config,
                             precision, read_deepspeed, zero_stage)
from pipeline.loader import PhaseLoader
from pipeline.metrics import MetricsLog, device_peak_tflops
from pipeline.model import flops_per_sequence
from pipeline.rebuild import rebuild_engine, snapshot_engine
from pipeline.search import TICKET as RUN_TICKET, search_step, ticket_record, write_ticket

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: checkpointed after SIGTERM/SIGUSR1; relaunch the same command to resume
EXIT_CONFIG = 2
# Fields that make a checkpoint belong to a model; the per-layer structure may legitimately change (pruning).
IDENTITY_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "head_size",
                   "max_position_embeddings", "type_vocab_size", "use_nsp", "hidden_act")
# Per-micro-batch sums, all-reduced once per step (STOP: a rank got SIGTERM/SIGUSR1).
LOSS, MLM, CORRECT, MASKED, MICRO, STOP, NSP, GATE_L1, GATE_PENALTY = range(9)
# RunState.extra keys of the EarlyBERT stage, and the file of the starting weights (rewind).
DETECTOR_KEY, TICKET_KEY, START_WEIGHTS = "detector", "ticket", "start_weights.safetensors"


# ---- model and engine -------------------------------------------------------------------------

def model_config_for(cfg: RunConfig, data: ShardDataset) -> EarlyBertConfig:
    """The architecture of a fresh run: a preset (vocabulary from the shards) or a HF checkpoint's."""
    # BertConfig keeps unknown keyword arguments as attributes: a typo would be silently ignored.
    unknown = sorted(set(cfg.model.overrides) - set(EarlyBertConfig().to_dict()))
    if unknown:
        raise ConfigError(f"model.overrides: {', '.join(unknown)} are not EarlyBertConfig fields")
    fields = {"use_gates": cfg.earlybert.use_gates, "use_nsp": data.has_nsp, **cfg.model.overrides}
    try:
        if cfg.model.init_from:
            return EarlyBertConfig.from_pretrained(cfg.model.init_from, **fields)
        return EarlyBertConfig.from_preset(cfg.model.preset, **{"vocab_size": data.vocab_size,
                                                                "pad_token_id": data.special_ids["pad"], **fields})
    except (OSError, ValueError, TypeError) as e:  # unknown preset or field, unreadable checkpoint
        raise ConfigError(f"model: {e}") from e


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
    """(engine, optimizer, lr scheduler) for `model`. Call it again with a pruned model after
    `engine.destroy()`; restore the scheduler's position after."""
    import deepspeed

    schedule = partial(lr_factor, cfg.optim, cfg.total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine, optimizer, scheduler


def gate_lambdas(earlybert: EarlyBertSection, state: RunState) -> tuple[float, float] | None:
    """The L1 weights during the search stage; None for plain BERT and after the draw (gates, if
    kept, train on as free parameters)."""
    if not earlybert.use_gates or TICKET_KEY in state.extra:
        return None
    return earlybert.lambda_heads, earlybert.lambda_ffn


def compute_loss(engine, batch: dict, lambdas: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training objective of one micro-batch, and its statistics (rows LOSS..GATE_PENALTY).

    Objective: MLM (+ NSP where the shards have sentence pairs) + EarlyBERT's L1 penalty on the
    gates, once per micro-batch. The model adds the penalty inside its forward (gate_lambdas), the
    only place where ZeRO-3 has the gates whole."""
    out = engine(**batch, gate_lambdas=lambdas)
    zero = torch.zeros((), device=out.loss.device)
    optional = [out.nsp_loss, sum(out.gate_l1) if engine.module.config.use_gates else None, out.gate_penalty]
    stats = torch.stack([out.loss.detach(), out.mlm_loss.detach(), out.mlm_correct, out.mlm_count, zero + 1, zero]
                        + [zero if t is None else t.detach() for t in optional]).float()
    return out.loss, stats


def train_step(engine, micro_batches: list[dict], lambdas: tuple[float, float] | None, device: torch.device) -> torch.Tensor:
    """One optimizer step: DeepSpeed accumulates over the micro-batches and steps on the last one."""
    stats = torch.zeros(GATE_PENALTY + 1, device=device)
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss, s = compute_loss(engine, batch, lambdas)
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

@dataclass
class Run:
    """What the loop works on. A rebuild (pruning) replaces engine and scheduler in place."""

    cfg: RunConfig
    dist: distributed.DistInfo
    state: RunState
    engine: object
    scheduler: object
    ds_config: dict  # the engine's; a rebuild makes the pruned engine with the same one
    log: MetricsLog
    stop: StopRequest
    peak_tflops: float | None  # per device, for MFU

    def save(self) -> None:
        tag = checkpoint.save(self.engine, self.cfg.checkpoint_dir, self.state, self.engine.module.config.to_dict(),
                              self.dist, self.cfg.checkpoint.keep)
        _say(self.dist, f"checkpoint {self.cfg.checkpoint_dir / tag}")


@dataclass
class Start:
    tag: str | None  # checkpoint resumed from; None for a fresh run
    state: RunState
    model_config: EarlyBertConfig


def find_start(cfg: RunConfig, datasets: list[ShardDataset]) -> Start:
    """Where the run starts: RUN/checkpoints/latest, read (and checked against the config and the
    shards) before any model or process group exists; or step 0."""
    tag = checkpoint.latest_tag(cfg.checkpoint_dir)
    if tag is None:
        state = RunState(tokenizer_hash=datasets[0].tokenizer_hash)
        start = Start(None, state, model_config_for(cfg, datasets[0]))
    else:
        state, architecture = checkpoint.read_tag(cfg.checkpoint_dir, tag)
        check_resume(cfg, state, architecture, datasets, tag)
        start = Start(tag, state, EarlyBertConfig.from_dict(architecture))
    check_model_fits_data(start.model_config, datasets)
    return start


def train(cfg: RunConfig, datasets: list[ShardDataset], start: Start, d: distributed.DistInfo) -> int:
    state = start.state
    if state.step == cfg.total_steps:
        _say(d, f"{cfg.checkpoint_dir / start.tag} is at step {cfg.total_steps}: the run is complete")
        return 0
    if d.is_main:  # the resolved config of the latest launch, overrides included
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    universal = start.tag is not None and state.world_size != d.world_size
    if universal:
        if 3 in (state.zero_stage, zero_stage(read_deepspeed(cfg))):
            raise ConfigError(f"{cfg.checkpoint_dir / start.tag} was written by {state.world_size} ranks; resuming "
                              f"on {d.world_size} goes through DeepSpeed's universal checkpoint, supported here for "
                              f"ZeRO stages 1 and 2, not 3: relaunch on {state.world_size} ranks")
        _say(d, f"resuming the {state.world_size}-rank checkpoint {start.tag} on {d.world_size} ranks "
                f"(DeepSpeed universal checkpoint)")
        checkpoint.make_universal(cfg.checkpoint_dir, start.tag, d)

    model = build_model(start.model_config, cfg, fresh=start.tag is None)
    ds_config = deepspeed_config(cfg, d.world_size, load_universal=universal)
    engine, _, scheduler = build_engine(model, cfg, ds_config)
    if start.tag:
        checkpoint.load(engine, cfg.checkpoint_dir, start.tag, state, d, universal)
        _say(d, f"resumed from {cfg.checkpoint_dir / start.tag}: step {state.step}, {state.samples} samples")
    else:
        torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout: a different stream on each rank
    state.world_size, state.zero_stage = d.world_size, zero_stage(ds_config)
    for name in ("tensorboard", "wandb"):
        if getattr(cfg.log, name) and name not in ds_config:
            _say(d, f"log.{name}: the {name} package is not installed; metrics go to metrics.jsonl only")

    if start.tag is None and cfg.earlybert.use_gates and cfg.earlybert.after_draw == "rewind":
        save_start_weights(engine, Path(cfg.run_dir), d)
    run = Run(cfg, d, state, engine, scheduler, ds_config, stop=StopRequest(),
              log=MetricsLog(cfg.run_dir, total_steps=cfg.total_steps, start_step=state.step,
                             interval=cfg.log.interval, monitor=engine.monitor, is_main=d.is_main),
              peak_tflops=cfg.log.peak_tflops or device_peak_tflops(d.device, precision(ds_config)))
    try:
        while state.phase < len(cfg.phases):
            if not run_phase(run, datasets[state.phase]):
                _say(d, f"stopped by a signal at step {state.step}; relaunch the same command to resume")
                return EXIT_INTERRUPTED
    finally:
        run.log.close()
        run.engine.destroy()  # ZeRO-3's hooks and buffers go before the process group does
    _say(d, f"done: {state.step} steps, {state.samples} samples")
    return 0


def run_phase(run: Run, data: ShardDataset) -> bool:
    """Train the current phase to its end (True), or until a signal (False), checkpointing on the way."""
    cfg, state = run.cfg, run.state
    phase = state.phase
    phase_end = sum(p.steps for p in cfg.phases[:phase + 1])
    global_batch = cfg.global_batch_size
    loader = PhaseLoader(data, seed=cfg.seed, phase=phase, start_sample=state.phase_samples,
                         steps=phase_end - state.step, micro_batch_size=cfg.micro_batch_size,
                         grad_accum=global_batch // (cfg.micro_batch_size * run.dist.world_size),
                         world_size=run.dist.world_size, rank=run.dist.rank, mask_prob=cfg.data.mask_prob,
                         prefetch=cfg.data.prefetch, pin_memory=run.dist.device.type == "cuda")
    try:
        while state.step < phase_end:
            t0, wait0, lr = time.perf_counter(), loader.wait_s, run.scheduler.get_last_lr()[0]
            stats = train_step(run.engine, loader.next_step(), gate_lambdas(cfg.earlybert, state), run.dist.device)
            stats[STOP] = float(run.stop.signum != 0)
            distributed.all_reduce_sum(stats)  # the step's one collective of its own
            totals = stats.tolist()  # waits for the device: the step's time is settled here
            step_time = time.perf_counter() - t0
            state.step += 1
            state.samples += global_batch
            state.phase_samples += global_batch
            if state.step == phase_end:
                state.phase, state.phase_samples = phase + 1, 0
            run.log.log(step_record(run, totals, phase=phase, seq_len=data.seq_len, lr=lr, step_time=step_time,
                                    data_wait=loader.wait_s - wait0))
            drawn = cfg.earlybert.use_gates and TICKET_KEY not in state.extra and search(run, data.seq_len)
            stopping = totals[STOP] > 0
            # A checkpoint right after the draw: a relaunch then starts from the pruned engine.
            if stopping or drawn or state.step % cfg.checkpoint.interval == 0 or state.step == cfg.total_steps:
                run.save()
            if stopping:
                return False
    finally:
        loader.close()
    return True


# ---- EarlyBERT: search, draw, prune, rebuild --------------------------------------------------

def search(run: Run, seq_len: int) -> bool:
    """After a step of the search stage: run the detector (rank 0) when due; on a draw, prune and
    rebuild the engine in place, write RUN/ticket.json, and return True."""
    cfg, state, d = run.cfg, run.state, run.dist
    eb = cfg.earlybert
    decision, state.extra[DETECTOR_KEY] = search_step(run.engine.module, eb.mode, eb.detector, eb.draw_step, cfg.seed,
                                                      state.step, state.extra.get(DETECTOR_KEY), d.is_main)
    if decision is None or not decision.draw:
        return False
    _say(d, f"ticket drawn at step {state.step}: {decision.reason}")
    before = run.engine.module.config
    start_weights = load_file(Path(cfg.run_dir) / START_WEIGHTS) if eb.after_draw == "rewind" else None
    t0 = time.perf_counter()
    run.engine, plan = rebuild_engine(
        run.engine, decision.masks, build=lambda model: build_engine(model, cfg, run.ds_config)[0],
        fold_gates=eb.fold_gates, carry_moments=eb.optimizer_after_draw == "carry" and start_weights is None,
        start_weights=start_weights)
    run.scheduler = run.engine.lr_scheduler
    record = ticket_record(decision, eb.mode, state.extra.get(DETECTOR_KEY), before, run.engine.module.config, seq_len)
    record["rebuild_s"] = time.perf_counter() - t0
    state.extra[TICKET_KEY] = {"draw_step": decision.step, "mask_digest": record["mask_digest"]}
    if d.is_main:
        write_ticket(Path(cfg.run_dir), record)
    _say(d, f"pruned to heads {record['heads_per_layer']}, FFN {record['ffn_per_layer']}: "
            f"{record['params_before'] / 1e6:.2f}M -> {record['params_after'] / 1e6:.2f}M parameters, "
            f"engine rebuilt in {record['rebuild_s']:.1f} s; {RUN_TICKET} written")
    return True


def save_start_weights(engine, run_dir: Path, d: distributed.DistInfo) -> None:
    """The full fp32 weights at step 0, for `after_draw: rewind` (a collective; rank 0 writes)."""
    weights = snapshot_engine(engine, weights_only=True).weights
    if d.is_main:
        atomic_write(run_dir / START_WEIGHTS, lambda f: f.write(save({k: v.contiguous() for k, v in weights.items()})))


def step_record(run: Run, totals: list[float], *, phase: int, seq_len: int, lr: float, step_time: float,
                data_wait: float) -> dict:
    """One metrics.jsonl line: global averages over every rank's micro-batches, whole-job throughput.
    "time" is the unix time at the step's end: it lines steps up with cluster logs, and lets a
    benchmark take out the time a scheduler held the job suspended."""
    s, config = totals, run.engine.module.config
    micro = s[MICRO]
    seq_per_s = run.cfg.global_batch_size / step_time
    # "loss" is the task loss (MLM + NSP), comparable between EarlyBERT and dense runs; the search
    # stage's L1 term is "gate_penalty".
    r = {"step": run.state.step, "phase": phase, "seq_len": seq_len, "loss": (s[LOSS] - s[GATE_PENALTY]) / micro,
         "mlm_loss": s[MLM] / micro, "mlm_acc": s[CORRECT] / max(s[MASKED], 1.0), "lr": lr,
         "samples": run.state.samples, "time": time.time(), "step_time_s": step_time, "data_wait_s": data_wait,
         "seq_per_s": seq_per_s, "tokens_per_s": seq_per_s * seq_len,
         "tflops": flops_per_sequence(config, seq_len) * seq_per_s / 1e12}
    if config.use_nsp:
        r["nsp_loss"] = s[NSP] / micro
    if config.use_gates:
        r["gate_l1"] = s[GATE_L1] / micro
    if gate_lambdas(run.cfg.earlybert, run.state) is not None:  # the search stage
        r["gate_penalty"] = s[GATE_PENALTY] / micro
    if run.peak_tflops:
        r["mfu"] = r["tflops"] / (run.peak_tflops * run.dist.world_size)
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
    try:  # everything that can be checked from files, before any process group exists
        cfg = load_config(args.config, args.overrides)
        datasets = open_phases(cfg)
        start = find_start(cfg, datasets)
    except (ConfigError, CheckpointError, ShardError) as e:
        print(f"earlybert train: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    d = distributed.setup()
    _set_cpu_threads(d)
    clean = False
    try:
        code = train(cfg, datasets, start, d)
        clean = True
        return code
    except (ConfigError, CheckpointError) as e:
        print(f"earlybert train (rank {d.rank}): {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        distributed.teardown(clean)


if __name__ == "__main__":
    sys.exit(main())

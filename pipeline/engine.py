"""The DeepSpeed engine of any of our models (pre-training, task heads): build it, and rebuild it
around a pruned model in the same process.

    EngineSpec        what every engine of a run is built with: the DeepSpeed config, the optimizer
                      settings and the length of the LR schedule
    build_engine      deepspeed.initialize with our parameter groups and LR schedule
    prune_engine      the draw: destroy the engine, build the pruned model's (pipeline/rebuild.py
                      carries the fp32 masters, moments, counters and schedule across)

The LR schedule is the loop's own LambdaLR over optimizer steps (not a DeepSpeed scheduler), so
that the run config, not the DeepSpeed JSON, owns it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from pipeline.config import OptimConfig
from pipeline.detector import Masks


@dataclass(frozen=True)
class EngineSpec:
    ds_config: dict  # the merged DeepSpeed config (pipeline/config.py: deepspeed_config)
    optim: OptimConfig
    total_steps: int  # optimizer steps the LR schedule spans


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


def build_engine(model: torch.nn.Module, spec: EngineSpec):
    """The DeepSpeed engine of `model`; its LR scheduler is `engine.lr_scheduler`."""
    import deepspeed

    schedule = partial(lr_factor, spec.optim, spec.total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model), config=spec.ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine


def prune_engine(engine, spec: EngineSpec, masks: Masks, *, fold_gates: bool, carry_moments: bool,
                 start_weights: dict[str, torch.Tensor] | None = None, carry_schedule: bool = True):
    """Prune the engine's model to `masks` and return the rebuilt engine; `engine` is destroyed (a
    collective: every rank calls it). start_weights: prune these (rewind) instead of the current
    weights. carry_schedule=False starts the new engine's optimizer counters and LR schedule afresh
    (with `spec`'s length), as EarlyBERT's fine-tuning recipe does after its rewind."""
    from pipeline.rebuild import rebuild_engine

    new, _ = rebuild_engine(engine, masks, build=partial(build_engine, spec=spec), fold_gates=fold_gates,
                            carry_moments=carry_moments, start_weights=start_weights, carry_schedule=carry_schedule)
    return new


def full_weights(engine) -> dict[str, torch.Tensor]:
    """The full fp32 weights of the engine's model by name, on the CPU (a collective under ZeRO)."""
    from pipeline.rebuild import snapshot_engine

    return snapshot_engine(engine, weights_only=True).weights

"""The DeepSpeed engine of any of our models (pre-training, task heads): build it, and rebuild it
around a pruned model in the same process.

    EngineSpec        what every engine of a run is built with: the DeepSpeed config, the optimizer
                      settings and the length of the LR schedule
    build_engine      deepspeed.initialize with our parameter groups and LR schedule; by option the
                      model compiled (torch.compile); DeepSpeed's fused Adam where it can run, else
                      torch's fused AdamW (with_available_adam); LAMB refused where DeepSpeed's
                      FusedLamb cannot run (check_lamb_available)
    prune_engine      the draw: destroy the engine, build the pruned model's (pipeline/engine/rebuild.py
                      carries the fp32 masters, moments, counters and schedule across)
    train_step        one optimizer step over a step's micro-batches

The LR schedule is the loop's own LambdaLR over optimizer steps (not a DeepSpeed scheduler), so
that the run config, not the DeepSpeed JSON, owns it.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from pipeline.config import ConfigError, OptimConfig, zero_stage
from pipeline.earlybert.detector import Masks
from pipeline.model import EarlyBertSelfAttention


@dataclass(frozen=True)
class EngineSpec:
    ds_config: dict  # the merged DeepSpeed config (pipeline/config.py: deepspeed_config)
    optim: OptimConfig
    total_steps: int  # optimizer steps the LR schedule spans
    compile: bool = False  # torch.compile the model (DeepSpeed's engine.compile), again after each rebuild


def lr_factor(optim: OptimConfig, total_steps: int, step: int) -> float:
    """Multiplier of the peak lr for the optimizer step that follows `step` completed steps. Unlike
    DeepSpeed's WarmupLR, the first step already trains (lr / warmup_steps, not 0)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "wsd":  # stable at 1 until the decay's first step, then towards 0 by its shape
        decay_start = optim.wsd_decay_start(total_steps)
        progress = max(0, step - decay_start) / (total_steps - decay_start)
        return 1.0 - (math.sqrt(progress) if optim.decay_shape == "1-sqrt" else progress)
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


def fused_op_unavailable(builder: str) -> str | None:
    """Why the DeepSpeed CUDA op made by `builder` (e.g. "FusedAdamBuilder") cannot run in this process, or None
    when it can. The op is prebuilt or compiled on first use (which needs nvcc and the CUDA toolkit)."""
    if not torch.cuda.is_available():
        return "it needs a CUDA device"
    try:
        from deepspeed.ops import op_builder

        getattr(op_builder, builder)().load(verbose=False)
        return None
    except Exception as err:  # no toolkit, no compiler, a failed build: all end here
        return f"its CUDA extension cannot be built or loaded: {type(err).__name__}: {err}"


@functools.cache
def fused_adam_unavailable() -> str | None:
    """Why DeepSpeed's fused Adam cannot run in this process, or None when it can. Said once per process."""
    reason = fused_op_unavailable("FusedAdamBuilder")
    if reason is not None:
        print(
            f"DeepSpeed's fused Adam is unavailable ({reason}); training with torch's fused AdamW instead",
            file=sys.stderr,
            flush=True,
        )
    return reason


def with_available_adam(ds_config: dict) -> dict:
    """`ds_config`, or, where it asks for DeepSpeed's fused Adam (Adam/AdamW without `torch_adam`, optimizer
    on the device) and that cannot run, a copy asking for torch's fused AdamW: same update, same settings."""
    optimizer = ds_config.get("optimizer", {})
    params = optimizer.get("params", {})
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if optimizer.get("type", "").lower() not in ("adam", "adamw") or params.get("torch_adam") or offload != "none":
        return ds_config
    if fused_adam_unavailable() is None:
        return ds_config
    return {**ds_config, "optimizer": {**optimizer, "params": {**params, "torch_adam": True, "fused": True}}}


def check_lamb_available(ds_config: dict) -> None:
    """Refuse a config asking for LAMB where DeepSpeed's FusedLamb cannot run. Unlike Adam there is no fallback:
    torch has no LAMB, and switching to another optimizer or to an implementation of our own that nothing here
    can check against FusedLamb would change the training recipe behind the user's back."""
    if ds_config.get("optimizer", {}).get("type", "").lower() != "lamb":
        return
    reason = fused_op_unavailable("FusedLambBuilder")
    if reason is not None:
        raise ConfigError(
            f"the DeepSpeed config asks for LAMB, DeepSpeed's FusedLamb, which cannot run here ({reason}). "
            "Train with AdamW (e.g. ds_configs/zero2_bf16.json, or zero1.json on a CPU), or on a CUDA machine "
            "where DeepSpeed can build its fused_lamb op: nvcc and the CUDA toolkit of torch's CUDA version, "
            "or DeepSpeed installed with it prebuilt (DS_BUILD_FUSED_LAMB=1 pip install deepspeed)"
        )


def build_engine(model: torch.nn.Module, spec: EngineSpec):
    """The DeepSpeed engine of `model`; its LR scheduler is `engine.lr_scheduler`."""
    import deepspeed

    check_lamb_available(spec.ds_config)
    ds_config = with_available_adam(spec.ds_config)
    if zero_stage(ds_config) == 3 and getattr(model.config, "fused_qkv", False):
        # The fused projection reads query/key/value's weights from their parent module: ZeRO-3 gathers a
        # module's own parameters only, unless it is a leaf (then all of its submodules' with it).
        deepspeed.utils.set_z3_leaf_modules(model, [EarlyBertSelfAttention])
    schedule = partial(lr_factor, spec.optim, spec.total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model),
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    if spec.compile:
        # The dense and the pruned model run the same code objects: drop the earlier model's graphs first,
        # or dynamo piles the new shapes onto them up to its recompile limit.
        torch._dynamo.reset()
        engine.compile()
    return engine


def train_step(
    engine, micro_batches: list[dict], device: torch.device, stats_of: Callable[..., dict], **forward_kwargs
) -> dict[str, torch.Tensor]:
    """One optimizer step: DeepSpeed accumulates the gradients of the micro-batches and steps on the last
    one. Returns this rank's sums over its micro-batches of `stats_of(output)` (named scalars)."""
    totals: dict[str, torch.Tensor] = {}
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = engine(**batch, **forward_kwargs)
        engine.backward(out.loss)
        engine.step()
        for k, v in stats_of(out).items():
            totals[k] = totals.get(k, 0.0) + v.detach().float()
    return totals


def prune_engine(
    owner,
    spec: EngineSpec,
    masks: Masks,
    *,
    fold_gates: bool,
    carry_moments: bool,
    start_weights: dict[str, torch.Tensor] | None = None,
    carry_schedule: bool = True,
    schedule_step: int | None = None,
):
    """Prune the model of `owner.engine` to `masks`, put the rebuilt engine in `owner.engine` and return it (a
    collective: every rank calls it). owner (the run, or an EngineSlot) holds the only reference to the engine:
    the dense engine is freed before the pruned one is built. start_weights: prune these (rewind) instead of the current
    weights. carry_schedule=False starts the new engine's optimizer counters and LR schedule afresh (with `spec`'s
    length), as EarlyBERT's fine-tuning recipe does after its rewind; schedule_step puts the LR schedule back to
    that many completed steps (rewinding to an early step of pre-training)."""
    from pipeline.engine.rebuild import rebuild_engine

    rebuild_engine(
        owner,
        masks,
        build=partial(build_engine, spec=spec),
        fold_gates=fold_gates,
        carry_moments=carry_moments,
        start_weights=start_weights,
        carry_schedule=carry_schedule,
    )
    if schedule_step is not None:
        set_schedule_step(owner.engine, schedule_step)
    return owner.engine


@dataclass
class EngineSlot:
    """Holds an engine for `prune_engine` where no run object does (benchmarks, tests)."""

    engine: object


def set_schedule_step(engine, step: int) -> None:
    """Put the engine's LR schedule at `step` completed optimizer steps: the next step uses its lr."""
    scheduler = engine.lr_scheduler
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": step, "_last_lr": lrs})
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):  # schedulers apply an lr at their next step
        group["lr"] = lr


def full_weights(engine) -> dict[str, torch.Tensor]:
    """The full fp32 weights of the engine's model by name, on the CPU (a collective under ZeRO)."""
    from pipeline.engine.rebuild import snapshot_engine

    return snapshot_engine(engine, moments=False).weights


def read_gates(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """fp32 masters of the gates (not their bf16 copies, whose rounding makes ties), whole on every rank (a
    collective under ZeRO-3: every rank calls it)."""
    from pipeline.engine.rebuild import full_fp32

    return [full_fp32(g) for g in model.head_gates()], [full_fp32(g) for g in model.ffn_gates()]

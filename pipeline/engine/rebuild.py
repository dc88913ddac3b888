"""Rebuild the DeepSpeed engine around the pruned model, in the same process.

ZeRO flattens and partitions parameters, so they cannot change shape in place. The rebuild:
  1. reads the full fp32 master weights and Adam moments of every parameter (collectives: every
     rank calls this) before anything is destroyed: rebuilding from the 16-bit module would round
     the masters through bf16;
  2. slices each one to the ticket (its model family's `prune_tensors`, pipeline/families.py) on the
     device as it is read, and keeps the sliced part on the host;
  3. destroys the old engine, drops the last reference to it and empties the accelerator's cache,
     then initializes a new one on the pruned model, through the same `build` function that made
     the first engine (same config, same parameter groups): the peak is the dense engine's, not
     the dense and the pruned engine's together;
  4. writes the fp32 masters (and, by option, the sliced moments) into the new engine's
     partitions, and carries over the step counters, the optimizer's step count, the learning
     rate schedule position and the fp16 loss-scaler state.
"""

from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from deepspeed.ops.lamb import FusedLamb
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)

from pipeline.earlybert.detector import Masks
from pipeline.earlybert.pruner import GATES, PrunePlan, gate_values
from pipeline.families import family_of

MOMENTS = {"exp_avg": -1, "exp_avg_sq": -2}  # Adam state key -> how a folded column rescales it
LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


@dataclass
class EngineSnapshot:
    """The fp32 training state of an engine, unpartitioned, by parameter name, on the CPU: all of it, or the part
    a rebuild carries over (sliced to the ticket)."""

    weights: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # state key -> name -> tensor
    optimizer_step: float | None = None
    group_lrs: list[float] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    scheduler_state: dict | None = None
    loss_scaler: dict = field(default_factory=dict)


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's ZeRO / bf16 wrappers (or the optimizer itself)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 master of a parameter, on the CPU; a collective under ZeRO (every rank calls it)."""
    return _on_host(_master(param))


def _master(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 master of a parameter, where the engine keeps it (a collective under ZeRO)."""
    master = safe_get_full_fp32_param(param)
    return (master if master is not None else param.detach()).float()


def _on_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `t` that shares no memory with the engine."""
    return t.detach().to("cpu", torch.float32, copy=True)


def snapshot_engine(engine, weights: bool = True, moments: bool = True, keep: Callable | None = None) -> EngineSnapshot:
    """Every rank calls this (the reads are collectives under ZeRO). weights / moments: read the fp32 masters /
    the Adam moments (the counters, schedule and loss scale always). keep(tensors, power) -> tensors: what to keep
    of each parameter's tensors (a name -> tensor dict; power as in pruner.prune_tensors), applied on the device
    as each one is read, so that only the kept part ever reaches the host; None keeps everything."""
    keep = keep or (lambda tensors, power: tensors)
    base = base_optimizer(engine)
    if moments:
        link_optimizer_state(engine)
    masters, states, incomplete = {}, {key: {} for key in MOMENTS}, set()
    for name, p in engine.module.named_parameters():
        if weights:
            masters.update({k: _on_host(v) for k, v in keep({name: _master(p)}, 1).items()})
        if not moments:
            continue
        zero = hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")
        for key, power in MOMENTS.items():
            state = safe_get_full_optimizer_state(p, key) if zero else base.state.get(p, {}).get(key)
            if state is None:
                incomplete.add(key)  # no state yet (before the first step), or not an Adam-family optimizer
            else:
                states[key].update({k: _on_host(v) for k, v in keep({name: state.float()}, power).items()})
    steps = [s["step"] for s in base.state.values() if "step" in s]
    step = float(steps[0]) if steps else base.param_groups[0].get("step")
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return EngineSnapshot(
        weights=masters,
        moments={k: v for k, v in states.items() if k not in incomplete} if moments else {},
        optimizer_step=step,
        group_lrs=[g["lr"] for g in base.param_groups],
        counters={k: getattr(engine, k) for k in ("global_steps", "global_samples", "skipped_steps", "micro_steps")},
        scheduler_state=engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        loss_scaler={k: getattr(scaler, k) for k in LOSS_SCALER_FIELDS if hasattr(scaler, k)},
    )


def rebuild_engine(
    owner,
    masks: Masks,
    build: Callable,
    fold_gates: bool = True,
    carry_moments: bool = True,
    start_weights: dict[str, torch.Tensor] | None = None,
    carry_schedule: bool = True,
) -> PrunePlan:
    """Prune the model of `owner.engine` to `masks`, put the rebuilt engine in `owner.engine`, return the plan.

    owner: whatever holds the engine (the run), in an `engine` attribute, and with it the only reference to it:
    the old engine is freed before the new one is built, so that the memory peak of the rebuild is the dense
    engine's, not the dense and the pruned engine together. The state carried over is read to the host first,
    sliced to the ticket on the device as it is read (only the kept part is ever held).
    build(model) -> engine must create the engine exactly as the first one was created.
    start_weights (name -> full fp32 tensor): rewind, i.e. prune these weights (those of the rewind step,
    or the pre-trained ones) instead of the current ones; the moments then start from zero.
    carry_schedule=False: the new engine keeps its own fresh counters and LR schedule.
    """
    engine = owner.engine
    model_class, config = type(engine.module), engine.module.config
    family = family_of(config)
    plan = PrunePlan.from_masks(masks, config.head_size, fold_gates)
    rewind = start_weights is not None
    if rewind:
        gates = gate_values(start_weights)
    else:  # the gates first: folding them into W_O / W_2 needs them while those are sliced
        gates = {name: full_fp32(p) for name, p in engine.module.named_parameters() if name.endswith(GATES)}
    keep = lambda tensors, power: family.prune_tensors(tensors, plan, gates, power)  # noqa: E731
    snap = snapshot_engine(engine, weights=not rewind, moments=carry_moments and not rewind, keep=keep)
    if rewind:
        snap.weights = family.prune_tensors(start_weights, plan, gates)
    del engine  # owner.engine is now the only reference: free_engine frees it
    free_engine(owner)

    # Built on the meta device: no initialisation to pay for (the weights are overwritten) and no
    # draw from the global RNG, so dropout continues on the same stream as without the rebuild.
    with torch.device("meta"):
        model = model_class(family.pruned_config(config, plan))
    model = model.to_empty(device="cpu")
    model.tie_weights()  # on the meta device transformers leaves the decoder untied
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(snap.weights[name])
    owner.engine = build(model)
    del model
    restore_engine(owner.engine, snap, carry_schedule)
    del snap
    gc.collect()
    release_freed_host_memory()
    return plan


def free_engine(owner) -> None:
    """Destroy `owner.engine` and free its memory, host and accelerator, before anything else is allocated.
    The caller holds no other reference; its parameters are emptied as well, so that a module still referenced
    elsewhere (a model the run was started from) keeps no weights alive."""
    engine, owner.engine = owner.engine, None
    engine.destroy()
    _empty_parameters(engine.module)
    del engine
    gc.collect()
    get_accelerator().empty_cache()
    release_freed_host_memory()


def _empty_parameters(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.data, p.grad = torch.empty(0, dtype=p.dtype, device=p.device), None


def release_freed_host_memory() -> None:
    """Hand freed memory back to the OS: glibc keeps freed blocks in its arenas, so without this the host RSS
    stays at dense + pruned engine (bert-base: +2.1 GB) for the rest of the run."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def restore_engine(engine, snap: EngineSnapshot, carry_schedule: bool = True) -> None:
    """Write masters, moments and, by option, counters, schedule and loss scale into a freshly built engine."""
    base = base_optimizer(engine)
    if snap.moments:
        _create_adam_state(base, _optimizer_tensors(engine), snap.optimizer_step or 0.0)
        link_optimizer_state(engine)
    for name, p in engine.module.named_parameters():
        _set_full(p, snap.weights[name], None, base)
        for key, values in snap.moments.items():
            _set_full(p, values[name], key, base)
    if not carry_schedule:
        return
    for k, v in snap.counters.items():
        setattr(engine, k, v)
    if snap.scheduler_state is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(snap.scheduler_state)
    # Schedulers only re-apply the lr at their next step: set the current lr explicitly.
    for group, lr in zip(base.param_groups, snap.group_lrs):
        group["lr"] = lr
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    for k, v in snap.loss_scaler.items():
        setattr(scaler, k, v)


def link_optimizer_state(engine) -> None:
    """Point every parameter's fragment mapping at its slice of the optimizer state.

    ZeRO-1/2 and the bf16 optimizer link these lazily, once, right after the first parameter
    group's first step: with several groups (decay / no decay) the later groups have no state yet
    and stay unlinked for good, so their moments cannot be read. Link again now that all exist."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def _optimizer_tensors(engine) -> list[torch.Tensor]:
    """The tensors the base optimizer steps: ZeRO-3 empties its param groups outside step()."""
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if flat is not None:
        return list(flat)
    return [p for group in base_optimizer(engine).param_groups for p in group["params"]]


def _create_adam_state(base: torch.optim.Optimizer, tensors: list[torch.Tensor], step: float) -> None:
    """Adam-family optimizers create their state lazily at the first step; create it now (zeros), with the
    step count carried over so that bias correction continues where it was."""
    for p in tensors:
        if not base.state.get(p):
            base.state[p] = {
                "step": step_state(base, p, step),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


def step_state(base: torch.optim.Optimizer, param: torch.Tensor, step: float) -> int | torch.Tensor:
    """The step count the way `base`'s implementation keeps it, as it would create it at its first step.
    DeepSpeed's FusedAdam, FusedLamb and CPU Adam: an int, handed to their kernel. torch's Adam/AdamW, fused or
    capturable: a float32 tensor on the parameter's device (their kernels read it there); otherwise (for-loop,
    foreach): a tensor on the CPU, which they read as a host number (torch.optim.Adam._init_group)."""
    if isinstance(base, (FusedAdam, FusedLamb, DeepSpeedCPUAdam)):
        return int(step)
    if base.defaults.get("fused") or base.defaults.get("capturable"):
        return torch.tensor(float(step), dtype=torch.float32, device=param.device)
    return torch.tensor(float(step), device="cpu")


def _set_full(param, value: torch.Tensor, key: str | None, base: torch.optim.Optimizer) -> None:
    if hasattr(param, "ds_id"):
        # ZeRO-3 partitions are padded to equal sizes; the full setter cannot write the padded tail
        # (e.g. 3 surviving heads on 2 ranks), so each rank writes its own padded slice.
        part = param.ds_tensor.numel()
        rank = dist.get_rank(group=param.ds_process_group)
        flat = torch.zeros(part * dist.get_world_size(group=param.ds_process_group), dtype=torch.float32)
        flat[: value.numel()] = value.flatten()
        local = flat[rank * part : (rank + 1) * part].to(param.ds_tensor.device)
        if key is None:
            safe_set_local_fp32_param(param, local)
        else:
            safe_set_local_optimizer_state(param, local, key)
    elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2 and the bf16 optimizer
        value = value.to(param.device)
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
    else:  # no ZeRO, fp32: the module parameter is the master
        with torch.no_grad():
            target = param if key is None else base.state[param][key]
            target.copy_(value.to(target.device, target.dtype))

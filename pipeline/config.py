"""The typed run config of `earlybert train`: YAML file + dotted `key=value` overrides.

Every key is checked against the dataclasses below, so a typo fails before any process group,
model or DeepSpeed engine exists. The run config owns what the training loop must agree with
(batch sizes, learning rate and schedule, steps); the DeepSpeed JSON owns the rest (ZeRO stage,
offload, precision, optimizer type, clipping, communication). `deepspeed_config()` merges them.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline.detector import DetectorConfig
from pipeline.rundir import RunDir


class ConfigError(ValueError):
    """A run or DeepSpeed config that cannot work; the message says what to change."""


@dataclass
class ModelConfig:
    """The architecture of a fresh run; a resumed run is rebuilt from its checkpoint's architecture.json."""

    preset: str = "bert-tiny"  # EarlyBertConfig.from_preset name (bert-tiny ... bert-large)
    init_from: str | None = None  # a Hugging Face checkpoint (directory or hub id) instead of random init
    overrides: dict = field(default_factory=dict)  # EarlyBertConfig fields, e.g. {hidden_dropout_prob: 0.0}


@dataclass
class SearchConfig:
    """The search stage, the draw and what follows it (YAML key `earlybert:`; see pipeline/search.py).

    mode: earlybert  gates + L1, the early-bird detector draws the ticket when the masks stop changing
          fixed      gates + L1, the ticket is drawn at draw_step          (baseline: hand-set draw step)
          random     random units pruned at draw_step, at the same ratios  (baseline: random pruning)
          dense      plain BERT: no gates, no draw                          (baseline: full BERT)
    """

    mode: Literal["earlybert", "fixed", "random", "dense"] = "earlybert"
    lambda_heads: float = 1e-4  # L1 on the head gates (a sum over heads, per micro-batch)
    lambda_ffn: float = 1e-4  # L1 on the FFN gates
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    draw_step: int | None = None  # fixed and random modes
    # After the draw: fold the gates into W_O / W_2 (exact), or keep them as free parameters without L1.
    fold_gates: bool = True
    # carry: slice the Adam moments to the ticket; reset: start them from zero.
    optimizer_after_draw: Literal["carry", "reset"] = "carry"
    # continue from the current weights, or rewind the pruned structure to the starting weights.
    after_draw: Literal["continue", "rewind"] = "continue"

    @property
    def use_gates(self) -> bool:
        return self.mode != "dense"


@dataclass
class Phase:
    shards: str  # a directory written by `earlybert prep`; its seq_len is the phase's
    steps: int  # optimizer steps in this phase


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak learning rate
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # after warmup: decay towards 0, or constant
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps


@dataclass
class DataConfig:
    mask_prob: float = 0.15  # share of maskable tokens selected for MLM (then 80% [MASK], 10% random, 10% kept)
    prefetch: int = 8  # micro-batches prepared ahead by the loader thread


@dataclass
class CheckpointConfig:
    interval: int = 1000  # save every N optimizer steps (and at the end, and on SIGTERM/SIGUSR1)
    keep: int = 3  # complete checkpoints kept in RUN/checkpoints


@dataclass
class LogConfig:
    interval: int = 10  # progress line every N steps (metrics.jsonl gets every step)
    tensorboard: bool = True  # through DeepSpeed's monitor, when the tensorboard package is installed
    wandb: bool = False  # through DeepSpeed's monitor, when wandb is installed
    wandb_project: str = "earlybert"
    peak_tflops: float | None = None  # per-device peak for MFU; None = look the device up


@dataclass
class RunConfig:
    """`earlybert train`: what the training loop must agree with; the DeepSpeed JSON owns the rest."""

    run_dir: str  # RUN/ (pipeline/rundir.py): config, metrics, ticket, checkpoints
    phases: list[Phase]  # BERT's recipe: seq 128 for 90% of the steps, then seq 512
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    earlybert: SearchConfig = field(default_factory=SearchConfig)
    deepspeed: str = "ds_configs/zero1.json"  # ZeRO stage, precision, optimizer type, clipping
    deepspeed_overrides: dict = field(default_factory=dict)  # deep-merged into the DeepSpeed JSON
    micro_batch_size: int = 8  # per rank and forward pass
    global_batch_size: int = 32  # per optimizer step; gradient accumulation = global / (micro * ranks)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    @property
    def rundir(self) -> RunDir:
        return RunDir(self.run_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# DeepSpeed keys the run config sets (the schedule is the loop's own LambdaLR): a DeepSpeed JSON that
# sets them too would be silently overridden.
RUN_OWNED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "scheduler")
LAMB_OPTIMIZERS = ("lamb", "onebitlamb")  # DeepSpeed optimizer type names, lower-cased


# ---- loading ----------------------------------------------------------------------------------

def load_config(path: str, overrides: list[str] = ()) -> RunConfig:
    """Read the YAML run config, apply `a.b.c=value` overrides, build and validate the dataclasses."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read run config {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
        set_dotted(raw, key, yaml.safe_load(value))
    cfg = from_dict(RunConfig, raw, "")
    validate(cfg)
    return cfg


def set_dotted(tree: dict, key: str, value) -> None:
    """tree["a"]["b"][0]["c"] = value for key "a.b.0.c"; creates missing mappings (never list items)."""
    *parents, last = key.split(".")
    node = tree
    for part in parents:
        if isinstance(node, list):
            node = node[_list_index(node, part, key)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {key}: {part!r} is a value, not a section")
    if isinstance(node, list):
        node[_list_index(node, last, key)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: {part!r} is not an index of a {len(node)}-item list")
    return int(part)


def from_dict(cls, data, where: str):
    """Build dataclass `cls` from a mapping, refusing unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; "
                          f"valid keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], where + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {where + f.name}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a dataclass's own checks (e.g. DetectorConfig's)
        raise ConfigError(str(e)) from None


def _coerce(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _coerce(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} {value!r}: choose one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}.{i}") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    # bool is an int subclass: `steps: true` must not pass as 1.
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def validate(cfg: RunConfig) -> None:
    """Checks that need no process group and no data; the DeepSpeed JSON is checked here too."""
    if not cfg.phases:
        raise ConfigError("phases: list at least one {shards: DIR, steps: N}")
    for i, p in enumerate(cfg.phases):
        if p.steps < 1:
            raise ConfigError(f"phases.{i}.steps must be >= 1, got {p.steps}")
    positive = {"micro_batch_size": cfg.micro_batch_size, "global_batch_size": cfg.global_batch_size,
                "checkpoint.interval": cfg.checkpoint.interval, "checkpoint.keep": cfg.checkpoint.keep,
                "log.interval": cfg.log.interval, "data.prefetch": cfg.data.prefetch, "optim.lr": cfg.optim.lr}
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    if not 0.0 < cfg.data.mask_prob < 1.0:
        raise ConfigError(f"data.mask_prob must be in (0, 1), got {cfg.data.mask_prob}")
    if not 0 <= cfg.optim.warmup_steps <= cfg.total_steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be in [0, total steps {cfg.total_steps}]")
    validate_search(cfg.earlybert, cfg.total_steps)
    if cfg.global_batch_size % cfg.micro_batch_size:
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} is not a multiple of "
                          f"micro_batch_size={cfg.micro_batch_size}")
    validate_deepspeed(read_deepspeed(cfg), cfg.deepspeed)


def validate_search(eb: SearchConfig, total_steps: int) -> None:
    if eb.lambda_heads < 0 or eb.lambda_ffn < 0:
        raise ConfigError("earlybert.lambda_heads and lambda_ffn must be >= 0")
    if eb.mode in ("fixed", "random") and not (eb.draw_step and 0 < eb.draw_step < total_steps):
        raise ConfigError(f"earlybert.mode={eb.mode} draws at earlybert.draw_step: set it to a step in "
                          f"[1, {total_steps - 1}], got {eb.draw_step}")


# ---- DeepSpeed --------------------------------------------------------------------------------

def read_deepspeed(cfg: RunConfig) -> dict:
    """The DeepSpeed JSON named by the run config with `deepspeed_overrides` merged in."""
    try:
        ds = json.loads(Path(cfg.deepspeed).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"deepspeed: cannot read {cfg.deepspeed}: {e}") from e
    return _deep_merge(ds, cfg.deepspeed_overrides)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def precision(ds: dict) -> str:
    for name in ("bf16", "fp16"):
        if ds.get(name, {}).get("enabled", False):
            return name
    return "fp32"


def validate_deepspeed(ds: dict, source: str) -> None:
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage={stage!r}; DeepSpeed ZeRO has stages 0, 1, 2 and 3")
    owned = [k for k in RUN_OWNED_DS_KEYS if k in ds] + (["optimizer.params.lr"] if "lr" in ds.get("optimizer", {}).get("params", {}) else [])
    if owned:
        raise ConfigError(f"{source}: {', '.join(owned)} are set by the run config (micro_batch_size, "
                          f"global_batch_size, optim.*); remove them from the DeepSpeed JSON")
    opt = ds.get("optimizer", {}).get("type", "")
    if opt.lower() in LAMB_OPTIMIZERS and stage > 0:
        raise ConfigError(
            f"{source}: optimizer {opt} with ZeRO stage {stage} is refused. LAMB scales each layer's update by "
            f"a per-layer trust ratio ||w|| / ||update||; ZeRO partitions flattened parameters across ranks, so "
            f"each rank computes the ratio on a fragment and the update is wrong (DeepSpeed issues #88, #490, "
            f"#1217, #4187). Use LAMB with zero_optimization.stage 0, or AdamW with ZeRO.")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{source}: bf16 and fp16 are both enabled; pick one")


def deepspeed_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config the engine is built with: the JSON plus what the run config owns."""
    ds = read_deepspeed(cfg)
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} is not a multiple of micro_batch_size "
                          f"({cfg.micro_batch_size}) x ranks ({world_size}); change either so that it is")
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.global_batch_size // per_step
    ds["train_batch_size"] = cfg.global_batch_size
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})["lr"] = cfg.optim.lr
    ds.setdefault("steps_per_print", 2**31 - 1)  # the loop prints its own progress line
    # The loop's metrics also go to TensorBoard / W&B through DeepSpeed's monitor; both are optional
    # packages, enabled only where installed (train.py says so when one is asked for and missing).
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard"):
        ds.setdefault("tensorboard", {"enabled": True, "output_path": str(cfg.rundir.tensorboard),
                                      "job_name": "train"})
    if cfg.log.wandb and importlib.util.find_spec("wandb"):
        ds.setdefault("wandb", {"enabled": True, "project": cfg.log.wandb_project})
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


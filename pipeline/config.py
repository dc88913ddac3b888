"""The typed configs of `earlybert train` and `earlybert finetune`: YAML file + dotted `key=value` overrides.
What both share is here: the loader, the sections and fields of `TrainingConfig` with their validation, the
DeepSpeed JSON, the batch plan. Each loop's own config extends it (pipeline/pretrain/config.py,
pipeline/finetune/config.py).

Relative paths in the file (each config's PATHS) are relative to the file's directory, those given as overrides to
the current directory; `ds_configs/NAME.json` that is not there is the project's own (shipped with the
package), so a config works from any directory.

Every key is checked against the dataclasses below, so a typo fails before any process group,
model or DeepSpeed engine exists. The run config owns what the training loop must agree with
(batch sizes, learning rate and schedule, steps); the DeepSpeed JSON owns the rest (ZeRO stage,
offload, precision, optimizer type, clipping, communication). `deepspeed_config()` merges them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline.earlybert.detector import DetectorConfig
from pipeline.run.rundir import RunDir


class ConfigError(ValueError):
    """A run or DeepSpeed config that cannot work; the message says what to change."""


# The project's DeepSpeed configs, shipped with the package (pipeline/ds_configs links to the repository's ds_configs/).
SHIPPED_DS_CONFIGS = Path(__file__).resolve().parent / "ds_configs"
DEFAULT_DS_CONFIG = str(SHIPPED_DS_CONFIGS / "zero1.json")


@dataclass
class MethodConfig:
    """EarlyBERT, the method (YAML key `earlybert:`): the search stage, the draw and what follows it (see
    pipeline/earlybert/search.py).

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
    mask_seed: int | None = None  # random mode: the seed of the random masks (default: the run's seed)
    # random mode: a ticket.json whose per-layer head and FFN counts the random masks keep (the baseline at
    # the ticket's own structure); default: the detector's ratios and scopes.
    random_like: str | None = None
    # After the draw: fold the gates into W_O / W_2 (exact), or keep them as free parameters without L1.
    fold_gates: bool = True
    # carry: slice the Adam moments to the ticket; reset: start them from zero.
    optimizer_after_draw: Literal["carry", "reset"] = "carry"
    # continue: the ticket goes on from the current weights and schedule position. rewind: as "The lottery
    # ticket hypothesis at scale" rewinds, the ticket starts again from the weights and the LR schedule
    # position of step `rewind_step` (saved during the search; 0 is the initialisation) with fresh Adam
    # moments, and trains the schedule's steps from there to its end: the run grows by (draw step -
    # rewind_step) optimizer steps. The data stream is not replayed: the ticket reads the samples that follow.
    after_draw: Literal["continue", "rewind"] = "continue"
    rewind_step: int = 0

    @property
    def use_gates(self) -> bool:
        return self.mode != "dense"


@dataclass
class OptimConfig:
    """The learning-rate schedule (pipeline/engine/deepspeed_engine.py: lr_factor). After the warmup: linear or
    cosine decay towards 0 over the rest of the steps, constant, or wsd (warmup-stable-decay, as MiniCPM and
    ModernBERT train): the peak lr until the last decay_fraction of the steps, which decay towards 0."""

    lr: float = 1e-4  # peak learning rate
    schedule: Literal["linear", "cosine", "constant", "wsd"] = "linear"
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps
    decay_fraction: float = 0.1  # wsd: the share of the schedule's steps that decay (at least one step)
    # wsd: the factor at decay progress p in [0, 1): 1 - p, or 1 - sqrt(p) (Hagele et al. 2024, as ModernBERT
    # trains): a steep fall first, then a long stretch at a low lr
    decay_shape: Literal["linear", "1-sqrt"] = "1-sqrt"

    def wsd_decay_start(self, total_steps: int) -> int:
        """The first step of wsd's decay, which takes the last decay_fraction of total_steps (at least one)."""
        return total_steps - max(1, round(self.decay_fraction * total_steps))


def validate_wsd_fields(section: OptimConfig, where: str) -> None:
    """wsd's fields of pre-training's `optim` or fine-tuning's `recipe` (`where`): a decay_fraction in (0, 1], and
    none set away from its default for another schedule, which would ignore it (a default is accepted, as
    `--print-config` writes every field)."""
    if not 0 < section.decay_fraction <= 1:
        raise ConfigError(
            f"{where}.decay_fraction is the share of steps that decay: in (0, 1], not {section.decay_fraction}"
        )
    changed = [
        f"{where}.{name}={getattr(section, name)}"
        for name in ("decay_fraction", "decay_shape")
        if getattr(section, name) != getattr(OptimConfig, name)
    ]
    if changed and section.schedule != "wsd":
        raise ConfigError(f"{', '.join(changed)}: only {where}.schedule=wsd reads it, not {section.schedule}")


@dataclass
class CheckpointConfig:
    interval: int = 1000  # save every N optimizer steps (and at the end, and on SIGTERM/SIGUSR1)
    keep: int = 3  # complete checkpoints kept in RUN/checkpoints
    # Each checkpoint's manifest.json records its files' sizes, and by default their sha256, checked on resume;
    # size: sizes only (no hashing of large shards on save and resume).
    verify: Literal["checksum", "size"] = "checksum"


@dataclass
class DistTimeoutConfig:
    """How long a rank waits in a collective for the others before the run stops with a message."""

    step_s: float = 300.0  # in the steps (gradients, statistics, evaluation)
    long_s: float = 1800.0  # start-up (rendezvous, universal conversion, engine), checkpoints, the draw's rebuild


@dataclass
class NonFiniteConfig:
    """A NaN or inf loss in bf16 or fp32 (fp16: DeepSpeed's loss scaler skips and counts the step)."""

    action: Literal["stop", "skip"] = "stop"  # stop: exit, the latest checkpoint intact; skip: go on
    max_skipped: int = 0  # skip: stop at the (N+1)-th such step of the run


@dataclass
class LogConfig:
    interval: int = 10  # progress line every N steps (metrics.jsonl gets every step)
    tensorboard: bool = True  # RUN/tensorboard/ (pipeline/run/metrics.py)
    wandb: bool = False  # W&B: pip install 'earlybert[wandb]'; the run id is kept in RUN/wandb_id
    wandb_project: str = "earlybert"
    peak_tflops: float | None = None  # per-device peak for MFU; None = look the device up


@dataclass(kw_only=True)
class TrainingConfig:
    """What a pre-training and a fine-tuning config share: the run directory, the method, DeepSpeed, the batch,
    checkpoints, logs, resume and the guards. The loop's config owns what the training loop must agree with;
    the DeepSpeed JSON owns the rest. Each loop's config redeclares the defaults that differ."""

    run_dir: str  # RUN/ (pipeline/run/rundir.py): config, metrics, ticket, checkpoints
    seed: int
    # torch.compile the model (recompiled after the draw); CPU: 0.5x step time, minutes to compile
    compile: bool = False
    earlybert: MethodConfig = field(default_factory=MethodConfig)
    deepspeed: str = DEFAULT_DS_CONFIG  # ZeRO stage, precision, optimizer type, clipping (ds_configs/zero1.json)
    deepspeed_overrides: dict = field(default_factory=dict)  # deep-merged into the DeepSpeed JSON
    # The per-rank MAXIMUM of a forward pass: a launch takes the largest micro-batch <= it that splits the global
    # batch evenly over its ranks, the rest is gradient accumulation (plan_batches; logged at start).
    micro_batch_size: int
    global_batch_size: int = 32  # per optimizer step, whatever the ranks: global = micro x ranks x accumulation
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    resume_from: str | None = None  # a checkpoint tag (step_NNNNNNNN) to resume from instead of `latest`
    dist_timeout: DistTimeoutConfig = field(default_factory=DistTimeoutConfig)
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)

    @property
    def run_files(self) -> RunDir:
        """The files of the run directory `run_dir` (pipeline/run/rundir.py)."""
        return RunDir(self.run_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# DeepSpeed keys the run config sets (the schedule is the loop's own LambdaLR): a DeepSpeed JSON that
# sets them too would be silently overridden.
RUN_OWNED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "scheduler")
LAMB_OPTIMIZERS = ("lamb", "onebitlamb")  # DeepSpeed optimizer type names, lower-cased


# ---- loading ----------------------------------------------------------------------------------


def read_yaml(path: str, overrides: list[str] = (), path_keys: tuple[str, ...] = ()) -> dict:
    """The YAML mapping of a config file with `a.b.c=value` overrides applied (values parsed as YAML), the
    paths under `path_keys` made absolute: the file's against its directory, the overrides' against the
    current one."""
    try:
        raw = parse_yaml(Path(path).read_bytes(), str(path)) or {}
    except (OSError, ConfigError) as e:
        raise ConfigError(f"cannot read run config {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw = resolve_paths(raw, path_keys, Path(path).parent)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
        try:
            set_dotted(raw, key, parse_yaml(value.encode(), f"override {key}"))
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return resolve_paths(raw, path_keys, Path.cwd())  # what is still relative came from an override


# A config is a few hundred values a few levels deep: the bounds refuse a file that is not one (lists nested
# thousands deep overflow the parser's recursion; a "billion laughs" of aliases expands to gigabytes when the
# DeepSpeed config is merged and serialised; an alias inside itself makes a cyclic tree).
MAX_DEPTH = 32
MAX_NODES = 100_000


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python tags), refusing duplicate keys and nesting deeper than MAX_DEPTH."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels{self.get_mark()}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys after it override the base's
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # refused by SafeLoader's construct_mapping, naming the line
            if key in seen:
                raise yaml.YAMLError(f"duplicate key {key!r}{key_node.start_mark}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(data: bytes, where: str):
    """The value of a YAML document (UTF-8), within MAX_DEPTH and MAX_NODES, aliases expanded; ConfigError
    naming the line otherwise."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})") from None
    try:
        value = yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as e:
        raise ConfigError(" ".join(str(e).replace('in "<unicode string>", ', "").split())) from None
    _check_size(value, where)
    return value


def _check_size(value, where: str) -> None:
    """Walk the tree as the program will (aliases expanded), stopping at the first bound passed."""
    count, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ConfigError(f"{where}: more than {MAX_NODES} values once its aliases are expanded (a YAML bomb?)")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_DEPTH} levels (an alias that contains itself?)")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack += [(child, depth + 1) for child in children]


def resolve_paths(tree: dict, keys: tuple[str, ...], base: Path) -> dict:
    for key in keys:
        tree = _resolved(tree, key.split("."), base)
    return tree


def _resolved(node, parts: list[str], base: Path):
    if not parts:
        if isinstance(node, list):  # a list of files
            return [_absolute(v, base) if isinstance(v, str) else v for v in node]
        return _absolute(node, base) if isinstance(node, str) else node
    head, *rest = parts
    if head == "*" and isinstance(node, list):
        return [_resolved(v, rest, base) for v in node]
    if head == "*" and isinstance(node, dict):
        return {k: _resolved(v, rest, base) for k, v in node.items()}
    if isinstance(node, dict) and head in node:
        return {**node, head: _resolved(node[head], rest, base)}
    return node


def _absolute(value: str, base: Path) -> str:
    """`value` if absolute, else base/value; `ds_configs/...` not found there is the shipped one."""
    path = Path(value).expanduser()
    local = base / path
    shipped = SHIPPED_DS_CONFIGS.joinpath(*path.parts[1:])
    if not path.is_absolute() and not local.exists() and path.parts[:1] == ("ds_configs",) and shipped.is_file():
        return str(shipped)
    return os.path.abspath(local)  # base/absolute is the absolute path


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
    unknown = sorted(map(str, set(data) - set(names)))  # YAML keys may be numbers, null or booleans
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(names)}"
        )
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
        return _coerce_union([a for a in args if a is not type(None)], value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} {value!r}: choose one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if origin is list:
        if args[0] is str and isinstance(value, str):  # `train_files: a.csv`, the one-file form of a list of files
            return [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{where}.{i}") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            number = float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # .nan and .inf pass every `> 0` and `<= x` check
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    # bool is an int subclass: `steps: true` must not pass as 1.
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if tp is int and not -(2**63) <= value < 2**63:  # torch, numpy and DeepSpeed take 64-bit integers
        raise ConfigError(f"{where}: {value} is out of the 64-bit integer range")
    return value


def _coerce_union(types_: list, value, where: str):
    """The first of several accepted types that `value` fits (e.g. validation_files: a mapping or a list)."""
    problems = []
    for tp in types_:
        try:
            return _coerce(tp, value, where)
        except ConfigError as e:
            problems.append(str(e))
    raise ConfigError(" or ".join(problems) if len(problems) > 1 else problems[0])


# Bounds of values that have no natural limit but beyond which a run only exhausts memory or overflows: a batch
# of 16M sequences, a model dimension of 16M, a timeout of 30 days (timedelta and the collectives overflow).
MAX_BATCH = 2**24
MAX_MODEL_SIZE = 2**24
MAX_TIMEOUT_S = 30 * 86400
# Seeds go to torch (64-bit) and numpy (below 2**32) with small offsets per rank and stage.
MAX_SEED = 2**32 - 1
# model.overrides are fields of the model family's config (EarlyBertConfig, EarlyModernBertConfig): a dict the typed
# loader cannot check; their names say what they hold.
PROBABILITY_FIELDS = re.compile(r".*(_prob|dropout).*")
SIZE_FIELDS = re.compile(r"num_hidden_layers|num_attention_heads|.*_size|max_position_embeddings")


def validate_sizes(cfg: TrainingConfig) -> None:
    """The bounds a pre-training and a fine-tuning config share: batches, seeds, timeouts, model overrides."""
    for name, value in {"micro_batch_size": cfg.micro_batch_size, "global_batch_size": cfg.global_batch_size}.items():
        if value > MAX_BATCH:
            raise ConfigError(f"{name}={value} is beyond any device's memory (at most {MAX_BATCH} sequences)")
    for name, value in {"seed": cfg.seed, "earlybert.mask_seed": cfg.earlybert.mask_seed or 0}.items():
        if not 0 <= value <= MAX_SEED:
            raise ConfigError(f"{name}={value} must be in [0, {MAX_SEED}]")
    for name, value in {"step_s": cfg.dist_timeout.step_s, "long_s": cfg.dist_timeout.long_s}.items():
        if value > MAX_TIMEOUT_S:
            raise ConfigError(f"dist_timeout.{name}={value} s is more than {MAX_TIMEOUT_S} s (30 days)")
    for key, value in cfg.model.overrides.items():
        validate_model_override(str(key), value)


def validate_model_override(key: str, value) -> None:
    where = f"model.overrides.{key}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if PROBABILITY_FIELDS.fullmatch(key) and value is not None and not (number and 0 <= value <= 1):
        raise ConfigError(f"{where}: a probability, expected a number in [0, 1], got {value!r}")
    if SIZE_FIELDS.fullmatch(key) and not (number and value == int(value) and 1 <= value <= MAX_MODEL_SIZE):
        raise ConfigError(f"{where}: a size, expected a whole number in [1, {MAX_MODEL_SIZE}], got {value!r}")


def require_positive(values: dict) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"{name} must be > 0, got {value}")


def validate_training(cfg: TrainingConfig, total_steps: int | None) -> None:
    """The checks of the fields every training config shares, the method and the DeepSpeed JSON included;
    total_steps: the run's, where the config alone says it (pre-training), else None (fine-tuning counts in
    epochs of its task)."""
    require_positive(
        {
            "micro_batch_size": cfg.micro_batch_size,
            "global_batch_size": cfg.global_batch_size,
            "checkpoint.interval": cfg.checkpoint.interval,
            "checkpoint.keep": cfg.checkpoint.keep,
            "log.interval": cfg.log.interval,
            "dist_timeout.step_s": cfg.dist_timeout.step_s,
            "dist_timeout.long_s": cfg.dist_timeout.long_s,
        }
    )
    if cfg.nonfinite.max_skipped < 0:
        raise ConfigError(f"nonfinite.max_skipped must be >= 0, got {cfg.nonfinite.max_skipped}")
    if cfg.resume_from is not None and not re.fullmatch(r"step_\d{8}", cfg.resume_from):
        raise ConfigError(
            f"resume_from {cfg.resume_from!r}: expected a checkpoint tag such as step_00001000, the "
            f"name of a folder in {cfg.run_files.checkpoints}"
        )
    validate_sizes(cfg)
    validate_method(cfg.earlybert, total_steps)
    validate_deepspeed(read_deepspeed(cfg), cfg.deepspeed)


def validate_method(method: MethodConfig, total_steps: int | None) -> None:
    """The `earlybert:` section of either config; the draw step and the rewind step only where the run's steps
    are known from the config (pre-training: fine-tuning derives them from epochs of its task)."""
    if method.lambda_heads < 0 or method.lambda_ffn < 0:
        raise ConfigError("earlybert.lambda_heads and lambda_ffn must be >= 0")
    if method.random_like is not None and method.mode != "random":
        raise ConfigError(f"earlybert.random_like is for earlybert.mode=random, not {method.mode}; remove it")
    if total_steps is None:
        return
    if method.mode in ("fixed", "random") and not (method.draw_step and 0 < method.draw_step < total_steps):
        raise ConfigError(
            f"earlybert.mode={method.mode} draws at earlybert.draw_step: set it to a step in "
            f"[1, {total_steps - 1}], got {method.draw_step}"
        )
    first_draw = earliest_draw_step(method)
    if method.use_gates and method.after_draw == "rewind" and not 0 <= method.rewind_step < max(first_draw, 1):
        raise ConfigError(
            f"earlybert.rewind_step={method.rewind_step}: the weights of that step must be saved before the "
            f"earliest draw (step {first_draw}); choose a step in [0, {max(first_draw - 1, 0)}]"
        )


def earliest_draw_step(method: MethodConfig) -> int:
    """The first step the ticket may be drawn at: the fixed and random modes' draw_step, else the detector's
    min_search_steps."""
    return method.draw_step if method.mode in ("fixed", "random") else method.detector.min_search_steps


# ---- DeepSpeed --------------------------------------------------------------------------------


def read_deepspeed(cfg) -> dict:
    """The DeepSpeed JSON named by the run config with `deepspeed_overrides` merged in."""
    try:
        ds = json.loads(Path(cfg.deepspeed).read_bytes(), parse_constant=_refuse_constant)
        _check_size(ds, cfg.deepspeed)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested beyond the parser's stack
        shipped = ", ".join(sorted(p.name for p in SHIPPED_DS_CONFIGS.glob("*.json")))
        raise ConfigError(
            f"deepspeed: cannot read {cfg.deepspeed}: {e}; give a DeepSpeed JSON relative to the "
            f"config file, or ds_configs/NAME.json for one of the project's: {shipped}"
        ) from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: {cfg.deepspeed} holds {type(ds).__name__}, expected a JSON object")
    return _deep_merge(ds, cfg.deepspeed_overrides)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number a DeepSpeed setting can take")


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


# The top-level keys DeepSpeed 0.19's DeepSpeedConfig reads (recorded from the keys it looks up); it ignores any
# other silently, so a misspelt section would go unnoticed.
DEEPSPEED_KEYS = frozenset(
    "activation_checkpointing aio amp autotuning bf16 bfloat16 checkpoint comet comms_logger communication_data_type "
    "compile compression_training csv_monitor curriculum_learning data_efficiency data_types dataloader_drop_last "
    "datastates_ckpt disable_allgather disable_python_gc dump_state eigenvalue elasticity expert_parallel "
    "flops_profiler fp16 gradient_accumulation_steps gradient_allreduce_op gradient_clipping "
    "gradient_predivide_factor graph_harvesting hybrid_engine log_level managed_gradient_accumulation "
    "memory_breakdown nebula optimizer pipeline prescale_gradients progressive_layer_drop quantize_training "
    "scheduler seq_parallel_communication_data_type sparse_attention sparse_gradients steps_per_print "
    "tensor_parallel tensorboard timers torch_autocast train_batch_size train_micro_batch_size_per_gpu "
    "use_data_before_expert_parallelism vocabulary_size wall_clock_breakdown wandb weight_quantization "
    "zero_allow_untested_optimizer zero_force_ds_cpu_optimizer zero_optimization".split()
)


def validate_deepspeed(ds: dict, source: str) -> None:
    unknown = sorted(map(str, set(ds) - DEEPSPEED_KEYS))
    if unknown:
        raise ConfigError(f"{source} (with deepspeed_overrides): {', '.join(unknown)} are not DeepSpeed settings")
    sections = [k for k in ("zero_optimization", "optimizer", "bf16", "fp16") if not isinstance(ds.get(k, {}), dict)]
    if sections:
        raise ConfigError(f"{source} (with deepspeed_overrides): {', '.join(sections)} must be a mapping")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage={stage!r}; DeepSpeed ZeRO has stages 0, 1, 2 and 3")
    owned = [k for k in RUN_OWNED_DS_KEYS if k in ds] + (
        ["optimizer.params.lr"] if "lr" in ds.get("optimizer", {}).get("params", {}) else []
    )
    if owned:
        raise ConfigError(
            f"{source}: {', '.join(owned)} are set by the run config (micro_batch_size, "
            f"global_batch_size, optim.*); remove them from the DeepSpeed JSON"
        )
    opt = ds.get("optimizer", {}).get("type", "")
    if opt.lower() in LAMB_OPTIMIZERS and stage > 0:
        raise ConfigError(
            f"{source}: optimizer {opt} with ZeRO stage {stage} is refused. LAMB scales each layer's update by "
            f"a per-layer trust ratio ||w|| / ||update||; ZeRO partitions flattened parameters across ranks, so "
            f"each rank computes the ratio on a fragment and the update is wrong (DeepSpeed issues #88, #490, "
            f"#1217, #4187). Use LAMB with zero_optimization.stage 0, or AdamW with ZeRO."
        )
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{source}: bf16 and fp16 are both enabled; pick one")
    _parse_deepspeed(ds, source)


def _parse_deepspeed(ds: dict, source: str) -> None:
    """DeepSpeed's own parse of the config (its pydantic models refuse unknown and ill-typed ZeRO, precision and
    monitor settings), here rather than when the engine is built after the process group is up."""
    from deepspeed.runtime.config import DeepSpeedConfig

    batch = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    try:
        DeepSpeedConfig({**ds, **batch})
    except (ValueError, TypeError, KeyError, AttributeError, AssertionError) as e:  # pydantic's error: ValueError
        raise ConfigError(
            f"{source} (with deepspeed_overrides): DeepSpeed refuses it: {' '.join(str(e).split())}"
        ) from None


def deepspeed_config(cfg, world_size: int, load_universal: bool = False, lr: float | None = None) -> dict:
    """The DeepSpeed config the engine is built with: the JSON plus what the run config owns (`cfg`, a
    PretrainConfig or a FinetuneConfig; lr: the peak learning rate, by default the run config's)."""
    ds = read_deepspeed(cfg)
    plan = batch_plan(cfg, world_size)
    ds["train_micro_batch_size_per_gpu"] = plan.micro
    ds["gradient_accumulation_steps"] = plan.accumulation
    ds["train_batch_size"] = plan.global_batch
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})["lr"] = (
        cfg.optim.lr if lr is None else lr
    )
    ds.setdefault("steps_per_print", 2**31 - 1)  # the loop prints its own progress line
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


# ---- batches ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """How a launch splits each optimizer step's global batch: micro x world_size x accumulation."""

    global_batch: int
    world_size: int
    micro: int  # per rank and forward pass
    accumulation: int  # micro-batches per rank and step
    max_micro: int  # the config's micro_batch_size

    def describe(self) -> str:
        text = (
            f"global batch {self.global_batch} = micro-batch {self.micro} x {self.world_size} "
            f"rank{'s' if self.world_size > 1 else ''} x {self.accumulation} accumulation step"
            f"{'s' if self.accumulation > 1 else ''}"
        )
        if self.micro < self.max_micro:
            text += f" (micro_batch_size {self.max_micro} is the per-rank maximum)"
        return text


def plan_batches(global_batch: int, max_micro: int, world_size: int) -> BatchPlan:
    """The largest micro-batch <= max_micro that splits global_batch evenly over world_size ranks (every rank
    takes the same share of every step), and the accumulation that makes up the rest. Users fix the global
    batch (the recipe) and a per-rank maximum (the memory); the ranks are whatever the launch got."""
    per_rank, rest = divmod(global_batch, world_size)
    if rest or not per_rank:
        raise ConfigError(_no_split(global_batch, world_size))
    micro = max(m for m in range(1, min(max_micro, per_rank) + 1) if per_rank % m == 0)
    return BatchPlan(global_batch, world_size, micro, per_rank // micro, max_micro)


def _no_split(global_batch: int, world_size: int) -> str:
    below = global_batch // world_size * world_size
    batches = [b for b in (below, below + world_size) if b > 0]
    batches = [b for b in batches if abs(b - global_batch) == min(abs(c - global_batch) for c in batches)]
    ranks = [r for r in range(1, global_batch + 1) if global_batch % r == 0]
    ranks = [max(r for r in ranks if r < world_size)] + [r for r in ranks if r > world_size][:1]
    return (
        f"global_batch_size={global_batch} cannot be split evenly over {world_size} ranks (every rank takes "
        f"the same share of each step); the nearest global batch that can is "
        f"{' or '.join(map(str, batches))}; or launch on {' or '.join(map(str, ranks))} ranks"
    )


def batch_plan(cfg, world_size: int) -> BatchPlan:
    """The batch plan of a run config or a fine-tuning config on world_size ranks."""
    return plan_batches(cfg.global_batch_size, cfg.micro_batch_size, world_size)


def check_resumed_batch(cfg, state, where) -> None:
    """A resumed run keeps its global batch: its steps, LR schedule and data position count in global batches
    (samples = steps x global batch). The ranks, and with them micro-batch and accumulation, may change."""
    if state.step and state.samples != state.step * cfg.global_batch_size:
        trained = state.samples // state.step
        raise ConfigError(
            f"{where} was trained with global_batch_size={trained}, the config says {cfg.global_batch_size}; "
            f"keep {trained} to resume (the micro-batch and accumulation adapt to the ranks), or use a new run_dir"
        )


class Problems(ConfigError):
    """Several independent problems of a launch, each named."""

    def __init__(self, problems: list[Exception]):
        self.problems = problems
        super().__init__(f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


def gather_problems(errors: tuple, *checks) -> list:
    """Run independent checks (callables) one after another and return their results; raise the only failure,
    or Problems naming every failure, so that a launch says at once all that is wrong with it."""
    results, problems = [], []
    for check in checks:
        try:
            results.append(check())
        except errors as e:  # phases may share their shards: each problem once
            found = e.problems if isinstance(e, Problems) else [e]
            problems += [p for p in found if str(p) not in map(str, problems)]
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise Problems(problems)
    return results

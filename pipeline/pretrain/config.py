"""The typed config of `earlybert train` (pipeline/config.py holds what it shares with fine-tuning): the phases
of shards and steps, the model to start from, the optimizer schedule, the masking."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import (
    ConfigError,
    OptimConfig,
    TrainingConfig,
    earliest_draw_step,
    from_dict,
    read_yaml,
    require_positive,
    validate_training,
    validate_wsd_fields,
)

# The keys that hold paths ("*": every item of a list or value of a mapping), made absolute (pipeline/config.py).
PATHS = ("run_dir", "deepspeed", "phases.*.shards", "earlybert.random_like")


@dataclass
class ModelConfig:
    """The architecture of a fresh run; a resumed run is rebuilt from its checkpoint's architecture.json."""

    # the model family (pipeline/families.py): bert (post-LN BERT, MLM + NSP) or modernbert (pre-LN, GeGLU, rotary,
    # sliding-window attention; MLM only)
    family: Literal["bert", "modernbert"] = "bert"
    # a preset of the family: bert-tiny/mini/small/medium/base/large, modernbert-tiny/mini/base/large; None: the
    # family's tiny one
    preset: str | None = None
    # a Hugging Face checkpoint of the family (directory or hub id) instead of random init: a BERT directory, or a
    # ModernBERT one saved by transformers' save_pretrained
    init_from: str | None = None
    overrides: dict = field(default_factory=dict)  # config fields of the family, e.g. {hidden_dropout_prob: 0.0}
    # init_from without the pre-training heads (an encoder-only BertModel or ModernBertModel): optimizer steps that
    # train the fresh heads alone, the encoder frozen, before the run (pipeline/pretrain/head_warmup.py). None: 100
    # when a head is missing; 0: none. A checkpoint with every head gets none.
    head_warmup_steps: int | None = None


@dataclass
class Phase:
    shards: str  # a directory written by `earlybert prep`; its seq_len is the phase's
    steps: int  # optimizer steps in this phase


@dataclass
class DataConfig:
    # share of maskable tokens selected for MLM (then 80% [MASK], 10% random, 10% kept): BERT's 15%; ModernBERT
    # trains with 30% (launch/configs/modernbert-*.yaml say so)
    mask_prob: float = 0.15
    prefetch: int = 8  # micro-batches prepared ahead by the loader thread


@dataclass(kw_only=True)
class PretrainConfig(TrainingConfig):
    """`earlybert train`: what the training loop must agree with; the DeepSpeed JSON owns the rest."""

    phases: list[Phase]  # BERT's recipe: seq 128 for 90% of the steps, then seq 512
    seed: int = 1234
    micro_batch_size: int = 8
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # resume although a phase the run has begun now has other shards (moved or re-prepared data); refused otherwise
    accept_new_shards: bool = False

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)


def load_pretrain_config(path: str, overrides: list[str] = ()) -> PretrainConfig:
    """Read the YAML config, apply `a.b.c=value` overrides, build and validate the dataclasses."""
    cfg = from_dict(PretrainConfig, read_yaml(path, overrides, PATHS), "")
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    """Checks that need no process group and no data; the DeepSpeed JSON is checked here too."""
    if not cfg.phases:
        raise ConfigError("phases: list at least one {shards: DIR, steps: N}")
    for i, p in enumerate(cfg.phases):
        if p.steps < 1:
            raise ConfigError(f"phases.{i}.steps must be >= 1, got {p.steps}")
    require_positive({"data.prefetch": cfg.data.prefetch, "optim.lr": cfg.optim.lr})
    if (cfg.model.head_warmup_steps or 0) < 0:
        raise ConfigError(f"model.head_warmup_steps must be >= 0 (0: no warm-up), got {cfg.model.head_warmup_steps}")
    if not 0.0 < cfg.data.mask_prob < 1.0:
        raise ConfigError(f"data.mask_prob must be in (0, 1), got {cfg.data.mask_prob}")
    if not 0 <= cfg.optim.warmup_steps <= cfg.total_steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be in [0, total steps {cfg.total_steps}]")
    validate_training(cfg, cfg.total_steps)
    validate_wsd_fields(cfg.optim, "optim")
    if cfg.optim.schedule == "wsd":
        validate_wsd(cfg)


def validate_wsd(cfg: PretrainConfig) -> None:
    """The warmup-stable-decay schedule: the decay follows the warmup, and the draw falls in the stable phase
    between them (the ticket then trains through the schedule's own decay)."""
    total, optim = cfg.total_steps, cfg.optim
    decay_start = optim.wsd_decay_start(total)
    if optim.warmup_steps > decay_start:
        raise ConfigError(
            f"optim: the warmup ({optim.warmup_steps} steps) and the decay (the last {total - decay_start} of "
            f"{total} steps, decay_fraction {optim.decay_fraction}) overlap; lower warmup_steps or decay_fraction"
        )
    first_draw = earliest_draw_step(cfg.earlybert)
    if cfg.earlybert.use_gates and decay_start <= first_draw < total:  # from total on, the run never draws
        setting = "draw_step" if cfg.earlybert.mode in ("fixed", "random") else "detector.min_search_steps"
        raise ConfigError(
            f"earlybert.{setting}={first_draw}: the draw would fall in optim.schedule=wsd's "
            f"decay (from step {decay_start} of {total}), not in its stable phase; draw earlier or lower "
            f"optim.decay_fraction"
        )

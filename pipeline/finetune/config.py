"""The typed config of `earlybert finetune`: YAML file + dotted `key=value` overrides, as `earlybert train`.

Lengths are in epochs of the task's training set (fine-tuning recipes are), turned into optimizer
steps once the data is read. The defaults are EarlyBERT's official fine-tuning recipe
(`finetune/launch_earlybert_glue.sh` and `trainer.py` of VITA-Group/EarlyBERT): search with gates and
L1 at lr 2e-5 under a linear schedule that spans 3 epochs (the search itself stops at the draw, around
0.2 epoch, so the LR there is about 0.93x its peak), lambdas 1e-4, then rewind the ticket to the
pre-trained weights and train it 2 epochs at lr 4e-5 with a fresh optimizer and schedule; the dense
baseline trains 3 epochs at 2e-5. AdamW as transformers' Trainer builds it by default: no weight
decay, epsilon 1e-8 (they replace the DeepSpeed JSON's, which pre-training's recipe sets).

The L1 term is EarlyBERT's per optimizer step whatever the batch layout: the model adds it to every
micro-batch's loss and DeepSpeed divides that loss by the accumulation steps, so a step's gradient
carries lambda once. The official trainer adds it after its own division by gradient accumulation,
so its step carries lambda x accumulation steps; its launch script accumulates 1 step (32 per GPU x 4
GPUs), where the two are the same. Adding it after the division here would make lambda grow with
the micro-batches per rank: the official global batch of 128 on one rank of micro-batch 32 would
search with 4x lambda (tests/test_finetune_recipe.py measures both).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import (
    CheckpointConfig,
    ConfigError,
    MethodConfig,
    OptimConfig,
    TrainingConfig,
    from_dict,
    read_yaml,
    require_positive,
    validate_training,
    validate_wsd_fields,
)
from pipeline.finetune.tasks import TaskConfig


class FineTuneError(ValueError):
    """A model to start from that cannot be fine-tuned as asked; the message says what to change."""


@dataclass
class FinetuneModelConfig:
    # A Hugging Face BERT or ModernBERT directory, an `earlybert export` directory, or a pre-training run directory
    # (its latest checkpoint; a pruned structure is built as saved). The model family is the source's.
    init_from: str
    tokenizer: str | None = None  # tokenizer.json or a directory; default: the one that comes with init_from
    overrides: dict = field(default_factory=dict)  # the family's config fields, e.g. {hidden_dropout_prob: 0.1}


@dataclass
class FinetuneMethodConfig(MethodConfig):
    """The search stage in fine-tuning (YAML key `earlybert:`): as in pre-training, with the official
    recipe's defaults after the draw: rewind to the pre-trained weights, gates kept (not folded) as free
    parameters without L1. The detector's interval and bounds, and draw_step, come from `recipe`."""

    fold_gates: bool = False
    after_draw: Literal["continue", "rewind"] = "rewind"
    optimizer_after_draw: Literal["reset"] = "reset"  # fine-tuning always trains the ticket with a fresh optimizer


@dataclass
class RecipeConfig:
    search_lr: float = 2e-5  # the search stage (gates + L1)
    # The search stage's LR schedule spans this (the official search runs with num_train_epochs 3); the draw
    # ends the stage long before.
    search_epochs: float = 3.0
    detector_interval_epochs: float = 0.02  # earlybert mode: a mask every this much of an epoch
    min_search_epochs: float = 0.1  # earlybert mode: never draw before
    max_search_epochs: float = 0.3  # earlybert mode: draw here at the latest (and say so)
    draw_epoch: float = 0.2  # fixed and random modes draw here (the official scripts' slimming_coef_step)
    lr: float = 4e-5  # training the ticket after the draw
    epochs: float = 2.0
    dense_lr: float = 2e-5  # dense mode: standard fine-tuning
    dense_epochs: float = 3.0
    # each stage's: as pre-training's optim.schedule (pipeline/config.py: OptimConfig), over the stage's steps;
    # wsd's search stage draws in its stable phase, and the ticket's stage decays over its own last steps
    schedule: Literal["linear", "cosine", "constant", "wsd"] = "linear"
    warmup_ratio: float = 0.0  # of each stage's steps
    decay_fraction: float = OptimConfig.decay_fraction  # wsd: of each stage's steps
    decay_shape: Literal["linear", "1-sqrt"] = OptimConfig.decay_shape  # wsd
    # AdamW's, in every stage, replacing the DeepSpeed JSON's (the official trainer's defaults); None keeps the JSON's.
    weight_decay: float | None = 0.0
    adam_epsilon: float | None = 1e-8


@dataclass
class EvalConfig:
    every_steps: int | None = None  # None: at the end of every epoch (and of every stage)
    batch_size: int = 64  # per rank


@dataclass(kw_only=True)
class FinetuneConfig(TrainingConfig):
    """`earlybert finetune`: the task, the model to start from, the recipe's stages in epochs, evaluation."""

    task: TaskConfig
    model: FinetuneModelConfig
    seed: int = 42
    earlybert: FinetuneMethodConfig = field(default_factory=FinetuneMethodConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    micro_batch_size: int = 32
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(interval=500, keep=2))


# The keys that hold paths, made absolute as in a run config (pipeline/config.py).
PATHS = (
    "run_dir",
    "deepspeed",
    "model.init_from",
    "model.tokenizer",
    "task.train_files",
    "task.validation_files",  # a file or a list of files
    "task.validation_files.*",  # a mapping of split names to them
    "earlybert.random_like",
)

# Detector fields and the draw step that the recipe sets from epochs; set in YAML they would be ignored.
DERIVED_SEARCH_KEYS = ("interval", "min_search_steps", "max_search_steps")


def load_finetune_config(path: str, overrides: list[str] = ()) -> FinetuneConfig:
    raw = read_yaml(path, overrides, PATHS)
    cfg = from_dict(FinetuneConfig, raw, "")
    given = raw.get("earlybert") or {}
    derived = [f"earlybert.detector.{k}" for k in DERIVED_SEARCH_KEYS if k in (given.get("detector") or {})]
    derived += ["earlybert.draw_step"] if "draw_step" in given else []
    if derived:
        raise ConfigError(
            f"{', '.join(derived)}: fine-tuning sets these from the epochs of the task; use "
            f"recipe.detector_interval_epochs, recipe.min_search_epochs, recipe.max_search_epochs "
            f"and recipe.draw_epoch"
        )
    validate_finetune(cfg)
    return cfg


def validate_finetune(cfg: FinetuneConfig) -> None:
    r = cfg.recipe
    validate_training(cfg, None)
    require_positive(
        {
            "recipe.search_lr": r.search_lr,
            "recipe.lr": r.lr,
            "recipe.dense_lr": r.dense_lr,
            "recipe.epochs": r.epochs,
            "recipe.dense_epochs": r.dense_epochs,
            "recipe.search_epochs": r.search_epochs,
            "recipe.draw_epoch": r.draw_epoch,
            "recipe.detector_interval_epochs": r.detector_interval_epochs,
            "recipe.max_search_epochs": r.max_search_epochs,
            "eval.batch_size": cfg.eval.batch_size,
        }
    )
    if not 0 <= r.min_search_epochs <= r.max_search_epochs <= r.search_epochs:
        raise ConfigError(
            f"recipe: need 0 <= min_search_epochs ({r.min_search_epochs}) <= max_search_epochs "
            f"({r.max_search_epochs}) <= search_epochs ({r.search_epochs})"
        )
    if cfg.earlybert.rewind_step:
        raise ConfigError(
            f"earlybert.rewind_step={cfg.earlybert.rewind_step}: fine-tuning rewinds to the pre-trained weights "
            f"(the recipe's schedule starts afresh); remove rewind_step"
        )
    if r.draw_epoch > r.search_epochs:
        raise ConfigError(
            f"recipe.draw_epoch ({r.draw_epoch}) is after the search stage's end "
            f"(recipe.search_epochs {r.search_epochs})"
        )
    if r.weight_decay is not None and r.weight_decay < 0:
        raise ConfigError(f"recipe.weight_decay must be >= 0 (or null: the DeepSpeed JSON's), got {r.weight_decay}")
    if r.adam_epsilon is not None and not r.adam_epsilon > 0:
        raise ConfigError(f"recipe.adam_epsilon must be > 0 (or null: the DeepSpeed JSON's), got {r.adam_epsilon}")
    if not 0.0 <= r.warmup_ratio < 1.0:
        raise ConfigError(f"recipe.warmup_ratio must be in [0, 1), got {r.warmup_ratio}")
    validate_wsd_fields(r, "recipe")
    if r.schedule == "wsd":
        validate_wsd(cfg)
    if cfg.eval.every_steps is not None and cfg.eval.every_steps < 1:
        raise ConfigError(f"eval.every_steps must be >= 1 (or left out: every epoch), got {cfg.eval.every_steps}")


def validate_wsd(cfg: FinetuneConfig) -> None:
    """The warmup-stable-decay schedule of every stage: the decay follows the warmup, and the search stage draws
    in its stable phase (the ticket's stage then has a schedule of its own)."""
    r = cfg.recipe
    if r.warmup_ratio + r.decay_fraction > 1:
        raise ConfigError(
            f"recipe: warmup_ratio ({r.warmup_ratio}) and decay_fraction ({r.decay_fraction}) of each stage's steps "
            f"overlap; their sum must be at most 1"
        )
    fixed = cfg.earlybert.mode in ("fixed", "random")
    first_draw = r.draw_epoch if fixed else r.min_search_epochs
    decay_start = (1 - r.decay_fraction) * r.search_epochs
    if cfg.earlybert.use_gates and first_draw >= decay_start:
        raise ConfigError(
            f"recipe.{'draw_epoch' if fixed else 'min_search_epochs'}={first_draw}: the draw would fall in "
            f"schedule wsd's decay of the search stage (from epoch {decay_start:g} of {r.search_epochs:g}), not in "
            f"its stable phase; draw earlier or lower recipe.decay_fraction"
        )


def search_config_in_steps(cfg: FinetuneMethodConfig, recipe: RecipeConfig, steps_per_epoch: int) -> MethodConfig:
    """The search stage with the recipe's epochs turned into steps of this task."""
    steps = lambda epochs: max(1, round(epochs * steps_per_epoch))
    detector = dataclasses.replace(
        cfg.detector,
        interval=steps(recipe.detector_interval_epochs),
        min_search_steps=round(recipe.min_search_epochs * steps_per_epoch),
        max_search_steps=steps(recipe.max_search_epochs),
    )
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(MethodConfig)}
    return MethodConfig(**{**fields, "detector": detector, "draw_step": steps(recipe.draw_epoch)})

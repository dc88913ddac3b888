"""Where a fine-tuning run starts, decided before any process group: the checkpoint resumed (checked against the
task and the tokenizer), or the pre-trained encoder with a new task head, from a Hugging Face or `earlybert
export` directory or from a pre-training run."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import ConfigError
from pipeline.finetune.config import FinetuneConfig, FineTuneError
from pipeline.finetune.data import Task
from pipeline.finetune.tasks import TaskSpec
from pipeline.model import AUTO_CLASSES, EarlyBertConfig
from pipeline.run import checkpoint
from pipeline.run.checkpoint import RunState
from pipeline.run.resume import Start, execution_options
from pipeline.run.rundir import RunDir


def check_tokenizer_fits(cfg: FinetuneConfig, task: Task, model_config) -> None:
    """A tokenizer with more ids than the model has embeddings fails in the forward pass on its first rare word."""
    if len(task.tokenizer) > model_config.vocab_size:
        raise FineTuneError(
            f"the tokenizer ({cfg.model.tokenizer or cfg.model.init_from}: {len(task.tokenizer)} ids) is larger "
            f"than the model's vocabulary ({model_config.vocab_size} embeddings, model.init_from "
            f"{cfg.model.init_from}); use the tokenizer the model was trained with"
        )


def task_fields(spec: TaskSpec) -> dict:
    """What a config needs to build the task's model, and what an export keeps of it."""
    cls = AUTO_CLASSES[spec.auto_class]  # tokcls: the merge replaces this with the family's classes
    fields = {"architectures": [cls.__name__], "num_labels": spec.num_labels}
    if spec.kind in ("classification", "token_classification"):
        fields.update(id2label=spec.id2label, label2id=spec.label2id)
    if spec.kind == "classification":
        fields.update(problem_type="single_label_classification")
    elif spec.kind == "regression":
        fields.update(problem_type="regression")
    return fields


def find_start(cfg: FinetuneConfig, task: Task) -> tuple[Start, torch.nn.Module | None]:
    """The checkpoint to resume from (checkpoint.resume_tag), checked against the task; or step 0 with the
    initial model (pre-trained encoder, new task head), loaded here before any process group."""
    rundir = cfg.run_files
    tag = checkpoint.resume_tag(rundir.checkpoints, cfg.resume_from, cfg.checkpoint.verify)
    if tag is not None:
        state, architecture = checkpoint.read_tag(rundir.checkpoints, tag)
        where = rundir.checkpoints / tag
        if (
            architecture.get("architectures") != task_fields(task.spec)["architectures"]
            or architecture.get("num_labels", 2) != task.spec.num_labels
        ):
            raise ConfigError(
                f"{where} is a checkpoint of another task head ({architecture.get('architectures')}, "
                f"{architecture.get('num_labels')} labels) than task {cfg.task.name or cfg.task.kind}"
            )
        if state.tokenizer_hash != task.tokenizer_hash:
            source = cfg.model.tokenizer or cfg.model.init_from
            raise ConfigError(
                f"{where} was fine-tuned with another tokenizer than {source}'s; use the run's "
                f"model.init_from (and model.tokenizer) or a new run_dir"
            )
        config = EarlyBertConfig.from_dict({**architecture, **execution_options(cfg.model.overrides)})
        return Start(tag, state, config), None
    model = initial_model(cfg, task.spec)
    return Start(None, RunState(tokenizer_hash=task.tokenizer_hash), model.config), model


def initial_model(cfg: FinetuneConfig, spec: TaskSpec) -> torch.nn.Module:
    """The pre-trained encoder with a new task head: from a Hugging Face or `earlybert export` directory,
    or from a pre-training run's latest checkpoint. Gates (initialised to 1) unless the mode is dense."""
    fields = {**task_fields(spec), "use_gates": cfg.earlybert.use_gates, **cfg.model.overrides}
    cls = AUTO_CLASSES[spec.auto_class]  # tokcls: the merge replaces this with the family's classes
    source = Path(cfg.model.init_from)
    torch.manual_seed(cfg.seed)  # the new head's initialisation, the same on every rank
    if RunDir(source).checkpoints.is_dir():
        from pipeline.tools.export import ExportError, load_run_model

        try:
            pretrained, _ = load_run_model(source)
        except ExportError as e:
            raise FineTuneError(str(e)) from None
        config = EarlyBertConfig.from_dict({**pretrained.config.to_dict(), **fields})
        model = cls(config)
        encoder = {k: v for k, v in pretrained.state_dict().items() if k.startswith("bert.")}
        _, unexpected = model.load_state_dict(encoder, strict=False)
        if unexpected:
            raise FineTuneError(f"{source}: the checkpoint's encoder does not fit {cls.__name__}: {unexpected[:5]}")
        return model
    if not (source / "config.json").is_file():
        raise FineTuneError(
            f"model.init_from {source} is neither a model directory (config.json and weights: a "
            f"Hugging Face BERT or an `earlybert export`) nor a run directory with checkpoints/"
        )
    try:
        config = EarlyBertConfig.from_pretrained(str(source), **fields)
        return cls.from_pretrained(str(source), config=config)
    except (OSError, ValueError) as e:
        raise FineTuneError(f"cannot load the model in {source}: {e}") from e

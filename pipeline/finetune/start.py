"""Where a fine-tuning run starts, decided before any process group: the checkpoint resumed (checked against the
task and the tokenizer), or the pre-trained encoder with a new task head, from a Hugging Face or `earlybert
export` directory or from a pre-training run.

The model family (BERT, ModernBERT: pipeline/families.py) is the source's: a directory's config.json model_type
(transformers' "bert" / "modernbert", or ours, "earlybert" / "earlymodernbert", as an export of a pruned ticket
writes it), or a run's checkpoint architecture.json. The task's model is the family's class for the Auto class
of the task kind (pipeline/finetune/tasks.py: AUTO_CLASSES)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PretrainedConfig

from pipeline.config import ConfigError
from pipeline.families import Family, family_of
from pipeline.finetune.config import FinetuneConfig, FineTuneError
from pipeline.finetune.data import Task
from pipeline.finetune.tasks import TaskSpec
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


def task_class(family: Family, spec: TaskSpec) -> type:
    """The family's model class for the task kind."""
    return family.classes[spec.auto_class]


def task_fields(family: Family, spec: TaskSpec) -> dict:
    """What a config needs to build the task's model, and what an export keeps of it."""
    fields = {"architectures": [task_class(family, spec).__name__], "num_labels": spec.num_labels}
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
        family = family_of(architecture)
        if (
            architecture.get("architectures") != task_fields(family, task.spec)["architectures"]
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
        config = family.config_class.from_dict({**architecture, **execution_options(cfg.model.overrides)})
        return Start(tag, state, config), None
    model = initial_model(cfg, task.spec)
    return Start(None, RunState(tokenizer_hash=task.tokenizer_hash), model.config), model


def check_overrides(family: Family, overrides: dict) -> None:
    """transformers' configs keep unknown keyword arguments as attributes: a typo, or another family's field (BERT's
    hidden_dropout_prob for a ModernBERT), would be silently ignored."""
    unknown = sorted(set(overrides) - set(family.config_class().to_dict()))
    if unknown:
        raise FineTuneError(
            f"model.overrides: {', '.join(unknown)} are not {family.config_class.__name__} fields (model.init_from "
            f"is a {family.name} model)"
        )


def initial_model(cfg: FinetuneConfig, spec: TaskSpec) -> torch.nn.Module:
    """The pre-trained encoder with a new task head: from a Hugging Face or `earlybert export` directory,
    or from a pre-training run's latest checkpoint. Gates (initialised to 1) unless the mode is dense."""
    source = Path(cfg.model.init_from)
    torch.manual_seed(cfg.seed)  # the new head's initialisation, the same on every rank
    if RunDir(source).checkpoints.is_dir():
        return model_from_run(cfg, spec, source)
    if not (source / "config.json").is_file():
        raise FineTuneError(
            f"model.init_from {source} is neither a model directory (config.json and weights: a Hugging Face BERT "
            f"or ModernBERT, or an `earlybert export`) nor a run directory with checkpoints/"
        )
    try:
        family = family_of(PretrainedConfig.get_config_dict(str(source))[0])
    except (OSError, ValueError) as e:
        raise FineTuneError(f"model.init_from {source}: {e}") from e
    check_overrides(family, cfg.model.overrides)
    try:
        config = family.config_class.from_pretrained(str(source), **fields_for(cfg, family, spec))
        return task_class(family, spec).from_pretrained(str(source), config=config)
    except (OSError, ValueError) as e:
        raise FineTuneError(f"cannot load the model in {source}: {e}") from e


def fields_for(cfg: FinetuneConfig, family: Family, spec: TaskSpec) -> dict:
    return {**task_fields(family, spec), "use_gates": cfg.earlybert.use_gates, **cfg.model.overrides}


def model_from_run(cfg: FinetuneConfig, spec: TaskSpec, source: Path) -> torch.nn.Module:
    """The task model of a pre-training run's family with the run's encoder (every weight under the task class's
    base_model_prefix: "bert.", "model.") and the parts of the task head the pre-training model has under the same
    names: none for BERT; ModernBERT's head (dense, norm) is its MLM head's, as transformers' ModernBertFor* load it
    from a ModernBertForMaskedLM checkpoint, so that a run and its export (a ModernBertForMaskedLM) start alike."""
    from pipeline.tools.export import ExportError, load_run_model

    try:
        pretrained, _ = load_run_model(source)  # its config is the checkpoint's architecture.json, in its family
    except ExportError as e:
        raise FineTuneError(str(e)) from None
    family = family_of(pretrained.config)
    check_overrides(family, cfg.model.overrides)
    cls = task_class(family, spec)
    model = cls(family.config_class.from_dict({**pretrained.config.to_dict(), **fields_for(cfg, family, spec)}))
    encoder, own = cls.base_model_prefix + ".", model.state_dict()
    weights = {k: v for k, v in pretrained.state_dict().items() if k.startswith(encoder) or k in own}
    _, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise FineTuneError(f"{source}: the checkpoint's encoder does not fit {cls.__name__}: {unexpected[:5]}")
    return model

"""Where a pre-training run starts, decided from files before any process group or model exists.

    fresh run    step 0, the architecture of the config (a preset or a Hugging Face checkpoint)
    resume       RUN/checkpoints/latest (or `resume_from`), verified against its manifest (a damaged
                 latest gives way to the newest intact checkpoint: checkpoint.resume_tag), its run
                 state and architecture checked against the config and the shards (another model,
                 another tokenizer, a phase plan it does not fit are refused with a message saying
                 what to change)

Every check here runs in `earlybert train`'s main() before `distributed.setup()`, so a bad config
fails in a second, on every rank alike, instead of after the process group and engine are built.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_prep import ShardDataset
from pipeline import checkpoint
from pipeline.checkpoint import RunState
from pipeline.config import ConfigError, RunConfig, read_deepspeed, zero_stage
from pipeline.model import EarlyBertConfig, EarlyBertForPreTraining

# How the model computes, not what: a relaunch may switch them with model.overrides (the checkpoint's own
# architecture.json is used otherwise).
EXECUTION_OPTIONS = ("unpad", "activation_checkpointing", "fused_qkv")
# Fields that make a checkpoint belong to a model; the per-layer structure may legitimately change (pruning).
IDENTITY_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "head_size",
    "max_position_embeddings",
    "type_vocab_size",
    "use_nsp",
    "hidden_act",
)


@dataclass
class Start:
    tag: str | None  # checkpoint resumed from; None for a fresh run
    state: RunState
    model_config: EarlyBertConfig


def find_start(cfg: RunConfig, datasets: list[ShardDataset]) -> Start:
    """The checkpoint to resume from (checkpoint.resume_tag), read and checked against the config and the
    shards; or step 0."""
    ckpt_dir = cfg.rundir.checkpoints
    tag = checkpoint.resume_tag(ckpt_dir, cfg.resume_from, cfg.checkpoint.verify)
    if tag is None:
        state = RunState(tokenizer_hash=datasets[0].tokenizer_hash)
        start = Start(None, state, model_config_for(cfg, datasets[0]))
    else:
        state, architecture = checkpoint.read_tag(ckpt_dir, tag)
        check_resume(cfg, state, architecture, datasets, tag)
        start = Start(tag, state, EarlyBertConfig.from_dict({**architecture, **execution_options(cfg.model.overrides)}))
    check_model_fits_data(start.model_config, datasets)
    return start


def model_config_for(cfg: RunConfig, data: ShardDataset) -> EarlyBertConfig:
    """The architecture of a fresh run: a preset (vocabulary from the shards) or a HF checkpoint's."""
    # BertConfig keeps unknown keyword arguments as attributes: a typo would be silently ignored.
    unknown = sorted(set(cfg.model.overrides) - set(EarlyBertConfig().to_dict()))
    if unknown:
        raise ConfigError(f"model.overrides: {', '.join(unknown)} are not EarlyBertConfig fields")
    fields = {"use_gates": cfg.earlybert.use_gates, "use_nsp": data.has_nsp, **cfg.model.overrides}
    try:
        if cfg.model.init_from:
            # The checkpoint's config names its own class (BertModel, BertForMaskedLM, ...); this run trains
            # the pre-training model, and its checkpoints, ticket and exports must say so.
            architectures = [EarlyBertForPreTraining.__name__]
            return EarlyBertConfig.from_pretrained(cfg.model.init_from, architectures=architectures, **fields)
        return EarlyBertConfig.from_preset(
            cfg.model.preset, **{"vocab_size": data.vocab_size, "pad_token_id": data.special_ids["pad"], **fields}
        )
    except (OSError, ValueError, TypeError) as e:  # unknown preset or field, unreadable checkpoint
        raise ConfigError(f"model: {e}") from e


def execution_options(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if k in EXECUTION_OPTIONS}


def open_phases(cfg: RunConfig) -> list[ShardDataset]:
    datasets = [ShardDataset(p.shards) for p in cfg.phases]
    for i, d in enumerate(datasets[1:], 1):
        if d.tokenizer_hash != datasets[0].tokenizer_hash:
            raise ConfigError(
                f"phases.{i}.shards ({d.directory}) was prepared with another tokenizer than "
                f"phases.0.shards ({datasets[0].directory}); prepare both with the same tokenizer.json"
            )
    return datasets


def check_model_fits_data(model_config: EarlyBertConfig, datasets: list[ShardDataset]) -> None:
    d = datasets[0]
    if model_config.vocab_size < d.vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({model_config.vocab_size}) is smaller than the shards' "
            f"tokenizer ({d.vocab_size} ids, {d.directory})"
        )
    longest = max(x.seq_len for x in datasets)
    if model_config.max_position_embeddings < longest:
        raise ConfigError(
            f"shards of seq_len {longest} need max_position_embeddings >= {longest}, "
            f"the model has {model_config.max_position_embeddings}"
        )


def check_resume(cfg: RunConfig, state: RunState, architecture: dict, datasets: list[ShardDataset], tag: str) -> None:
    """Refuse a checkpoint of another model or tokenizer, or a phase plan it does not fit."""
    where = cfg.rundir.checkpoints / tag
    if state.tokenizer_hash != datasets[0].tokenizer_hash:
        raise ConfigError(
            f"{where} was trained on shards of another tokenizer (sha256 {state.tokenizer_hash[:12]}) "
            f"than {datasets[0].directory} ({datasets[0].tokenizer_hash[:12]}); use the run's shards "
            f"or a new run_dir"
        )
    configured = model_config_for(cfg, datasets[0]).to_dict()
    diff = [
        f"{k}: checkpoint {architecture.get(k)!r}, config {configured.get(k)!r}"
        for k in IDENTITY_FIELDS
        if architecture.get(k) != configured.get(k)
    ]
    if diff:
        raise ConfigError(
            f"{where} is a checkpoint of another model than the run config describes:\n  "
            + "\n  ".join(diff)
            + "\nuse a new run_dir, or the model settings of that run"
        )
    if state.plan_step > cfg.total_steps:
        raise ConfigError(f"{where} is at step {state.plan_step}, after the {cfg.total_steps} steps the phases plan")
    if state.phase != phase_at(cfg, state.plan_step):
        raise ConfigError(
            f"{where} is in phase {state.phase} at step {state.plan_step}, but the configured phases put "
            f"step {state.plan_step} in phase {phase_at(cfg, state.plan_step)}; keep the earlier phases' steps"
        )


def phase_at(cfg: RunConfig, step: int) -> int:
    """The phase the next step belongs to (len(phases) when done)."""
    end = 0
    for i, p in enumerate(cfg.phases):
        end += p.steps
        if step < end:
            return i
    return len(cfg.phases)


def resumes_on_other_ranks(cfg: RunConfig, start: Start, world_size: int) -> bool:
    """True when the checkpoint was written by another number of ranks: the resume then goes through
    DeepSpeed's universal checkpoint (ZeRO 1 and 2 only)."""
    state = start.state
    if start.tag is None or state.world_size == world_size:
        return False
    if 3 in (state.zero_stage, zero_stage(read_deepspeed(cfg))):
        raise ConfigError(
            f"{cfg.rundir.checkpoints / start.tag} was written by {state.world_size} ranks; resuming "
            f"on {world_size} goes through DeepSpeed's universal checkpoint, supported here for "
            f"ZeRO stages 1 and 2, not 3: relaunch on {state.world_size} ranks"
        )
    return True

"""Where a pre-training run starts, decided from files before any process group or model exists.

    fresh run    step 0, the architecture of the config (a preset of model.family, or a Hugging Face checkpoint
                 of that family)
    resume       RUN/checkpoints/latest (or `resume_from`), verified against its manifest (a damaged
                 latest gives way to the newest intact checkpoint: checkpoint.resume_tag), its run
                 state and architecture checked against the config and the shards (another model,
                 another tokenizer, a phase plan it does not fit are refused with a message saying
                 what to change)

Every check here runs in `earlybert train`'s main() before `distributed.setup()`, so a bad config
fails in a second, on every rank alike, instead of after the process group and engine are built.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from data_prep import ShardDataset
from pipeline.config import ConfigError
from pipeline.families import FAMILIES, EncoderConfig, Family, family_of
from pipeline.pretrain.config import PretrainConfig
from pipeline.run import checkpoint
from pipeline.run.checkpoint import RunState
from pipeline.run.resume import EXECUTION_OPTIONS, Start, execution_options


def find_start(cfg: PretrainConfig, datasets: list[ShardDataset]) -> Start:
    """The checkpoint to resume from (checkpoint.resume_tag), read and checked against the config and the
    shards; or step 0."""
    ckpt_dir = cfg.run_files.checkpoints
    tag = checkpoint.resume_tag(ckpt_dir, cfg.resume_from, cfg.checkpoint.verify)
    if tag is None:
        state = RunState(tokenizer_hash=datasets[0].tokenizer_hash)
        start = Start(None, state, model_config_for(cfg, datasets[0]))
    else:
        state, architecture = checkpoint.read_tag(ckpt_dir, tag)
        check_resume(cfg, state, architecture, datasets, tag)
        config_class = family_of(architecture).config_class
        start = Start(tag, state, config_class.from_dict({**architecture, **execution_options(cfg.model.overrides)}))
    check_model_fits_data(start.model_config, datasets)
    start.state.phases = phase_records(cfg, datasets)  # saved with every checkpoint from here on
    return start


def phase_records(cfg: PretrainConfig, datasets: list[ShardDataset]) -> list[dict]:
    return [{"shards": p.shards, "seq_len": d.seq_len, "sequences": len(d)} for p, d in zip(cfg.phases, datasets)]


def model_config_for(cfg: PretrainConfig, data: ShardDataset) -> EncoderConfig:
    """The architecture of a fresh run: a preset of model.family (vocabulary and special tokens from the shards) or
    a Hugging Face checkpoint of that family."""
    family = family_of(cfg.model.family)
    # transformers' configs keep unknown keyword arguments as attributes: a typo would be silently ignored.
    unknown = sorted(set(cfg.model.overrides) - set(family.config_class().to_dict()))
    if unknown:
        raise ConfigError(f"model.overrides: {', '.join(unknown)} are not {family.config_class.__name__} fields")
    # MLM + NSP where the shards have sentence pairs (BERT); a family without an NSP head reads them as text
    objective = {"use_nsp": data.has_nsp} if family.nsp else {}
    fields = {"use_gates": cfg.earlybert.use_gates, **objective, **cfg.model.overrides}
    try:
        if cfg.model.init_from:
            check_init_from_family(cfg.model.init_from, family)
            # The checkpoint's config names its own class (BertModel, ModernBertForMaskedLM, ...); this run trains
            # the pre-training model, and its checkpoints, ticket and exports must say so.
            architectures = [family.pretraining_class.__name__]
            return family.config_class.from_pretrained(cfg.model.init_from, architectures=architectures, **fields)
        token_ids = {name: data.special_ids[token] for name, token in family.token_id_fields.items()}
        preset = cfg.model.preset or family.default_preset
        return family.preset(preset, **{"vocab_size": data.vocab_size, **token_ids, **fields})
    except (OSError, ValueError, TypeError) as e:  # unknown preset or field, unreadable checkpoint
        raise ConfigError(f"model: {e}") from e


def check_init_from_family(init_from: str, family: Family) -> None:
    """model.init_from holds a model of model.family (its config.json's model_type): a ModernBERT checkpoint
    read as a BERT config would build another model, silently. A ValueError: model_config_for names the key."""
    model_type = PretrainedConfig.get_config_dict(init_from)[0].get("model_type")
    if model_type in family.model_types:
        return
    try:
        fix = f"set model.family={family_of(model_type).name}"
    except ValueError:
        fix = f"this pipeline trains {' and '.join(FAMILIES)} models"
    raise ValueError(
        f"init_from {init_from} holds a {model_type!r} model, not a {family.name} one (model types "
        f"{', '.join(family.model_types)}); {fix}"
    )


def open_phases(cfg: PretrainConfig) -> list[ShardDataset]:
    datasets = [ShardDataset(p.shards) for p in cfg.phases]
    for i, d in enumerate(datasets[1:], 1):
        if d.tokenizer_hash != datasets[0].tokenizer_hash:
            raise ConfigError(
                f"phases.{i}.shards ({d.directory}) was prepared with another tokenizer than "
                f"phases.0.shards ({datasets[0].directory}); prepare both with the same tokenizer.json"
            )
    return datasets


def check_model_fits_data(model_config: EncoderConfig, datasets: list[ShardDataset]) -> None:
    """The tokenizer, the token ids in every phase's shards and the model's embeddings agree: an id beyond the
    embeddings fails in the forward pass (on some devices it reads another row silently). Masking draws random
    ids from the whole tokenizer, so its vocabulary must fit too, not only the ids in the shards."""
    for i, d in enumerate(datasets):
        # The largest id in the shards, recorded at prep (ShardDataset checks it against the tokenizer); manifests
        # written before it: the tokenizer's largest.
        largest = d.vocab_size - 1 if d.max_token_id is None else d.max_token_id
        if model_config.vocab_size < d.vocab_size:
            raise ConfigError(
                f"the model's vocabulary ({model_config.vocab_size} embeddings) is smaller than phases.{i}.shards' "
                f"({d.directory}): a tokenizer of {d.vocab_size} ids, ids up to {largest} in the shards; prepare "
                f"the shards with the model's tokenizer, or use a model with vocab_size >= {d.vocab_size}"
            )
    longest = max(x.seq_len for x in datasets)
    if model_config.max_position_embeddings < longest:
        raise ConfigError(
            f"shards of seq_len {longest} need max_position_embeddings >= {longest}, "
            f"the model has {model_config.max_position_embeddings}"
        )


def check_batch_fits_data(micro: int, datasets: list[ShardDataset]) -> None:
    """A micro-batch is padded and held whole in memory: one larger than a phase's data only repeats it, and a
    typo (micro_batch_size: 80000) would fill the host's memory before the first step."""
    for i, d in enumerate(datasets):
        if micro > len(d):
            raise ConfigError(
                f"phases.{i}.shards ({d.directory}) holds {len(d)} sequences, fewer than one micro-batch of {micro} "
                f"per rank; lower micro_batch_size and global_batch_size, or prepare more data"
            )


def check_resume(
    cfg: PretrainConfig, state: RunState, architecture: dict, datasets: list[ShardDataset], tag: str
) -> None:
    """Refuse a checkpoint of another model or tokenizer, or a phase plan it does not fit."""
    where = cfg.run_files.checkpoints / tag
    if state.tokenizer_hash != datasets[0].tokenizer_hash:
        raise ConfigError(
            f"{where} was trained on shards of another tokenizer (sha256 {state.tokenizer_hash[:12]}) "
            f"than {datasets[0].directory} ({datasets[0].tokenizer_hash[:12]}); use the run's shards "
            f"or a new run_dir"
        )
    configured = model_config_for(cfg, datasets[0]).to_dict()
    identity = family_of(cfg.model.family).identity_fields
    diff = [
        f"{k}: checkpoint {architecture.get(k)!r}, config {configured.get(k)!r}"
        for k in identity
        if architecture.get(k) != configured.get(k)
    ]
    # A resumed model is built from the checkpoint's architecture.json: model.overrides that differ from it would
    # be ignored (a shape cannot change under the saved weights).
    diff += [
        f"model.overrides.{k}: checkpoint {architecture.get(k)!r}, config {v!r}"
        for k, v in cfg.model.overrides.items()
        if k not in EXECUTION_OPTIONS and k not in identity and architecture.get(k) != v
    ]
    if diff:
        raise ConfigError(
            f"{where} is a checkpoint of another model than the run config describes:\n  "
            + "\n  ".join(diff)
            + "\nuse a new run_dir, or the model settings of that run"
        )
    check_phase_shards(cfg, state, datasets, where)
    if state.plan_step > cfg.total_steps:
        raise ConfigError(f"{where} is at step {state.plan_step}, after the {cfg.total_steps} steps the phases plan")
    if state.phase != phase_at(cfg, state.plan_step):
        raise ConfigError(
            f"{where} is in phase {state.phase} at step {state.plan_step}, but the configured phases put "
            f"step {state.plan_step} in phase {phase_at(cfg, state.plan_step)}; keep the earlier phases' steps"
        )


def check_phase_shards(cfg: PretrainConfig, state: RunState, datasets: list[ShardDataset], where) -> None:
    """The phases the run has begun resume on the shards they trained on (the stream position counts in their
    sequences), unless accept_new_shards says the change is deliberate (moved or re-prepared data). Checkpoints
    written before the run state recorded the phases are not checked."""
    now = phase_records(cfg, datasets)
    changed = [
        f"phases.{i}: the run trained on {old['shards']} (seq_len {old['seq_len']}, {old['sequences']} sequences), "
        f"the config gives {new['shards']} (seq_len {new['seq_len']}, {new['sequences']} sequences)"
        for i, (old, new) in enumerate(zip(state.phases, now))
        if i <= state.phase and old != new
    ]
    if changed and not cfg.accept_new_shards:
        raise ConfigError(
            f"{where}: a phase the run has begun has other shards than it trained on:\n  "
            + "\n  ".join(changed)
            + "\nuse the run's shards, a new run_dir, or accept_new_shards=true to go on from the same position "
            "in the new shards"
        )


def phase_at(cfg: PretrainConfig, step: int) -> int:
    """The phase the next step belongs to (len(phases) when done)."""
    end = 0
    for i, p in enumerate(cfg.phases):
        end += p.steps
        if step < end:
            return i
    return len(cfg.phases)

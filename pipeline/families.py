"""The model families a run can train, one `Family` each: BERT (pipeline/model.py) and ModernBERT
(pipeline/modernbert.py). What the rest of the pipeline needs to know about a family is here, so that the search
stage, the pruner, the engine rebuild, the metrics and the pre-training start never test for a model class:

    config_class, presets         the config, and the named shapes a run config may choose (model.preset)
    model_types                   the config.json model_type values of the family (ours, transformers')
    classes, pretraining_class    the model classes (transformers' Auto class -> ours); the one pre-training trains
    pruned_config, prune_tensors  physical pruning of a config and of name -> tensor dicts (weights, moments)
    flop_counts                   model FLOPs per token, per query-key pair and per masked position
    identity_fields               config fields that make a checkpoint belong to a model (a resume checks them)
    token_id_fields               config fields a fresh model takes from the shards' special tokens
    nsp                           whether the family has a next-sentence head (`use_nsp`)
    pretraining_heads             parameter-name prefix -> pre-training head, for the head warm-up
    model_file                    the model file: self-contained, an export of a pruned model ships it as remote code
    transformers_model            transformers' own class and config of a uniform, gate-free model (the export)
    model_inputs                  the tokenizer's model_input_names (an export's tokenizer_config.json)

`family_of(x)` finds the family of a config, of a config.json / architecture.json dict (its model_type), or
by name ("bert", "modernbert").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import transformers
from transformers import BertConfig, ModernBertConfig, PretrainedConfig

from pipeline import model as bert
from pipeline import modernbert
from pipeline.earlybert import pruner

EncoderConfig = bert.EarlyBertConfig | modernbert.EarlyModernBertConfig


@dataclass(frozen=True)
class FlopCounts:
    """Forward FLOPs of a structure (matrix multiplies), per unit of work: pipeline/run/metrics.py model_flops
    multiplies them by a step's tokens, query-key pairs and masked positions."""

    per_token: float  # every layer's projections and FFN
    per_pair: float  # attention products (scores, weighted values) per query-key pair, global-attention layers
    per_window_pair: float  # the same per pair within the window, sliding-window layers (0: none)
    per_masked: float  # the MLM head's transform and vocabulary projection, per masked position
    half_window: int  # a sliding-window layer's query attends to keys with |i - j| <= half_window


def layer_flop_counts(config, ffn_matrices: int, sliding: list[bool], half_window: int) -> FlopCounts:
    """FlopCounts of a per-layer structure: each layer's own heads and FFN width; ffn_matrices width x hidden
    matrices per FFN (BERT's W_1 and W_2; a GLU's input, gate and output); sliding[i]: layer i attends within
    the window."""
    h, d = config.hidden_size, config.head_size
    per_token = pair = window_pair = 0.0
    layers = zip(config.num_heads_per_layer, config.intermediate_size_per_layer, sliding, strict=True)
    for heads, width, local in layers:
        inner = heads * d
        per_token += 2 * h * 3 * inner + 2 * inner * h + ffn_matrices * 2 * h * width  # Q, K, V, W_O, FFN
        if local:
            window_pair += 2 * 2 * inner  # Q K^T and attn V
        else:
            pair += 2 * 2 * inner
    return FlopCounts(per_token, pair, window_pair, 2 * h * h + 2 * h * config.vocab_size, half_window)


def bert_flop_counts(config: bert.EarlyBertConfig) -> FlopCounts:
    return layer_flop_counts(config, 2, [False] * config.num_hidden_layers, 0)


def modernbert_flop_counts(config: modernbert.EarlyModernBertConfig) -> FlopCounts:
    sliding = [t == modernbert.LOCAL for t in config.layer_types]
    return layer_flop_counts(config, 3, sliding, config.local_attention // 2)


def transformers_fields(config: EncoderConfig, transformers_config: type[PretrainedConfig]) -> dict:
    """The fields of a uniform config that `transformers_config` has too (labels, token ids, dropouts, ...), with
    the one head count and FFN width of its layers."""
    known = transformers_config().to_dict()
    fields = {k: v for k, v in config.to_dict().items() if k in known and k not in ("model_type", "architectures")}
    fields.update(
        num_attention_heads=config.num_heads_per_layer[0], intermediate_size=config.intermediate_size_per_layer[0]
    )
    return fields


def bert_transformers_model(config: bert.EarlyBertConfig, cls: type) -> tuple[type, PretrainedConfig]:
    """EarlyBertFor<X> -> BertFor<X>; EarlyBertForPreTraining without NSP -> BertForMaskedLM."""
    name = cls.__name__.replace("EarlyBert", "Bert", 1)
    if name == "BertForPreTraining" and not config.use_nsp:
        name = "BertForMaskedLM"
    return getattr(transformers, name), BertConfig(**transformers_fields(config, BertConfig))


def modernbert_transformers_model(config: modernbert.EarlyModernBertConfig, cls: type) -> tuple[type, PretrainedConfig]:
    """EarlyModernBert<X> -> ModernBert<X>; the rotary thetas as ModernBertConfig takes them in every version
    (transformers >= 5 turns them into rope_parameters; a local theta of None is the global one)."""
    fields = transformers_fields(config, ModernBertConfig)
    fields.update(
        global_rope_theta=config.rope_theta(modernbert.GLOBAL), local_rope_theta=config.rope_theta(modernbert.LOCAL)
    )
    return getattr(transformers, cls.__name__.replace("EarlyModernBert", "ModernBert", 1)), ModernBertConfig(**fields)


@dataclass(frozen=True)
class Family:
    name: str
    config_class: type[PretrainedConfig]
    presets: dict[str, tuple[int, int, int, int]]  # name -> (layers, hidden, heads, FFN width)
    default_preset: str  # model.preset when the run config names none
    model_types: tuple[str, ...]
    classes: dict[str, type]  # transformers' Auto class -> the family's class (the model file's AUTO_CLASSES)
    pretraining_class: type
    pruned_config: Callable
    prune_tensors: Callable
    flop_counts: Callable[[PretrainedConfig], FlopCounts]
    identity_fields: tuple[str, ...]
    token_id_fields: dict[str, str]  # config field -> the shards' special token (manifest special_ids)
    nsp: bool
    pretraining_heads: dict[str, str]
    model_file: str
    transformers_model: Callable[[EncoderConfig, type], tuple[type, PretrainedConfig]]
    model_inputs: tuple[str, ...]

    def preset(self, name: str, **fields) -> EncoderConfig:
        """The config of preset `name` with `fields`; a preset of another family is refused by name."""
        other = next((f.name for f in FAMILIES.values() if f is not self and name in f.presets), None)
        if other is not None:
            raise ValueError(
                f"preset {name!r} is a {other} preset, and model.family is {self.name}; set model.family={other}, "
                f"or choose one of {sorted(self.presets)}"
            )
        return self.config_class.from_preset(name, **fields)  # refuses an unknown name, listing the family's

    def model_class(self, config: EncoderConfig) -> type:
        """The class a config names: its first `architectures` entry (checkpoints of pre-training runs written
        before the field was set name none: the pre-training model)."""
        classes = {cls.__name__: cls for cls in self.classes.values()}
        name = (config.architectures or [self.pretraining_class.__name__])[0]
        if name not in classes:
            raise ValueError(
                f"architectures names {name!r}, which is not an EarlyBERT {self.name} model class; expected one "
                f"of {sorted(classes)}"
            )
        return classes[name]


# Config fields that make a checkpoint belong to a model, in every family; the per-layer structure may legitimately
# change (pruning).
IDENTITY_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "head_size",
    "max_position_embeddings",
)

BERT = Family(
    name="bert",
    config_class=bert.EarlyBertConfig,
    presets=bert.PRESETS,
    default_preset="bert-tiny",
    model_types=("earlybert", "bert"),
    classes=bert.AUTO_CLASSES,
    pretraining_class=bert.EarlyBertForPreTraining,
    pruned_config=pruner.pruned_config,
    prune_tensors=pruner.prune_tensors,
    flop_counts=bert_flop_counts,
    identity_fields=(*IDENTITY_FIELDS, "type_vocab_size", "use_nsp", "hidden_act"),
    token_id_fields={"pad_token_id": "pad"},
    nsp=True,
    # the MLM transform and bias (its decoder is the word embeddings), the NSP classifier and the pooler it reads
    pretraining_heads={
        "cls.predictions.": "MLM head",
        "cls.seq_relationship.": "NSP classifier",
        "bert.pooler.": "NSP pooler",
    },
    model_file=bert.__file__,
    transformers_model=bert_transformers_model,
    model_inputs=("input_ids", "token_type_ids", "attention_mask"),
)

MODERNBERT = Family(
    name="modernbert",
    config_class=modernbert.EarlyModernBertConfig,
    presets=modernbert.PRESETS,
    default_preset="modernbert-tiny",
    model_types=("earlymodernbert", "modernbert"),
    classes=modernbert.AUTO_CLASSES,
    pretraining_class=modernbert.EarlyModernBertForMaskedLM,
    pruned_config=modernbert.pruned_config,
    prune_tensors=modernbert.prune_tensors,
    flop_counts=modernbert_flop_counts,
    identity_fields=(
        *IDENTITY_FIELDS,
        "hidden_activation",
        "layer_types",
        "local_attention",
        "global_rope_theta",
        "local_rope_theta",
    ),
    token_id_fields={
        "pad_token_id": "pad",
        "cls_token_id": "cls",
        "sep_token_id": "sep",
        "bos_token_id": "cls",
        "eos_token_id": "sep",
    },
    nsp=False,
    # the MLM head (dense, norm) and the decoder's bias (its weight is the token embeddings)
    pretraining_heads={"head.": "MLM head", "decoder.": "MLM decoder bias"},
    model_file=modernbert.__file__,
    transformers_model=modernbert_transformers_model,
    model_inputs=("input_ids", "attention_mask"),  # no segments
)

FAMILIES = {family.name: family for family in (BERT, MODERNBERT)}
_BY_KEY = {key: family for family in FAMILIES.values() for key in (family.name, *family.model_types)}


def family_of(x: str | PretrainedConfig | dict) -> Family:
    """The family of a config, of a config.json / architecture.json dict (its model_type), or of a family name."""
    key = x if isinstance(x, str) else x.get("model_type") if isinstance(x, dict) else x.model_type
    if key not in _BY_KEY:
        known = "; ".join(f"{f.name} (model types {', '.join(f.model_types)})" for f in FAMILIES.values())
        raise ValueError(f"{key!r} is not a model family or model type this pipeline trains: {known}")
    return _BY_KEY[key]


def model_class(config: EncoderConfig) -> type:
    """The class a config names, in its family (Family.model_class)."""
    return family_of(config).model_class(config)

"""`earlybert export RUN --output DIR`: a run's weights as a Hugging Face model directory.

    checkpoint (any ZeRO stage) --zero_to_fp32--> fp32 weights --fold gates--> save_pretrained

Any model family (pipeline/families.py: BERT, ModernBERT): the family is the model_type of the checkpoint's
architecture.json. The model class is the checkpoint's: the `architectures` entry of its architecture.json (a
fine-tuning run's task head, e.g. EarlyBertForSequenceClassification, with its num_labels, id2label, label2id
and problem_type), the family's pre-training model where there is none (pre-training runs).

The gates are folded into the weights they scale (BERT's W_O and W_2, ModernBERT's attention and GLU Wo:
exact), so the export has no EarlyBERT-specific parameters. A uniform structure (every layer with the same
heads and FFN width: the dense baseline) is written as transformers' own class:
  BERT        BertForPreTraining (BertForMaskedLM without the NSP head), BertForMaskedLM,
              BertForSequenceClassification, BertForQuestionAnswering, BertForTokenClassification, BertModel
  ModernBERT  ModernBertForMaskedLM, ModernBertForSequenceClassification, ModernBertForQuestionAnswering,
              ModernBertForTokenClassification, ModernBertModel
A pruned structure is written as the EarlyBERT class with its model file beside the weights (pipeline/model.py
as modeling_earlybert.py, pipeline/modernbert.py as modeling_earlymodernbert.py: each imports nothing from this
project) and an `auto_map` for every Auto class, so that `AutoModelFor<Task>.from_pretrained(DIR,
trust_remote_code=True)` loads it (a pre-training export with a fresh task head) without this project
installed. Its config.json says transformers' model_type ("bert", "modernbert"): AutoConfig and AutoTokenizer
then read it without remote code and without asking whether to run it (the EarlyBERT configs read their
family's transformers model_type as their own).

The tokenizer goes along: tokenizer.json (lower-casing and splitting live in its normalizer and
pre-tokenizer) and tokenizer_config.json, which transformers' AutoTokenizer loads as is, with
model_max_length = the model's max_position_embeddings, the special tokens as the tokenizer names them
([CLS] or <s>, ...: the ones `earlybert prep` found) and the family's model inputs (BERT's token_type_ids;
ModernBERT has no segments).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from transformers import PreTrainedModel

from common import outputs
from data_prep.encode import InputError, load_tokenizer, special_ids
from pipeline.earlybert.detector import Masks
from pipeline.earlybert.pruner import prune_model
from pipeline.families import Family, family_of
from pipeline.run.rundir import RunDir, RunDirError

COMMAND = "earlybert export"  # the marker of the directories it writes (common/outputs.py)


class ExportError(RuntimeError):
    pass


def modeling_file(family: Family) -> str:
    """The name of the family's model file in an export: modeling_earlybert.py, modeling_earlymodernbert.py."""
    return f"modeling_{family.config_class.model_type}.py"


def auto_map(family: Family) -> dict[str, str]:
    """config.json's auto_map of a remote-code export: AutoConfig and every Auto class of the family."""
    module = Path(modeling_file(family)).stem
    classes = {"AutoConfig": family.config_class, **family.classes}
    return {auto: f"{module}.{cls.__name__}" for auto, cls in classes.items()}


def load_run_model(run_dir: Path, tag: str | None = None) -> tuple[PreTrainedModel, str]:
    """The model of a run's checkpoint (the latest complete one by default), in fp32, and its tag."""
    from pipeline.run.checkpoint import ARCHITECTURE, CheckpointError, damage, latest_tag, read_tag

    ckpt_dir = RunDir(run_dir).checkpoints
    try:
        tag = tag or latest_tag(ckpt_dir)
        if tag is None or not (ckpt_dir / tag / ARCHITECTURE).is_file():
            raise ExportError(
                f"{ckpt_dir} has no complete checkpoint{' ' + tag if tag else ''}: train the run first "
                f"(earlybert train --config ...), or pass --tag with one of its step_* folders"
            )
        if problem := damage(ckpt_dir / tag):
            raise ExportError(f"{problem}: pass --tag with an intact step_* folder of {ckpt_dir}")
        state, architecture = read_tag(ckpt_dir, tag)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    try:
        family = family_of(architecture)
        config = family.config_class.from_dict(architecture)
        cls = family.model_class(config)
    except ValueError as e:
        raise ExportError(f"{ckpt_dir / tag / ARCHITECTURE}: {e}") from None
    if state.zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # no ZeRO: DeepSpeed keeps the module's weights in the model-states file (a pickle of its own)
        weights = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)[
            "module"
        ]
    model = cls(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    missing = set(missing) - set(cls._tied_weights_keys or ())
    if unexpected or missing:
        raise ExportError(
            f"checkpoint {ckpt_dir / tag} does not match its {ARCHITECTURE} ({cls.__name__}): "
            f"missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model.tie_weights()
    return model.eval(), tag


def fold_all_gates(model: PreTrainedModel) -> PreTrainedModel:
    """The same function without gate parameters: every unit kept, each gate folded into its weights."""
    if not model.config.use_gates:
        return model
    keep_all = Masks(
        heads=[torch.ones(h, dtype=torch.bool) for h in model.config.num_heads_per_layer],
        ffn=[torch.ones(w, dtype=torch.bool) for w in model.config.intermediate_size_per_layer],
    )
    folded, _ = prune_model(model, keep_all, fold_gates=True)
    return folded.eval()


def transformers_model(model: PreTrainedModel) -> PreTrainedModel:
    """transformers' own class of the model's family with the same weights and config (labels included), for a
    uniform, gate-free structure (Family.transformers_model: EarlyBertFor<X> -> BertFor<X>,
    EarlyModernBert<X> -> ModernBert<X>)."""
    cls, config = family_of(model.config).transformers_model(model.config, type(model))
    plain = cls(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


def save_remote_code_model(model: PreTrainedModel, out: Path) -> None:
    """A pruned model as its EarlyBERT class, with its family's model file and an auto_map for every Auto class;
    config.json's model_type is transformers' (the family's second model type: "bert", "modernbert")."""
    from transformers.utils import CONFIG_NAME

    family = family_of(model.config)
    model.save_pretrained(out)
    shutil.copyfile(family.model_file, out / modeling_file(family))
    config = json.loads((out / CONFIG_NAME).read_text())
    config.update(model_type=family.model_types[1], auto_map=auto_map(family))
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_tokenizer(tokenizer: Path, out: Path, model_max_length: int, model_inputs: tuple[str, ...]) -> None:
    """tokenizer.json with a tokenizer_config.json: its special tokens as the tokenizer names them (the ones
    `earlybert prep` finds: [CLS] or <s>, [SEP] or </s>, ...) and the model's inputs."""
    from transformers import PreTrainedTokenizerFast

    try:
        tok, _, file = load_tokenizer(tokenizer)
        tokens = {f"{name}_token": tok.id_to_token(i) for name, i in special_ids(tok, file).items()}
    except InputError as err:
        raise ExportError(f"{err}: pass --tokenizer with the tokenizer.json the run was trained with") from None
    fast = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer),
        model_max_length=model_max_length,
        model_input_names=list(model_inputs),
        **tokens,
    )
    fast.save_pretrained(out)


def run_tokenizer(run_dir: Path) -> Path:
    """The tokenizer.json of a run: a fine-tuning run's own, or the one beside a pre-training run's shards."""
    try:
        return RunDir(run_dir).tokenizer_file()
    except (RunDirError, KeyError, IndexError, TypeError):
        raise ExportError(
            f"{run_dir} has no tokenizer of its own and names no shards to take it from: "
            f"pass --tokenizer PATH/tokenizer.json"
        ) from None


def export_model(
    model: PreTrainedModel,
    output: Path,
    tokenizer: Path,
    fmt: str = "auto",
    overwrite: bool = False,
    inputs: tuple[Path, ...] = (),
) -> dict:
    """Write an in-memory EarlyBERT model (any family) and a tokenizer.json as a Hugging Face directory (what `earlybert
    export` does once the checkpoint is loaded). The directory appears whole or not at all, and replaces an
    existing one only where an export wrote it, or with overwrite (common/outputs.py); `inputs` (the run)
    are never written."""
    tokenizer = Path(tokenizer)
    if not tokenizer.is_file():
        raise ExportError(f"tokenizer {tokenizer} not found: pass --tokenizer PATH/tokenizer.json")
    folded = fold_all_gates(model)
    if fmt == "bert" and not folded.config.is_uniform:
        raise ExportError(
            "--format bert needs a uniform structure (same heads and FFN width in every layer); "
            "this model is pruned: use --format earlybert"
        )
    as_bert = fmt == "bert" or (fmt == "auto" and folded.config.is_uniform)
    output = Path(output)
    inputs = (*inputs, tokenizer)
    outputs.check_directory_output(output, inputs, COMMAND, overwrite)
    tmp = outputs.staging_dir(output, COMMAND)
    try:
        if as_bert:
            exported = transformers_model(folded)
            exported.save_pretrained(tmp)
        else:
            exported = folded
            save_remote_code_model(folded, tmp)
        save_tokenizer(tokenizer, tmp, folded.config.max_position_embeddings, family_of(folded.config).model_inputs)
        outputs.replace_directory(tmp, output, inputs, COMMAND, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "output": str(output),
        "format": "bert" if as_bert else "earlybert",
        "class": type(exported).__name__,
        "heads_per_layer": folded.config.num_heads_per_layer,
        "ffn_per_layer": folded.config.intermediate_size_per_layer,
        "tokenizer": str(tokenizer),
    }


def export_run(
    run_dir: Path,
    output: Path,
    tag: str | None = None,
    tokenizer: str | None = None,
    fmt: str = "auto",
    overwrite: bool = False,
) -> dict:
    # Refused before minutes of loading: an output over the run, its checkpoints or a folder of other files.
    outputs.check_directory_output(output, (run_dir, *([tokenizer] if tokenizer else [])), COMMAND, overwrite)
    model, tag = load_run_model(run_dir, tag)
    tokenizer = Path(tokenizer) if tokenizer else run_tokenizer(run_dir)
    info = export_model(model, output, tokenizer, fmt, overwrite, inputs=(run_dir,))
    return {**info, "checkpoint": tag}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="earlybert export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="run directory (RUN, with RUN/checkpoints)")
    parser.add_argument("--output", type=Path, required=True, help="the Hugging Face model directory to write")
    parser.add_argument("--tag", help="checkpoint tag (default: the latest complete checkpoint)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the run's shards)")
    parser.add_argument(
        "--format",
        choices=["auto", "bert", "earlybert"],
        default="auto",
        help="auto: transformers' own classes (Bert*, ModernBert*) when the structure is uniform, EarlyBERT remote "
        "code otherwise; bert: transformers' own classes, earlybert: remote code",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output directory that `earlybert export` did not write (never a run directory)",
    )
    args = parser.parse_args(argv)
    try:
        info = export_run(args.run, args.output, args.tag, args.tokenizer, args.format, args.overwrite)
    except (ExportError, FileNotFoundError, outputs.OutputError) as err:
        print(f"earlybert export: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0

"""`earlybert export RUN --output DIR`: a run's weights as a Hugging Face model directory.

    checkpoint (any ZeRO stage) --zero_to_fp32--> fp32 weights --fold gates--> save_pretrained

The gates are folded into W_O and W_2 (exact), so the export has no EarlyBERT-specific parameters.
A uniform structure (every layer with the same heads and FFN width: the dense baseline) is written
as plain transformers `BertForPreTraining` (or `BertForMaskedLM` without the NSP head). A pruned
structure is written as `EarlyBertForPreTraining` with its modeling file beside the weights, so
that `AutoModelForPreTraining.from_pretrained(DIR, trust_remote_code=True)` loads it without this
project installed. The tokenizer of the run's shards goes along.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from pipeline.detector import Masks
from pipeline.model import EarlyBertConfig, EarlyBertForPreTraining
from pipeline.pruner import prune_model

MODELING_FILE = "modeling_earlybert.py"
AUTO_MAP = {
    "AutoConfig": "modeling_earlybert.EarlyBertConfig",
    "AutoModel": "modeling_earlybert.EarlyBertModel",
    "AutoModelForPreTraining": "modeling_earlybert.EarlyBertForPreTraining",
}
SPECIAL_TOKENS = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")


class ExportError(RuntimeError):
    pass


def load_run_model(run_dir: Path, tag: str | None = None) -> tuple[EarlyBertForPreTraining, str]:
    """The model of a run's checkpoint (the latest complete one by default), in fp32, and its tag."""
    from pipeline.checkpoint import ARCHITECTURE, RUN_STATE, CheckpointError, latest_tag

    ckpt_dir = Path(run_dir) / "checkpoints"
    try:
        tag = tag or latest_tag(ckpt_dir)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    if tag is None or not (ckpt_dir / tag / ARCHITECTURE).is_file():
        raise ExportError(f"{ckpt_dir} has no complete checkpoint{' ' + tag if tag else ''}: train the run first "
                          f"(earlybert train --config ...), or pass --tag with one of its step_* folders")
    arch = json.loads((ckpt_dir / tag / ARCHITECTURE).read_text())
    config = EarlyBertConfig(**{k: v for k, v in arch.items() if k not in ("model_type", "transformers_version", "architectures")})
    zero_stage = json.loads((ckpt_dir / tag / RUN_STATE).read_text()).get("zero_stage", 0)
    if zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:  # no ZeRO: DeepSpeed keeps the module's weights in the model-states file (a pickle of its own)
        state = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model = EarlyBertForPreTraining(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if unexpected or set(missing) - tied:
        raise ExportError(f"checkpoint {ckpt_dir / tag} does not match its {ARCHITECTURE}: "
                          f"missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    return model.eval(), tag


def fold_all_gates(model: EarlyBertForPreTraining) -> EarlyBertForPreTraining:
    """The same function without gate parameters: every unit kept, each gate folded into its weights."""
    if not model.config.use_gates:
        return model
    keep_all = Masks(heads=[torch.ones(h, dtype=torch.bool) for h in model.config.num_heads_per_layer],
                     ffn=[torch.ones(w, dtype=torch.bool) for w in model.config.intermediate_size_per_layer])
    folded, _ = prune_model(model, keep_all, fold_gates=True)
    return folded.eval()


def plain_bert(model: EarlyBertForPreTraining):
    """transformers' own BERT class with the same weights, for a uniform, gate-free structure."""
    from transformers import BertConfig, BertForMaskedLM, BertForPreTraining

    c = model.config
    fields = {k: v for k, v in c.to_dict().items() if k in BertConfig().to_dict() and k not in ("model_type", "architectures")}
    fields.update(num_attention_heads=c.num_heads_per_layer[0], intermediate_size=c.intermediate_size_per_layer[0])
    cls = BertForPreTraining if c.use_nsp else BertForMaskedLM
    bert = cls(BertConfig(**fields))
    bert.load_state_dict(model.state_dict(), strict=True)
    return bert.eval()


def save_tokenizer(run_dir: Path, out: Path, tokenizer: str | None) -> Path | None:
    from transformers import PreTrainedTokenizerFast

    if tokenizer is None:
        config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        tokenizer = str(Path(config["phases"][0]["shards"]) / "tokenizer.json")
    if not Path(tokenizer).is_file():
        raise ExportError(f"tokenizer {tokenizer} not found: pass --tokenizer PATH/tokenizer.json")
    # Lower-casing and splitting live in tokenizer.json's normalizer and pre-tokenizer.
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer, **SPECIAL_TOKENS)
    tok.save_pretrained(out)
    return Path(tokenizer)


def export_run(run_dir: Path, output: Path, tag: str | None = None, tokenizer: str | None = None, fmt: str = "auto") -> dict:
    model, tag = load_run_model(run_dir, tag)
    folded = fold_all_gates(model)
    as_bert = fmt == "bert" or (fmt == "auto" and folded.config.is_uniform)
    if fmt == "bert" and not folded.config.is_uniform:
        raise ExportError("--format bert needs a uniform structure (same heads and FFN width in every layer); "
                          "this run is pruned: use --format earlybert")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        if as_bert:
            plain_bert(folded).save_pretrained(tmp)
        else:
            folded.config.auto_map = AUTO_MAP
            folded.save_pretrained(tmp)
            shutil.copyfile(Path(__file__).with_name("model.py"), tmp / MODELING_FILE)
        tok = save_tokenizer(run_dir, tmp, tokenizer)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)  # the export appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"output": str(output), "checkpoint": tag, "format": "bert" if as_bert else "earlybert",
            "heads_per_layer": folded.config.num_heads_per_layer,
            "ffn_per_layer": folded.config.intermediate_size_per_layer, "tokenizer": str(tok)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="earlybert export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run directory (RUN, with RUN/checkpoints)")
    parser.add_argument("--output", type=Path, required=True, help="the Hugging Face model directory to write")
    parser.add_argument("--tag", help="checkpoint tag (default: the latest complete checkpoint)")
    parser.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the run's shards)")
    parser.add_argument("--format", choices=["auto", "bert", "earlybert"], default="auto",
                        help="auto: plain BERT when the structure is uniform, EarlyBERT remote code otherwise")
    args = parser.parse_args(argv)
    try:
        info = export_run(args.run, args.output, args.tag, args.tokenizer, args.format)
    except (ExportError, FileNotFoundError) as err:
        print(f"earlybert export: {err}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2))
    return 0

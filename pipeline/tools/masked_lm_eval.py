"""`earlybert eval RUN --shards DIR`: masked-LM loss and accuracy of a run's model on held-out shards.

Any model family (pipeline/families.py): the run's pre-training model (BERT's MLM + NSP model, ModernBERT's
masked LM). The masks are the trainer's own dynamic masking with a fixed key (seed, phase 0, epoch 0) at the
run's masking rate (data.mask_prob: BERT's 15%, ModernBERT's 30%; --mask-prob to compare runs trained at other
rates on the same inputs), so every run evaluated on the same shards at the same rate sees the same masked
tokens: dense, EarlyBERT and random-pruning runs are compared on identical inputs. Dropout is off. On the GPU
when there is one (fp32, as the checkpoint's master weights); progress on stderr: a bar on a terminal, else a
line now and then.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from common.cli import HelpFormatter
from common.progress import progress_bar
from data_prep import ShardDataset, ShardError
from pipeline.pretrain.loader import mask_tokens
from pipeline.run.command import EXIT_CONFIG, EXIT_FAULT
from pipeline.run.rundir import RunDir, RunDirError

EVAL_SEED = 20210101


@torch.no_grad()
def evaluate(
    model,
    shards: ShardDataset,
    max_sequences: int = 2048,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
    mask_prob: float = 0.15,
) -> dict:
    """Mean MLM loss per masked token and MLM accuracy over the first `max_sequences` sequences, `mask_prob` of
    their maskable tokens selected."""
    model.eval().to(device)
    n = min(len(shards), max_sequences)
    loss_sum, correct, count = 0.0, 0, 0
    with progress_bar("eval", n, "seq", enabled=progress) as bar:
        for start in range(0, n, batch_size):
            indices = np.arange(start, min(start + batch_size, n))
            b = shards.get_batch(indices)
            b["input_ids"], b["labels"] = mask_tokens(
                b["input_ids"],
                b["attention_mask"],
                np.zeros_like(indices),
                indices,
                seed=EVAL_SEED,
                phase=0,
                mask_prob=mask_prob,
                special_ids=shards.special_ids,
                vocab_size=shards.vocab_size,
            )
            inputs = {k: torch.from_numpy(v).to(device) for k, v in b.items() if k != "next_sentence_label"}
            out = model(**inputs, masked_logits_only=True)
            masked = int(out.mlm_count)
            loss_sum += float(out.mlm_loss) * masked
            correct += int(out.mlm_correct)
            count += masked
            bar.update(len(indices))
    return {
        "sequences": n,
        "mask_prob": mask_prob,
        "masked_tokens": count,
        "mlm_loss": loss_sum / max(count, 1),
        "mlm_acc": correct / max(count, 1),
    }


def main(argv: list[str] | None = None) -> int:
    from pipeline.families import family_of
    from pipeline.tools.export import ExportError, load_run_model

    parser = argparse.ArgumentParser(prog="earlybert eval", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("run", type=Path, help="run directory (its latest complete checkpoint is evaluated)")
    parser.add_argument(
        "--shards",
        type=Path,
        required=True,
        help="held-out shards written by `earlybert prep` with the run's tokenizer",
    )
    parser.add_argument("--tag", help="checkpoint tag (default: the latest)")
    parser.add_argument("--max-sequences", type=_positive, default=2048, help="evaluate the first N sequences")
    parser.add_argument("--batch-size", type=_positive, default=64, help="sequences per forward pass")
    parser.add_argument(
        "--mask-prob", type=_fraction, help="share of the maskable tokens to mask (default: the run's data.mask_prob)"
    )
    parser.add_argument(
        "--device",
        type=_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to evaluate on (cpu, cuda, cuda:N)",
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress on stderr")
    args = parser.parse_args(argv)
    try:
        model, tag = load_run_model(args.run, args.tag)
        if not isinstance(model, family_of(model.config).pretraining_class):
            raise ExportError(
                f"{args.run} holds a {type(model).__name__}: `earlybert eval` measures the masked-LM "
                f"loss of pre-training runs"
            )
        run = RunDir(args.run)
        mask_prob = args.mask_prob or run_mask_prob(run)
        shards = ShardDataset(args.shards)
        trained_on = ShardDataset(run.shards(0))
    except (ExportError, RunDirError, ShardError, OSError, ValueError, yaml.YAMLError) as err:
        print(f"earlybert eval: {err}", file=sys.stderr)
        return EXIT_CONFIG
    if shards.tokenizer_hash != trained_on.tokenizer_hash:
        print(
            f"earlybert eval: {args.shards} was written with another tokenizer than the run's shards "
            f"({trained_on.directory}): prepare the held-out text with the run's tokenizer.json",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        scores = evaluate(model, shards, args.max_sequences, args.batch_size, args.device, args.progress, mask_prob)
    except (RuntimeError, OSError) as err:  # out of memory, a device lost, a shard unreadable mid-way
        print(f"earlybert eval: evaluating {args.run} on {args.shards} failed: {err}", file=sys.stderr)
        return EXIT_FAULT
    result = {"run": str(args.run), "checkpoint": tag, "shards": str(args.shards), **scores}
    print(json.dumps(result, indent=2))
    return 0


def run_mask_prob(run: RunDir) -> float:
    """The masking rate the run trained with: its config's data.mask_prob, through the typed config (the default
    where the section or the key is absent)."""
    from pipeline.config import from_dict
    from pipeline.pretrain.config import DataConfig

    return from_dict(DataConfig, run.read_config().get("data") or {}, "data.").mask_prob


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), e.g. 0.15, got {text!r}")
    return value


def _device(text: str) -> torch.device:
    """A torch device this machine has: refused on the command line (exit 2), not mid-evaluation."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: eval runs on cpu or cuda")
    return device

"""`earlybert eval RUN --shards DIR`: masked-LM loss and accuracy of a run's model on held-out shards.

The masks are the trainer's own dynamic masking with a fixed key (seed, phase 0, epoch 0), so every
run evaluated on the same shards sees the same masked tokens: dense, EarlyBERT and random-pruning
runs are compared on identical inputs. Dropout is off. On the GPU when there is one (fp32, as the
checkpoint's master weights); progress on stderr: a bar on a terminal, else a line now and then.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from data_prep import ShardDataset, ShardError
from data_prep.cli import HelpFormatter
from data_prep.progress import progress_bar
from pipeline.loader import mask_tokens
from pipeline.rundir import RunDir, RunDirError

EVAL_SEED = 20210101


@torch.no_grad()
def evaluate(
    model,
    shards: ShardDataset,
    max_sequences: int = 2048,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict:
    """Mean MLM loss per masked token and MLM accuracy over the first `max_sequences` sequences."""
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
                mask_prob=0.15,
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
        "masked_tokens": count,
        "mlm_loss": loss_sum / max(count, 1),
        "mlm_acc": correct / max(count, 1),
    }


def main(argv: list[str] | None = None) -> int:
    from pipeline.export import ExportError, load_run_model
    from pipeline.model import EarlyBertForPreTraining

    parser = argparse.ArgumentParser(prog="earlybert eval", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("run", type=Path, help="run directory (its latest complete checkpoint is evaluated)")
    parser.add_argument(
        "--shards",
        type=Path,
        required=True,
        help="held-out shards written by `earlybert prep` with the run's tokenizer",
    )
    parser.add_argument("--tag", help="checkpoint tag (default: the latest)")
    parser.add_argument("--max-sequences", type=int, default=2048, help="evaluate the first N sequences")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device to evaluate on"
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress on stderr")
    args = parser.parse_args(argv)
    try:
        model, tag = load_run_model(args.run, args.tag)
        if not isinstance(model, EarlyBertForPreTraining):
            raise ExportError(
                f"{args.run} holds a {type(model).__name__}: `earlybert eval` measures the masked-LM "
                f"loss of pre-training runs"
            )
        shards = ShardDataset(args.shards)
        trained_on = ShardDataset(RunDir(args.run).shards(0))
    except (ExportError, RunDirError, ShardError, OSError) as err:
        print(f"earlybert eval: {err}", file=sys.stderr)
        return 1
    if shards.tokenizer_hash != trained_on.tokenizer_hash:
        print(
            f"earlybert eval: {args.shards} was written with another tokenizer than the run's shards "
            f"({trained_on.directory}): prepare the held-out text with the run's tokenizer.json",
            file=sys.stderr,
        )
        return 1
    result = {
        "run": str(args.run),
        "checkpoint": tag,
        "shards": str(args.shards),
        **evaluate(model, shards, args.max_sequences, args.batch_size, args.device, args.progress),
    }
    print(json.dumps(result, indent=2))
    return 0

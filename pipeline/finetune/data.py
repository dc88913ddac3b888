"""Fine-tuning's data: the task read, checked and tokenized before any process group (`prepare_task`), the
tokenizer that comes with the model, and each step's examples (`step_examples`, `collate`): a function of the
seed and the step only, so that a resumed run sees exactly what the interrupted one would have."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.launchers import launched_rank
from pipeline.finetune.config import FinetuneConfig, FineTuneError
from pipeline.finetune.tasks import (
    IGNORED_LABEL,
    INPUTS,
    TaskError,
    TaskSpec,
    encode_classification,
    encode_token_classification,
    load_task,
)
from pipeline.run.rundir import RunDir


@dataclass
class Task:
    spec: TaskSpec
    tokenizer: object  # a fast tokenizer: QA needs its offsets
    train: object  # datasets.Dataset of model inputs and labels
    validation: dict  # split -> (examples, features)
    tokenizer_hash: str

    @property
    def kind(self) -> str:
        return self.spec.kind


def prepare_task(cfg: FinetuneConfig) -> Task:
    """Read, check and tokenize the task's data (every rank alike: it is deterministic). Counts of what
    had to be cut or skipped are printed, never silently dropped."""
    import datasets

    datasets.disable_progress_bars()  # the counts that matter are printed below
    data = load_task(cfg.task)
    tokenizer = load_tokenizer(cfg)
    # Hashed as loaded: encoding leaves its truncation settings in the tokenizer's state, but only when the
    # examples are encoded afresh (not read from the datasets cache), so a hash taken after it changed between
    # a first launch and its relaunch, which was then refused as "another tokenizer".
    tokenizer_hash = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    t, notes = cfg.task, []
    if data.spec.kind == "qa":
        from pipeline.finetune.squad import prepare_train_features, prepare_validation_features

        train, stats = prepare_train_features(data.train, tokenizer, t.max_seq_length, t.doc_stride, t.max_query_length)
        notes.append(
            f"train: {stats.examples} questions in {stats.features} windows; {stats.truncated_questions} "
            f"questions cut to {t.max_query_length} tokens; {len(stats.skipped_ids)} skipped because their "
            f"answer is not in their context (first: {stats.skipped_ids[:3]})"
        )
        validation = {}
        for split, rows in data.validation.items():
            features, stats = prepare_validation_features(
                rows, tokenizer, t.max_seq_length, t.doc_stride, t.max_query_length
            )
            validation[split] = (rows, features)
    else:
        encode = encode_token_classification if data.spec.kind == "token_classification" else encode_classification
        train, cut = encode(data.train, tokenizer, data.spec, t.max_seq_length)
        notes.append(f"train: {len(train)} examples, {cut} truncated to {t.max_seq_length} tokens")
        validation = {}
        for split, rows in data.validation.items():
            features, cut = encode(rows, tokenizer, data.spec, t.max_seq_length)
            validation[split] = (rows, features)
            notes.append(f"{split}: {len(features)} examples, {cut} truncated to {t.max_seq_length} tokens")
    if len(train) < cfg.global_batch_size:
        raise TaskError(
            f"the training split has {len(train)} examples (features), fewer than one batch of "
            f"global_batch_size={cfg.global_batch_size}; lower the batch size or add data"
        )
    if launched_rank(os.environ) == 0:
        for note in notes:
            print(f"[earlybert finetune] {note}", flush=True)
    return Task(data.spec, tokenizer, train, validation, tokenizer_hash)


# The files a Hugging Face tokenizer directory is read from (BERT's WordPiece: vocab.txt).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def load_tokenizer(cfg: FinetuneConfig):
    """The tokenizer that comes with init_from (a Hugging Face or export directory, or a pre-training run's
    shards), or model.tokenizer: a tokenizer.json or a directory."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    key = "model.tokenizer" if cfg.model.tokenizer else "model.init_from"
    source = Path(cfg.model.tokenizer or cfg.model.init_from)
    if not source.exists():
        raise FineTuneError(
            f"{key} {source} does not exist: give a Hugging Face BERT or ModernBERT directory, an `earlybert "
            f"export` directory or a pre-training run directory"
        )
    if RunDir(source).checkpoints.is_dir():
        source = RunDir(source).shards(0) / "tokenizer.json"
    elif source.is_dir() and not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise FineTuneError(
            f"{key} {source} holds no tokenizer ({', '.join(TOKENIZER_FILES)}): give a Hugging Face BERT or "
            f"ModernBERT directory, an `earlybert export` directory, a pre-training run directory, or model.tokenizer"
        )
    try:
        if source.is_file():
            return PreTrainedTokenizerFast(
                tokenizer_file=str(source),
                unk_token="[UNK]",
                sep_token="[SEP]",
                pad_token="[PAD]",
                cls_token="[CLS]",
                mask_token="[MASK]",
            )
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise FineTuneError(
            f"cannot load a tokenizer from {source}: {e}; set model.tokenizer to a tokenizer.json "
            f"or a directory holding one"
        ) from e


def step_examples(
    n: int, seed: int, stage: int, stage_step: int, steps_per_epoch: int, global_batch: int
) -> np.ndarray:
    """The training examples of one step: a permutation per (seed, stage, epoch), the last batch of an
    epoch filled from the epoch's start, so that every step is whole. A function of its arguments only:
    a resumed run sees exactly the examples the interrupted one would have."""
    epoch, k = divmod(stage_step, steps_per_epoch)
    order = np.random.default_rng([seed, stage, epoch]).permutation(n)
    order = np.concatenate([order, order[: steps_per_epoch * global_batch - n]])
    return order[k * global_batch : (k + 1) * global_batch]


def collate(features, indices, tokenizer) -> dict[str, torch.Tensor]:
    """Model inputs of the given features, padded to the longest of them (dynamic padding); per-token labels
    (token classification) are padded with IGNORED_LABEL, which has no loss."""
    rows = features[[int(i) for i in indices]]
    longest = max(len(ids) for ids in rows["input_ids"])
    pad = {"input_ids": tokenizer.pad_token_id, "token_type_ids": 0, "attention_mask": 0, "labels": IGNORED_LABEL}
    per_token = (*INPUTS, "labels") if "labels" in rows and isinstance(rows["labels"][0], list) else INPUTS
    batch = {k: torch.tensor([row + [pad[k]] * (longest - len(row)) for row in rows[k]]) for k in per_token}
    for k in ("labels", "start_positions", "end_positions"):
        if k in rows and k not in batch:
            batch[k] = torch.tensor(rows[k])
    return batch

"""Fixtures shared by the test files: a real corpus and its shards, the tiny run config, the uninterrupted
2-rank ZeRO-1 runs the interrupted and other-launcher runs are compared with (`reference`, and
`eb_reference` with an EarlyBERT draw), and the fine-tuning fixtures (a Hugging Face BERT directory, a
task from the corpus, its config). Helpers that work on them are in runs.py."""

import argparse
import collections
import csv
import inspect
import json
import os
import subprocess

import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from runs import BIN, EARLYBERT, REPO, STEPS, finetune_test_config, finished_run

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIAL = dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")


LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_launcher_variables_leak():
    """A DeepSpeed engine or process group built inside the test process sets the launcher's variables in its
    environment; every later launch inherits them (mpirun and srun ranks read as the deepspeed launcher's, fixed
    ports collide), which failed 20 later tests of one full run. Such work belongs in a subprocess."""
    before = {k: os.environ.get(k) for k in LAUNCH_ENV}
    yield
    leaked = {k: os.environ.get(k) for k in LAUNCH_ENV if os.environ.get(k) != before[k]}
    assert not leaked, f"the test left launcher variables in the test process's environment: {leaked}"


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """A real corpus (text on this machine), a WordPiece tokenizer, NSP shards at seq 32 and 64,
    plus seq-32 shards of another tokenizer."""
    root = tmp_path_factory.mktemp("data")
    prep = [str(BIN / "python"), "-m", "data_prep"]

    def run(*args):
        subprocess.run(prep + list(args), check=True, cwd=root, capture_output=True)

    run("local-corpus", "--output", "corpus.txt", "--max-mb", "1")
    run("tokenizer", "--input", "corpus.txt", "--output", "tok.json", "--vocab-size", "2000", "--lowercase")
    run("tokenizer", "--input", "corpus.txt", "--output", "other.json", "--vocab-size", "1500")
    for name, tok, seq_len in (("seq32", "tok.json", 32), ("seq64", "tok.json", 64), ("other32", "other.json", 32)):
        run("--input", "corpus.txt", "--output", name, "--tokenizer", tok, "--seq-len", str(seq_len), "--workers", "1")
    return root


@pytest.fixture(scope="session")
def config(shards, tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run_dir": "unused",
                "seed": 7,
                "model": {"preset": "bert-tiny"},
                "deepspeed": str(REPO / "ds_configs" / "zero1.json"),
                "phases": [
                    {"shards": str(shards / "seq32"), "steps": STEPS[0]},
                    {"shards": str(shards / "seq64"), "steps": STEPS[1]},
                ],
                # 32 sequences per rank: steps long enough (~0.1 s) to be interrupted at a chosen point
                "micro_batch_size": 32,
                "global_batch_size": 64,
                "optim": {"lr": 2e-3, "warmup_steps": 2},
                "checkpoint": {"interval": 3, "keep": 2},
                "log": {"interval": 4},
            }
        )
    )
    return path


@pytest.fixture(scope="session")
def reference(config, tmp_path_factory):
    return finished_run(config, tmp_path_factory, "reference")


@pytest.fixture(scope="session")
def eb_reference(config, tmp_path_factory):
    return finished_run(config, tmp_path_factory, "eb_reference", *EARLYBERT)


def save_hf(shards, out, model_class, **fields):
    """A Hugging Face directory as users have them: transformers' own `model_class` (BertForMaskedLM, BertModel,
    ModernBertModel, ...; random weights: there is no hub here) with `fields` in its config, and the shards'
    tokenizer."""
    import torch

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(shards / "tok.json"), **SPECIAL)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    model_class(model_class.config_class(vocab_size=len(tokenizer), **fields)).save_pretrained(out)
    return out


def save_hf_bert(shards, out, model_class):
    """save_hf with bert-tiny's shape."""
    bert_tiny = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
    return save_hf(shards, out, model_class, **bert_tiny, max_position_embeddings=128)


def save_hf_modernbert(shards, out, model_class, local_attention: int):
    """save_hf with modernbert-tiny's shape, the given window and the shards' special tokens."""
    from data_prep import ShardDataset

    special = ShardDataset(shards / "seq32").special_ids
    return save_hf(
        shards, out, model_class,
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        local_attention=local_attention, max_position_embeddings=128, pad_token_id=special["pad"],
        cls_token_id=special["cls"], sep_token_id=special["sep"], bos_token_id=special["cls"],
        eos_token_id=special["sep"],
    )  # fmt: skip


MODERNBERT_WINDOW = 16  # local_attention of the fine-tuning tests' ModernBERT: |i - j| <= 8


@pytest.fixture(scope="session")
def hf_modernbert(shards, tmp_path_factory):
    """transformers' ModernBertForMaskedLM saved by save_pretrained: modernbert-tiny's shape with the window, the
    shards' tokenizer and special tokens (random weights: there is no hub here)."""
    from transformers import ModernBertForMaskedLM

    out = tmp_path_factory.mktemp("hf_modernbert")
    return save_hf_modernbert(shards, out, ModernBertForMaskedLM, MODERNBERT_WINDOW)


@pytest.fixture(scope="session")
def hf_bert(shards, tmp_path_factory):
    from transformers import BertForMaskedLM

    return save_hf_bert(shards, tmp_path_factory.mktemp("hf_bert"), BertForMaskedLM)


@pytest.fixture(scope="session")
def task_files(shards, tmp_path_factory):
    """Lines of the local corpus labelled "long" or "short" (string labels: mapped in sorted order)."""
    out = tmp_path_factory.mktemp("task")
    lines = [x.strip() for x in (shards / "corpus.txt").read_text().splitlines() if len(x.split()) >= 4][:400]
    median = sorted(len(x.split()) for x in lines)[len(lines) // 2]
    rows = [{"sentence": x, "label": "long" if len(x.split()) > median else "short"} for x in lines]
    for name, part in (("train.csv", rows[:320]), ("dev.csv", rows[320:])):
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["sentence", "label"])
            writer.writeheader()
            writer.writerows(part)
    return out


@pytest.fixture(scope="session")
def ft_config(hf_bert, task_files, tmp_path_factory):
    """10 steps per epoch; the detector looks every 2 steps, may draw from step 4 and must by step 6."""
    path = tmp_path_factory.mktemp("ft_config") / "finetune.yaml"
    path.write_text(
        yaml.safe_dump(finetune_test_config("unused", task_files, hf_bert, REPO / "ds_configs" / "zero1.json"))
    )
    return path


@pytest.fixture(scope="session")
def tokenizer():
    """A real fast WordPiece tokenizer (uncased, BERT's pair template) trained on docstrings of the standard
    library, so offsets, truncation and overflow behave as with the pre-training tokenizer."""
    lines = [line for m in (inspect, json, collections, argparse, str, dict) for line in inspect.getdoc(m).splitlines()]
    lines += ["the cat sat on the mat", "paris is the capital of france", "what is the capital of france"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        lines,
        trainers.WordPieceTrainer(vocab_size=1000, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        mask_token="[MASK]",
    )

"""Exports that Hugging Face tools use as they are: a tiny gated model pruned in-process to a non-uniform
structure and written by the export code path (no DeepSpeed run), then loaded with transformers' Auto
classes, its fill-mask pipeline, AutoTokenizer and Trainer."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    Trainer,
    TrainingArguments,
)

from pipeline.earlybert.detector import Masks
from pipeline.earlybert.pruner import prune_model
from pipeline.families import BERT
from pipeline.model import (
    EarlyBertConfig,
    EarlyBertForPreTraining,
    EarlyBertForQuestionAnswering,
    EarlyBertForSequenceClassification,
    EarlyBertForTokenClassification,
)
from pipeline.run.checkpoint import ARCHITECTURE, LATEST, RUN_STATE, RunState, tag_for
from pipeline.tools.export import ExportError, auto_map, export_model, export_run, fold_all_gates, load_run_model

transformers.logging.set_verbosity_error()
REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_POSITIONS = 48
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    """A BERT-style WordPiece tokenizer.json trained on the project's README."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        README.read_text().splitlines(),
        trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials, show_progress=False),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


def tiny_config(vocab_size: int, **fields) -> EarlyBertConfig:
    return EarlyBertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS,
        **fields,
    )


def pruned(model):
    """Heads [3, 2] and FFN widths [40, 24], gates kept at non-trivial values (the export folds them)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in model.head_gates() + model.ffn_gates():
            gate.copy_(torch.rand(gate.shape, generator=g) + 0.5)
    masks = Masks(
        heads=[torch.tensor([1, 0, 1, 1], dtype=torch.bool), torch.tensor([0, 1, 0, 1], dtype=torch.bool)],
        ffn=[torch.arange(64) % 8 < 5, torch.arange(64) % 8 < 3],
    )
    small, _ = prune_model(model, masks, fold_gates=False)
    assert small.config.num_heads_per_layer == [3, 2] and small.config.intermediate_size_per_layer == [40, 24]
    return small.eval()


def vocab(tokenizer_file) -> int:
    return Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()


def inputs(vocab_size: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab_size, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    types = (torch.arange(16) >= 8).long().expand(2, -1)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


@pytest.fixture(scope="module")
def pretraining_export(tokenizer_file, tmp_path_factory):
    """(in-memory pruned EarlyBertForPreTraining with gates, its export directory)"""
    torch.manual_seed(0)
    model = pruned(EarlyBertForPreTraining(tiny_config(vocab(tokenizer_file))))
    out = tmp_path_factory.mktemp("export") / "pretraining"
    info = export_model(model, out, tokenizer_file)
    assert info["format"] == "earlybert" and info["class"] == "EarlyBertForPreTraining"
    return model, out


def test_pruned_pretraining_export_loads_with_remote_code_and_computes_the_same(pretraining_export):
    model, out = pretraining_export
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["auto_map"] == auto_map(BERT) and len(auto_map(BERT)) == 7
    assert config["architectures"] == ["EarlyBertForPreTraining"] and config["num_heads_per_layer"] == [3, 2]
    assert (out / "modeling_earlybert.py").read_text() == (REPO / "pipeline" / "model.py").read_text()
    exported = AutoModelForPreTraining.from_pretrained(out, trust_remote_code=True).eval()
    assert type(exported).__name__ == "EarlyBertForPreTraining" and not exported.config.use_gates
    batch = inputs(model.config.vocab_size)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        ours, theirs = model(**batch), exported(**batch)
        as_tuple = exported(**batch, return_dict=False)
    assert (ours.prediction_logits[valid] - theirs.prediction_logits[valid]).abs().max() <= 1e-5
    assert (ours.seq_relationship_logits - theirs.seq_relationship_logits).abs().max() <= 1e-5
    # Folded: no gates, so the outputs are transformers' (prediction_logits, seq_relationship_logits).
    assert list(theirs.keys()) == ["prediction_logits", "seq_relationship_logits"] and len(as_tuple) == 2
    assert torch.equal(as_tuple[0], theirs.prediction_logits)
    # Without trust_remote_code the config reads as plain BERT: the pruned weights do not fit and loading fails.
    assert type(AutoConfig.from_pretrained(out)).__name__ == "BertConfig"
    with pytest.raises(Exception, match="size|shape"):
        AutoModelForMaskedLM.from_pretrained(out)


def test_fill_mask_pipeline_runs_on_a_pruned_export(pretraining_export):
    _, out = pretraining_export
    fill = transformers.pipeline("fill-mask", model=str(out), trust_remote_code=True)
    assert type(fill.model).__name__ == "EarlyBertForMaskedLM"
    predictions = fill("the model is [MASK] to the hub.")
    assert len(predictions) == 5 and all(p["token_str"] and 0 <= p["score"] <= 1 for p in predictions)


def test_tokenizer_loads_without_remote_code_or_prompt(pretraining_export, monkeypatch):
    _, out = pretraining_export
    prompts = []
    monkeypatch.setattr("builtins.input", lambda *args: prompts.append(args) or "n")
    tok = AutoTokenizer.from_pretrained(out)
    assert not prompts, "AutoTokenizer asked whether to run the custom code"
    assert tok.model_max_length == MAX_POSITIONS and tok.mask_token == "[MASK]" and tok.pad_token_id == 0
    long = tok(README.read_text()[:5000], truncation=True)["input_ids"]
    assert len(long) == MAX_POSITIONS and long[0] == tok.cls_token_id and long[-1] == tok.sep_token_id
    pair = tok("first sentence", "second one")
    assert pair["token_type_ids"][0] == 0 and pair["token_type_ids"][-1] == 1


def classification_data(tok, n: int = 48) -> Dataset:
    """Three classes, each marked by its words: learnable in a few steps."""
    words = {0: "export model weights", 1: "train shards config", 2: "prune heads ticket"}
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (n,), generator=g).tolist()
    texts = [f"the {words[y]} of run {i}" for i, y in enumerate(labels)]
    return Dataset.from_dict({"text": texts, "label": labels}).map(
        lambda rows: tok(rows["text"], truncation=True), batched=True, remove_columns=["text"]
    )


def test_trainer_fine_tunes_a_pruned_pretraining_export(pretraining_export, tmp_path):
    model, out = pretraining_export
    torch.manual_seed(0)  # the new classifier's init: whatever ran before in the session
    clf = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True, num_labels=3)
    assert type(clf).__name__ == "EarlyBertForSequenceClassification" and clf.classifier.weight.shape == (3, 32)
    encoder = fold_all_gates(model).state_dict()  # what the export wrote
    assert all(torch.equal(v, encoder[k]) for k, v in clf.state_dict().items() if k.startswith("bert.encoder."))

    tok = AutoTokenizer.from_pretrained(out)
    data = classification_data(tok)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=8,
        max_steps=60,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=clf, args=args, train_dataset=data, eval_dataset=data, processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < 0.6 * sum(losses[:5]) / 5, losses
    predictions = trainer.predict(data)  # EarlyBERT's extra output fields are not taken for predictions
    assert predictions.predictions.shape == (len(data), 3)

    trainer.save_model(tmp_path / "fine-tuned")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "fine-tuned", trust_remote_code=True)
    batch = inputs(model.config.vocab_size)
    clf.eval()
    with torch.no_grad():
        assert torch.equal(clf(**batch).logits, reloaded.eval()(**batch).logits)


HEADS = [
    (EarlyBertForSequenceClassification, BertForSequenceClassification, dict(num_labels=3, id2label=LABELS)),
    (EarlyBertForTokenClassification, BertForTokenClassification, dict(num_labels=3, id2label=LABELS)),
    (EarlyBertForQuestionAnswering, BertForQuestionAnswering, {}),
]


@pytest.mark.parametrize("our_class, bert_class, fields", HEADS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("prune", [False, True], ids=["uniform", "pruned"])
def test_fine_tuned_head_exports_keep_head_and_labels(tokenizer_file, tmp_path, our_class, bert_class, fields, prune):
    """A task model exports as transformers' class (uniform) or EarlyBERT's (pruned), head, labels and outputs kept."""
    torch.manual_seed(0)
    model = our_class(tiny_config(vocab(tokenizer_file), **fields)).eval()
    if prune:
        model = pruned(model)
    info = export_model(model, tmp_path / "export", tokenizer_file)
    assert info["format"] == ("earlybert" if prune else "bert")
    auto = getattr(
        transformers,
        {
            "EarlyBertForSequenceClassification": "AutoModelForSequenceClassification",
            "EarlyBertForTokenClassification": "AutoModelForTokenClassification",
            "EarlyBertForQuestionAnswering": "AutoModelForQuestionAnswering",
        }[our_class.__name__],
    )
    exported = auto.from_pretrained(tmp_path / "export", trust_remote_code=prune).eval()
    assert type(exported).__name__ == (our_class.__name__ if prune else bert_class.__name__)
    assert exported.config.id2label == model.config.id2label and exported.config.label2id == model.config.label2id
    batch = inputs(model.config.vocab_size)
    with torch.no_grad():
        ours, theirs = model(**batch), exported(**batch)
    for name in ("start_logits", "end_logits") if our_class is EarlyBertForQuestionAnswering else ("logits",):
        assert (getattr(ours, name) - getattr(theirs, name)).abs().max() <= 1e-5


def write_checkpoint(run_dir: Path, model, step: int = 3) -> None:
    """A ZeRO-0 checkpoint as the training loop lays it out (pipeline/run/checkpoint.py), without DeepSpeed."""
    ckpt = run_dir / "checkpoints"
    folder = ckpt / tag_for(step)
    folder.mkdir(parents=True)
    (folder / RUN_STATE).write_text(json.dumps(RunState(step=step).to_dict()))
    (folder / ARCHITECTURE).write_text(json.dumps(model.config.to_dict()))
    torch.save({"module": model.state_dict()}, folder / "mp_rank_00_model_states.pt")
    (ckpt / LATEST).write_text(tag_for(step))


def test_load_run_model_builds_the_class_architectures_names(tokenizer_file, tmp_path):
    torch.manual_seed(0)
    task = pruned(EarlyBertForSequenceClassification(tiny_config(vocab(tokenizer_file), id2label=LABELS)))
    task.config.architectures = ["EarlyBertForSequenceClassification"]
    write_checkpoint(tmp_path / "finetune", task)
    loaded, tag = load_run_model(tmp_path / "finetune")
    assert type(loaded) is EarlyBertForSequenceClassification and tag == tag_for(3)
    assert loaded.config.id2label == LABELS and loaded.config.num_heads_per_layer == [3, 2]
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ExportError, match="--tokenizer"):  # a fine-tuning run names no shards
        export_run(tmp_path / "finetune", tmp_path / "out")
    info = export_run(tmp_path / "finetune", tmp_path / "out", tokenizer=str(tokenizer_file))
    assert info["class"] == "EarlyBertForSequenceClassification" and info["checkpoint"] == tag_for(3)

    pretraining = EarlyBertForPreTraining(tiny_config(vocab(tokenizer_file)))  # architectures absent: pre-training
    write_checkpoint(tmp_path / "pretrain", pretraining)
    assert type(load_run_model(tmp_path / "pretrain")[0]) is EarlyBertForPreTraining

"""`earlybert finetune` of the ModernBERT family (pipeline/modernbert.py), through the family registry: the starting
model from a directory saved by transformers or from a pre-training run, and, on 2 ranks over gloo (fp32,
modernbert-tiny with a 16-token window so that the local layers see less than the global ones at 64 tokens), the
EarlyBERT cycle on a classification task (search, draw, rewind, prune, rebuild, train the ticket, evaluate), killed
just after the draw and resumed, and on SQuAD-format QA under ZeRO-3.

The data and the config are the BERT tests' (tests/conftest.py, tests/runs.py); only the model differs.
"""

import pytest
import torch
import yaml
from transformers import BertForMaskedLM, ModernBertForMaskedLM

from conftest import MODERNBERT_WINDOW as WINDOW
from data_prep import ShardDataset
from pipeline.finetune.config import FineTuneError, load_finetune_config
from pipeline.finetune.start import initial_model
from pipeline.finetune.tasks import load_task, task_spec
from pipeline.model import EarlyBertForSequenceClassification
from pipeline.modernbert import (
    EarlyModernBertConfig,
    EarlyModernBertForMaskedLM,
    EarlyModernBertForQuestionAnswering,
    EarlyModernBertForSequenceClassification,
)
from runs import (
    EARLYBERT,
    REPO,
    architecture,
    assert_same_finetuning,
    faulty_train,
    finetune,
    finetune_test_config,
    finish,
    finished_run,
    latest,
    metrics,
    read,
    write_squad_files,
)
from test_hf_export import write_checkpoint
from tiny import spread_gates


def write_config(path, init_from, task_files, **changes):
    """runs.finetune_test_config (10 steps an epoch; the detector looks every 2 steps, draws from step 4, by step 6)
    from `init_from`, with `changes` (a section: replaced whole)."""
    fields = finetune_test_config("unused", task_files, init_from, REPO / "ds_configs" / "zero1.json")
    path.write_text(yaml.safe_dump({**fields, **changes}))
    return path


def start_of(tmp_path, init_from, task_files, *overrides):
    """initial_model of the test config from `init_from`, and the task's spec."""
    cfg = load_finetune_config(str(write_config(tmp_path / "ft.yaml", init_from, task_files)), list(overrides))
    spec = load_task(cfg.task).spec
    return initial_model(cfg, spec), spec


# ---- the starting model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "saved,saved_class,task_class,head",
    [
        ("hf_modernbert", ModernBertForMaskedLM, EarlyModernBertForSequenceClassification, "head."),
        ("hf_bert", BertForMaskedLM, EarlyBertForSequenceClassification, None),
    ],
)
def test_a_transformers_directory_gives_its_familys_task_model_with_its_weights(
    request, task_files, tmp_path, saved, saved_class, task_class, head
):
    """The family is config.json's model_type; the encoder (and ModernBERT's head: dense and norm, as transformers'
    ModernBertForSequenceClassification loads them from a ModernBertForMaskedLM) are the saved weights; the gates 1."""
    saved_dir = request.getfixturevalue(saved)
    model, _ = start_of(tmp_path, saved_dir, task_files)
    assert type(model) is task_class and model.config.use_gates
    assert model.config.architectures == [task_class.__name__] and model.config.id2label == {0: "long", 1: "short"}
    weights, ours = saved_class.from_pretrained(saved_dir).state_dict(), model.state_dict()
    shared = [k for k in weights if k.startswith(model.base_model_prefix + ".") or (head and k.startswith(head))]
    assert len(shared) > 10 and all(torch.equal(ours[k], weights[k]) for k in shared)
    assert all(bool((g == 1).all()) for g in model.head_gates() + model.ffn_gates())


def test_a_modernbert_pretraining_run_gives_its_ticket_with_a_task_head(shards, task_files, tmp_path):
    """A pruned, gated ModernBERT pre-training checkpoint: the task model is built with its per-layer structure, its
    encoder, gates and MLM head's dense and norm carried, its decoder (the vocabulary projection) left behind."""
    data = ShardDataset(shards / "seq32")
    config = EarlyModernBertConfig.from_preset(
        "modernbert-tiny", vocab_size=data.vocab_size, pad_token_id=data.special_ids["pad"], local_attention=WINDOW,
        num_heads_per_layer=[3, 2, 4, 1], intermediate_size_per_layer=[50, 96, 7, 60],
        architectures=["EarlyModernBertForMaskedLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    pretrained = EarlyModernBertForMaskedLM(config)
    spread_gates(pretrained, seed=1)
    write_checkpoint(tmp_path / "pretrain", pretrained)
    model, _ = start_of(tmp_path, tmp_path / "pretrain", task_files)
    assert type(model) is EarlyModernBertForSequenceClassification
    assert model.config.num_heads_per_layer == [3, 2, 4, 1] and model.config.intermediate_size_per_layer[2] == 7
    ours, theirs = model.state_dict(), pretrained.state_dict()
    carried = [k for k in theirs if k.startswith(("model.", "head."))]
    assert all(torch.equal(ours[k], theirs[k]) for k in carried)
    assert set(ours) - set(carried) == {"classifier.weight", "classifier.bias"}


def test_qa_takes_the_familys_class_overrides_are_its_fields_and_another_model_type_is_refused(
    hf_modernbert, task_files, tmp_path
):
    config = write_config(tmp_path / "qa.yaml", hf_modernbert, task_files)
    qa = ["task.kind=qa", "task.text_fields=[question, context]", "task.max_query_length=16"]
    cfg = load_finetune_config(str(config), qa)
    assert type(initial_model(cfg, task_spec(cfg.task))) is EarlyModernBertForQuestionAnswering
    with pytest.raises(FineTuneError, match="hidden_dropout_prob are not EarlyModernBertConfig fields"):
        start_of(tmp_path, hf_modernbert, task_files, "model.overrides={hidden_dropout_prob: 0.1}")
    model, _ = start_of(tmp_path, hf_modernbert, task_files, "model.overrides={classifier_dropout: 0.25}")
    assert model.config.classifier_dropout == 0.25
    (tmp_path / "roberta").mkdir()
    (tmp_path / "roberta" / "config.json").write_text('{"model_type": "roberta"}')
    with pytest.raises(FineTuneError, match="roberta: 'roberta' is not a model family or model type this pipeline"):
        start_of(tmp_path, tmp_path / "roberta", task_files)


# ---- launched runs (2 ranks) ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mb_ft_config(hf_modernbert, task_files, tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("mb_ft_config") / "finetune.yaml", hf_modernbert, task_files)


@pytest.fixture(scope="module")
def mb_ft_reference(mb_ft_config, tmp_path_factory):
    return finished_run(mb_ft_config, tmp_path_factory, "mb_ft_reference", module="pipeline.finetune")


@pytest.mark.slow
def test_earlybert_fine_tuning_of_a_modernbert_classifier(mb_ft_reference):
    ticket = read(mb_ft_reference, "ticket.json")
    assert 4 <= ticket["draw_step"] <= 6 and ticket["heads_per_layer"] == [3, 3, 3, 3]
    assert sum(ticket["ffn_per_layer"]) == round(4 * 96 * 0.6) and ticket["params_after"] < ticket["params_before"]
    m = metrics(mb_ft_reference)
    assert [r["stage"] for r in m] == ["search"] * ticket["draw_step"] + ["ticket"] * 10
    results = read(mb_ft_reference, "results.json")
    assert results["stages"] == ["search", "ticket"] and set(results["final"]["validation"]) == {"accuracy", "macro_f1"}
    assert results["heads_per_layer"] == [3, 3, 3, 3] and results["params_after"] < results["params_before"]
    arch = architecture(mb_ft_reference)
    assert arch["architectures"] == ["EarlyModernBertForSequenceClassification"] and arch["local_attention"] == WINDOW
    assert arch["num_heads_per_layer"] == [3, 3, 3, 3] and arch["id2label"] == {"0": "long", "1": "short"}


@pytest.mark.slow
def test_killed_after_the_draws_checkpoint_resumes_to_the_same_ticket_losses_and_metrics(
    mb_ft_config, mb_ft_reference, tmp_path
):
    """The checkpoint that follows the draw holds the pruned ModernBERT classifier: the resume builds it from its
    architecture.json (the family's config class) before DeepSpeed loads into it, and does not draw again."""
    run_dir = tmp_path / "run"
    draw = read(mb_ft_reference, "ticket.json")["draw_step"]
    script = faulty_train(
        tmp_path, "pipeline.run.checkpoint:save", "after", "args[2].search['ticket']", "pipeline.finetune.loop"
    )
    code, out = finish(finetune(mb_ft_config, run_dir, script=script))
    assert code != 0 and "ticket drawn at step" in out and latest(run_dir) == f"step_{draw:08d}", out
    code, out = finish(finetune(mb_ft_config, run_dir))
    assert code == 0, out
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{draw:08d}'}" in out and "ticket drawn" not in out
    assert_same_finetuning(run_dir, mb_ft_reference)


@pytest.mark.slow
def test_earlybert_question_answering_under_zero3(hf_modernbert, shards, task_files, tmp_path):
    """SQuAD-format QA (the QA model stays padded: its span softmax reads the padding's logits, as transformers'),
    the EarlyBERT cycle under ZeRO-3: search, draw, rebuild of the partitioned engine, the ticket, evaluation."""
    train, dev = write_squad_files(shards / "corpus.txt", tmp_path)
    qa = {
        "kind": "qa",
        "train_files": [str(train)],
        "validation_files": {"validation": [str(dev)]},
        "max_seq_length": 64,
        "doc_stride": 32,
        "max_query_length": 16,
    }
    config = write_config(tmp_path / "qa.yaml", hf_modernbert, task_files, task=qa)
    code, out = finish(finetune(config, tmp_path / "run", f"deepspeed={REPO / 'ds_configs' / 'zero3.json'}"))
    assert code == 0, out
    assert "1 skipped because their answer is not in their context" in out and "ticket drawn at step" in out
    results = read(tmp_path / "run", "results.json")
    assert results["stages"] == ["search", "ticket"] and set(results["final"]["validation"]) == {"exact_match", "f1"}
    assert results["params_after"] < results["params_before"]
    assert architecture(tmp_path / "run")["architectures"] == [EarlyModernBertForQuestionAnswering.__name__]


@pytest.mark.slow
def test_a_modernbert_pruned_in_pre_training_fine_tunes_without_a_search(config, mb_ft_config, tmp_path_factory):
    """init_from a ModernBERT pre-training run (ZeRO-1, drawn and pruned): its latest checkpoint's encoder, built as
    saved, with the run's tokenizer, trained as the ticket it is."""
    modernbert = (
        "model.family=modernbert",
        "model.preset=modernbert-tiny",
        f"model.overrides={{local_attention: {WINDOW}}}",
    )
    lambdas = ("earlybert.lambda_heads=1e-4", "earlybert.lambda_ffn=1e-6")  # test_modernbert_runs.SEARCH's
    pretrained = finished_run(config, tmp_path_factory, "mb_pretrained", *modernbert, *EARLYBERT, *lambdas)
    run_dir = tmp_path_factory.mktemp("mb_ft_from_run") / "run"
    code, out = finish(finetune(mb_ft_config, run_dir, f"model.init_from={pretrained}"))
    assert code == 0, out
    assert "already a ticket" in out
    results, pruned = read(run_dir, "results.json"), read(pretrained, "ticket.json")
    assert results["stages"] == ["ticket"] and results["heads_per_layer"] == pruned["heads_per_layer"]
    assert architecture(run_dir)["intermediate_size_per_layer"] == pruned["ffn_per_layer"]

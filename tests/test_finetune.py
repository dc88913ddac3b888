"""`earlybert finetune` end to end on CPU: a tiny Hugging Face BERT directory, a classification task made
from text on this machine, 2 ranks over gloo under the deepspeed launcher.

`ft_reference` is one uninterrupted ZeRO-1 EarlyBERT fine-tuning run (search, draw, rewind, train the
ticket, evaluate); ZeRO-2 and ZeRO-3 draw the same ticket, and runs killed before and after the draw
resume to its losses and metrics.
"""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from runs import (
    BIN,
    REPO,
    assert_same_finetuning,
    evals,
    faulty_train,
    finetune,
    finish,
    metrics,
    read,
    run_env,
    write_squad_files,
)

pytestmark = pytest.mark.slow  # launches ranks


@pytest.fixture(scope="module")
def ft_reference(ft_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ft_reference") / "run"
    code, out = finish(finetune(ft_config, run_dir))
    assert code == 0, out
    return run_dir


def test_search_draw_rewind_train_and_evaluate(ft_reference):
    ticket = read(ft_reference, "ticket.json")
    assert 4 <= ticket["draw_step"] <= 6 and ticket["heads_per_layer"] == [3, 3]
    m = metrics(ft_reference)
    search = [r for r in m if r["stage"] == "search"]
    trained = [r for r in m if r["stage"] == "ticket"]
    assert len(search) == ticket["draw_step"] and len(trained) == 10  # the ticket trains recipe.epochs (1) whole
    assert all("gate_penalty" in r for r in search) and not any("gate_penalty" in r for r in trained)
    assert trained[0]["lr"] == pytest.approx(1e-3)  # a fresh schedule: the linear decay starts again
    assert [r["step"] for r in m] == list(range(1, len(m) + 1))
    ev = evals(ft_reference)
    assert [e["step"] for e in ev] == [len(m)] and ev[0]["stage"] == "ticket"
    assert set(ev[0]["metrics"]["validation"]) == {"accuracy", "macro_f1"}
    results = read(ft_reference, "results.json")
    assert results["stages"] == ["search", "ticket"] and results["draw_step"] == ticket["draw_step"]
    assert (
        results["final"] == ev[-1]["metrics"] and results["search_s"] > 0 and results["train_s"] > results["search_s"]
    )
    assert results["heads_per_layer"] == [3, 3] and results["ffn_per_layer"] == ticket["ffn_per_layer"]
    architecture = json.loads(
        (
            ft_reference / "checkpoints" / (ft_reference / "checkpoints" / "latest").read_text() / "architecture.json"
        ).read_text()
    )
    assert architecture["architectures"] == ["EarlyBertForSequenceClassification"]
    assert architecture["id2label"] == {"0": "long", "1": "short"} and architecture["use_gates"] is True


def test_a_fine_tuned_run_exports_with_its_head_labels_and_tokenizer(ft_reference, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.tools.export import load_run_model

    out = tmp_path / "export"
    done = subprocess.run(
        [str(BIN / "earlybert"), "export", str(ft_reference), "--output", str(out)],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    exported = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    assert exported.config.id2label == {0: "long", 1: "short"} and exported.config.label2id == {"long": 0, "short": 1}
    tokenizer = AutoTokenizer.from_pretrained(out)  # the run's own tokenizer, no remote code
    batch = tokenizer(
        ["a short line", "a somewhat longer line of text for the classifier"], padding=True, return_tensors="pt"
    )
    ours, _ = load_run_model(ft_reference)
    with torch.no_grad():
        assert torch.allclose(ours(**batch).logits, exported(**batch).logits, atol=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero2_and_zero3_draw_the_same_ticket(ft_config, ft_reference, tmp_path, stage):
    run_dir = tmp_path / "run"
    code, out = finish(finetune(ft_config, run_dir, f"deepspeed={REPO / 'ds_configs' / f'zero{stage}.json'}"))
    assert code == 0, out
    got, ref = read(run_dir, "ticket.json"), read(ft_reference, "ticket.json")
    assert got["draw_step"] == ref["draw_step"] and got["kept_heads"] == ref["kept_heads"]
    for g, r in zip(metrics(run_dir)[: ref["draw_step"]], metrics(ft_reference)):
        assert g["loss"] == pytest.approx(r["loss"], abs=1e-4)
    assert set(evals(run_dir)[-1]["metrics"]["validation"]) == {"accuracy", "macro_f1"}


KILL_POINTS = {
    "before the draw": ("pipeline.run.core:prune_engine", "before"),
    "just after the draw": ("pipeline.run.rundir:RunDir.write_ticket", "after"),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_around_the_draw_resumes_to_the_same_losses_and_metrics(ft_config, ft_reference, tmp_path, point):
    run_dir = tmp_path / "run"
    script = faulty_train(tmp_path, *KILL_POINTS[point], command="pipeline.finetune.loop")
    code, out = finish(finetune(ft_config, run_dir, script=script))
    assert code != 0, out
    code, out = finish(finetune(ft_config, run_dir))
    assert code == 0, out
    assert "resumed from" in out
    assert_same_finetuning(run_dir, ft_reference)


def one_process(args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "pipeline.finetune", *args],
        cwd=cwd,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("task.label_field=category", "no column category; its columns are sentence, label"),
        ("task.name=glue_foo", "task.name 'glue_foo' is not a known task"),
        ("task.num_labels=3", "task.num_labels=3"),
        ("earlybert.draw_step=3", "earlybert.draw_step: fine-tuning sets these from the epochs of the task"),
        ("model.init_from=/nonexistent", "model.init_from /nonexistent does not exist"),
        ("earlybert.rewind_step=2", "fine-tuning rewinds to the pre-trained weights"),
    ],
)
def test_bad_input_stops_before_any_process_group(ft_config, tmp_path, override, message):
    done = one_process(["--config", str(ft_config), f"run_dir={tmp_path / 'run'}", override])
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_empty_validation_split_is_refused(ft_config, task_files, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("sentence,label\n")
    done = one_process(
        ["--config", str(ft_config), f"run_dir={tmp_path / 'run'}", f"task.validation_files={{validation: [{empty}]}}"]
    )
    assert done.returncode == 2 and str(empty) in done.stderr, done.stderr


def test_question_answering_on_squad_json(hf_bert, shards, tmp_path):
    """SQuAD-format JSON made from the corpus (runs.write_squad_files); the answer deliberately not in its context
    is counted and skipped, not dropped silently."""
    write_squad_files(shards / "corpus.txt", tmp_path)
    config = tmp_path / "qa.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "seed": 1,
                "task": {
                    "kind": "qa",
                    "train_files": [str(tmp_path / "train.json")],
                    "validation_files": {"validation": [str(tmp_path / "dev.json")]},
                    "max_seq_length": 64,
                    "doc_stride": 32,
                    "max_query_length": 16,
                },
                "model": {"init_from": str(hf_bert)},
                "earlybert": {"mode": "dense"},
                "recipe": {"dense_lr": 1e-3, "dense_epochs": 2.0},
                "deepspeed": str(REPO / "ds_configs" / "zero1.json"),
                "micro_batch_size": 16,
                "global_batch_size": 16,
            }
        )
    )
    done = one_process(["--config", str(config)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped because their answer is not in their context" in done.stdout
    results = read(tmp_path / "run", "results.json")
    assert results["stages"] == ["dense"] and set(results["final"]["validation"]) == {"exact_match", "f1"}
    assert len(evals(tmp_path / "run")) == 2  # one per epoch


def test_a_model_pruned_in_pre_training_fine_tunes_without_a_search(task_files, tmp_path):
    """init_from a pre-training run directory (written by an earlier version, pruned after its draw): its
    latest checkpoint is built as saved, with its own tokenizer, and trained as the ticket it is."""
    shutil.copytree(REPO / "tests" / "fixtures" / "v0_runs", tmp_path, dirs_exist_ok=True)
    config = tmp_path / "ft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": "ft_run",
                "task": {
                    "kind": "classification",
                    "train_files": [str(task_files / "train.csv")],
                    "validation_files": {"validation": [str(task_files / "dev.csv")]},
                    "text_fields": ["sentence"],
                    "max_seq_length": 32,
                },
                "model": {"init_from": "drawn_run"},
                "recipe": {"lr": 1e-3, "epochs": 1.0},
                "deepspeed": "zero1.json",
                "micro_batch_size": 32,
                "global_batch_size": 32,
            }
        )
    )
    done = one_process(["--config", str(config)], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "already a ticket" in done.stdout
    results = read(tmp_path / "ft_run", "results.json")
    pruned = json.loads((tmp_path / "drawn_run" / "ticket.json").read_text())
    assert results["stages"] == ["ticket"] and results["heads_per_layer"] == pruned["heads_per_layer"]

"""On-disk formats of fine-tuning keep working: fine-tuning runs written by the version before the architecture
change (tests/fixtures/v1_finetune_runs, commit bc3abe3, see its README) still resume to the same losses, learning
rates, evaluations and ticket as the same run trained in one go by that version, and still export."""

import json
import shutil
import subprocess

import pytest

from runs import BIN, REPO, run_env

pytestmark = pytest.mark.slow  # launches training processes

FIXTURE = REPO / "tests" / "fixtures" / "v1_finetune_runs"


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _run(args, cwd):
    return subprocess.run(
        [str(BIN / "python"), "-m", *args], cwd=cwd, env=run_env(), capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def old_runs(tmp_path):
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    return tmp_path


@pytest.mark.parametrize(
    "name, stage, step",
    [
        ("search", "search", 7),  # mid-search: detector FIFO (masks of steps 2, 4, 6), rewind weights of step 0
        ("drawn", "ticket", 18),  # after the draw (step 10): pruned, ticket.json, one evaluation (step 16) written
    ],
)
def test_an_old_fine_tuning_run_resumes_to_the_same_losses_evaluations_and_ticket(old_runs, name, stage, step):
    run = old_runs / f"{name}_run"
    state = json.loads((run / "checkpoints" / f"step_{step:08d}" / "run_state.json").read_text())
    assert (state["step"], state["phase"]) == (step, ["search", "ticket"].index(stage))  # the fixture is what it says
    done = _run(["pipeline.finetune", "--config", "finetune.yaml", f"run_dir={name}_run"], old_runs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in done.stdout, done.stdout

    got, want = _lines(run / "metrics.jsonl"), _lines(old_runs / "expected" / "metrics.jsonl")
    assert [(g["step"], g["stage"]) for g in got] == [(w["step"], w["stage"]) for w in want]
    for g, w in zip(got, want):
        for key in ("loss", "lr", "gate_l1", "gate_penalty", "samples", "epoch"):
            assert (key in g) == (key in w), f"step {g['step']} {key}"
            if key in w:
                assert g[key] == pytest.approx(w[key], abs=1e-6), f"step {g['step']} {key}"

    got, want = _lines(run / "eval.jsonl"), _lines(old_runs / "expected" / "eval.jsonl")
    assert [(g["step"], g["stage"]) for g in got] == [(w["step"], w["stage"]) for w in want]
    for g, w in zip(got, want):
        assert g["metrics"].keys() == w["metrics"].keys()
        for split, metrics in w["metrics"].items():
            assert g["metrics"][split] == pytest.approx(metrics, abs=1e-6), f"eval at step {g['step']}"

    ticket = json.loads((run / "ticket.json").read_text())
    want = json.loads((old_runs / "expected" / "ticket.json").read_text())
    for key in ("draw_step", "forced", "kept_heads", "kept_neurons", "heads_per_layer", "ffn_per_layer", "mask_digest"):
        assert ticket[key] == want[key], key

    results = json.loads((run / "results.json").read_text())
    want = json.loads((old_runs / "expected" / "results.json").read_text())
    for key in ("steps", "stages", "draw_step", "draw_forced", "heads_per_layer", "ffn_per_layer"):
        assert results[key] == want[key], key
    assert results["final"]["validation"] == pytest.approx(want["final"]["validation"], abs=1e-6)

    # The finished run exports as a Hugging Face model of the ticket, with its task head's labels and tokenizer.
    out = old_runs / "export"
    done = _run(["pipeline.cli", "export", f"{name}_run", "--output", str(out)], old_runs)
    assert done.returncode == 0, done.stdout + done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["EarlyBertForSequenceClassification"]
    assert config["id2label"] == {"0": "no", "1": "yes"}
    assert config["num_heads_per_layer"] == ticket["heads_per_layer"]
    assert config["intermediate_size_per_layer"] == ticket["ffn_per_layer"]
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()

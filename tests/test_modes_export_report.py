"""Baselines in the same command (fixed draw step, random pruning, dense), rewinding to an early step and kept gates;
then `earlybert export` (plain BERT for a dense run, remote-code EarlyBERT for a pruned one) and
`earlybert report` on those runs. Single-rank runs of bert-tiny, fp32."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.earlybert.detector import Masks
from pipeline.earlybert.pruner import PrunePlan, gate_values, prune_tensors
from pipeline.tools.export import load_run_model
from runs import BIN, TOTAL, run_env, train_cmd

pytestmark = pytest.mark.slow  # launches ranks

DRAW = 5
REWIND = 2  # the ticket restarts from step 2's weights and LR schedule: the run grows by DRAW - REWIND steps
# A ticket of the gates at a fixed step, rewound to an early step, gates kept, fresh moments.
FIXED_REWIND = (
    "earlybert.mode=fixed",
    f"earlybert.draw_step={DRAW}",
    "earlybert.after_draw=rewind",
    f"earlybert.rewind_step={REWIND}",
    "earlybert.fold_gates=false",
    "earlybert.optimizer_after_draw=reset",
    "earlybert.lambda_heads=0.01",
    "earlybert.lambda_ffn=0.01",
    "checkpoint.keep=10",
    "checkpoint.interval=2",
)


def train(config, run_dir, *overrides) -> Path:
    proc = subprocess.run(
        [str(BIN / "python"), "-m", "pipeline.train", *train_cmd(config, run_dir, *overrides)],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_architecture(run_dir, tag) -> dict:
    return json.loads((run_dir / "checkpoints" / tag / "architecture.json").read_text())


@pytest.fixture(scope="module")
def fixed_rewind(config, tmp_path_factory):
    """Ticket of the gates at a fixed step, rewound to the weights of an early step, gates kept, fresh moments."""
    return train(config, tmp_path_factory.mktemp("fixed") / "run", *FIXED_REWIND)


@pytest.fixture(scope="module")
def random_run(config, tmp_path_factory):
    return train(
        config, tmp_path_factory.mktemp("random") / "run", "earlybert.mode=random", f"earlybert.draw_step={DRAW}"
    )


@pytest.fixture(scope="module")
def dense(config, tmp_path_factory):
    return train(config, tmp_path_factory.mktemp("dense") / "run", "earlybert.mode=dense")


def test_fixed_draw_rewinds_to_an_early_steps_weights_and_schedule_with_gates_kept(fixed_rewind):
    ticket = json.loads((fixed_rewind / "ticket.json").read_text())
    assert ticket["mode"] == "fixed" and ticket["draw_step"] == DRAW and ticket["heads_per_layer"] == [3, 3]
    # The checkpoint written right after the draw holds the rewound weights: step 2's weights sliced to
    # the ticket, gates kept (not folded).
    tag = f"step_{DRAW:08d}"
    arch = checkpoint_architecture(fixed_rewind, tag)
    assert arch["use_gates"] is True and arch["num_heads_per_layer"] == [3, 3]
    model, _ = load_run_model(fixed_rewind, tag)
    start = load_file(fixed_rewind / "start_weights.safetensors")
    at_rewind, _ = load_run_model(fixed_rewind, f"step_{REWIND:08d}")
    assert all(torch.equal(start[k], v) for k, v in at_rewind.named_parameters()), "not the weights of step 2"
    masks = Masks.from_json(
        {
            "heads": ["".join("1" if i in kept else "0" for i in range(4)) for kept in ticket["kept_heads"]],
            "ffn": ["".join("1" if i in kept else "0" for i in range(256)) for kept in ticket["kept_neurons"]],
        }
    )
    expected = prune_tensors(start, PrunePlan.from_masks(masks, 16, fold_gates=False), gate_values(start))
    got = dict(model.named_parameters())
    assert all(torch.equal(got[k], expected[k]) for k in got), "post-draw weights are not the rewound start weights"
    m = records(fixed_rewind)
    assert all("gate_penalty" in r for r in m[:DRAW]) and all(
        "gate_penalty" not in r and "gate_l1" in r for r in m[DRAW:]
    )
    # Steps count on; the schedule goes back to step 2 and runs to its end; the phases grow by 3 steps.
    rewound = DRAW - REWIND
    assert [r["step"] for r in m] == list(range(1, TOTAL + rewound + 1))
    assert m[DRAW]["lr"] == m[REWIND]["lr"] and m[DRAW + 1]["lr"] == m[REWIND + 1]["lr"]
    assert [r["seq_len"] for r in m] == [32] * (8 + rewound) + [64] * 4


def test_a_rewound_run_resumes_to_the_same_losses(fixed_rewind, config, tmp_path):
    """From the checkpoint at the draw and one after it: the plan position, data stream and schedule."""
    for tag in (f"step_{DRAW:08d}", "step_00000008"):
        run = tmp_path / tag
        shutil.copytree(fixed_rewind, run)
        train(config, run, *FIXED_REWIND, f"resume_from={tag}")
        got, want = records(run), records(fixed_rewind)
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for g, w in zip(got, want):
            assert g["loss"] == pytest.approx(w["loss"], abs=1e-6) and g["lr"] == w["lr"], f"step {g['step']}"


def test_random_baseline_prunes_other_units_at_the_same_ratios(random_run, fixed_rewind):
    rnd, fixed = (json.loads((r / "ticket.json").read_text()) for r in (random_run, fixed_rewind))
    assert rnd["mode"] == "random" and rnd["draw_step"] == DRAW
    assert rnd["heads_per_layer"] == fixed["heads_per_layer"] and sum(rnd["ffn_per_layer"]) == sum(
        fixed["ffn_per_layer"]
    )
    assert rnd["mask_digest"] != fixed["mask_digest"]
    assert (
        checkpoint_architecture(random_run, (random_run / "checkpoints" / "latest").read_text())["use_gates"] is False
    )


def test_dense_baseline_has_no_gates_and_no_ticket(dense):
    assert not (dense / "ticket.json").exists()
    arch = checkpoint_architecture(dense, (dense / "checkpoints" / "latest").read_text())
    assert arch["use_gates"] is False and arch["num_heads_per_layer"] == [4, 4]
    assert not any("gate_l1" in r for r in records(dense))


def batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    return ids, mask


def test_export_dense_as_plain_bert_and_pruned_as_remote_code(dense, fixed_rewind, tmp_path):
    from transformers import AutoModelForPreTraining, AutoTokenizer, BertForPreTraining

    for run, fmt in ((dense, "bert"), (fixed_rewind, "earlybert")):
        out = tmp_path / f"export_{fmt}"
        proc = subprocess.run(
            [str(BIN / "earlybert"), "export", str(run), "--output", str(out)],
            env=run_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout[proc.stdout.index("{") :])["format"] == fmt
        ours, _ = load_run_model(run)
        exported = AutoModelForPreTraining.from_pretrained(out, trust_remote_code=True).eval()
        assert isinstance(exported, BertForPreTraining) == (fmt == "bert")
        ids, mask = batch(ours.config.vocab_size)
        with torch.no_grad():
            a = ours(ids, attention_mask=mask)
            b = exported(ids, attention_mask=mask)
        # transformers' names on both sides: a pruned export answers like a plain BERT one
        assert (a.prediction_logits[mask.bool()] - b.prediction_logits[mask.bool()]).abs().max() <= 1e-5
        assert (a.seq_relationship_logits - b.seq_relationship_logits).abs().max() <= 1e-5
        tok = AutoTokenizer.from_pretrained(out)
        assert len(tok) == ours.config.vocab_size and tok.mask_token == "[MASK]"
        assert tok("hello world")["input_ids"][0] == tok.cls_token_id
    # The pruned export loads without this project: nothing from `pipeline` is imported.
    check = (
        "import sys; from transformers import AutoModelForPreTraining;"
        f"m = AutoModelForPreTraining.from_pretrained({str(tmp_path / 'export_earlybert')!r}, trust_remote_code=True);"
        "assert not any(k == 'pipeline' or k.startswith('pipeline.') for k in sys.modules), 'imported pipeline';"
        "print(type(m).__name__, m.config.num_heads_per_layer)"
    )
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "EarlyBertForPreTraining [3, 3]" in proc.stdout, proc.stderr[-2000:]


def test_export_refuses_a_run_without_checkpoints(tmp_path):
    proc = subprocess.run(
        [str(BIN / "earlybert"), "export", str(tmp_path / "run"), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "has no complete checkpoint" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_report_overlays_runs_and_draws_the_ticket(fixed_rewind, dense):
    proc = subprocess.run(
        [str(BIN / "earlybert"), "report", str(fixed_rewind), str(dense)],
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = fixed_rewind / "report"
    md = (report / "report.md").read_text()
    assert "| run (fixed) |" in md and "| run (dense) |" in md
    assert f"drawn at step {DRAW}" in md
    for figure in ("loss", "throughput", "distances", "structure"):
        png = report / f"{figure}.png"
        assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({figure}.png)" in md

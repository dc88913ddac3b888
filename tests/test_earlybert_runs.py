"""EarlyBERT end to end: search with gates, early-bird draw on rank 0, broadcast, prune, engine rebuild,
training on, checkpoints and resume — 2 ranks over gloo, bert-tiny, fp32, ZeRO stages 1, 2 and 3.

`eb_reference` is one uninterrupted ZeRO-1 EarlyBERT run; every interrupted run must end with the
same ticket and the same losses (1e-6); the other stages draw at the same step with the same
ticket up to gates tied within rounding, and the same losses to 1e-4 up to the draw.
"""

import pytest

from runs import (
    EARLYBERT,
    TOTAL,
    architecture,
    assert_other_stage_resumes_from_the_pruned_checkpoint,
    assert_same_losses,
    deepspeed,
    faulty_train,
    finish,
    metrics,
    ticket,
)

pytestmark = pytest.mark.slow


def test_search_draw_prune_rebuild_and_train_on(eb_reference):
    t = ticket(eb_reference)
    assert 4 <= t["draw_step"] <= 6 and t["mode"] == "earlybert"
    assert t["heads_per_layer"] == [3, 3]  # 4 heads per layer, 1/3 pruned layer-wise
    assert sum(t["ffn_per_layer"]) == round(2 * 256 * 0.6)  # 40% of all FFN neurons pruned globally
    assert t["params_after"] < t["params_before"] and t["flops_per_sequence_after"] < t["flops_per_sequence_before"]
    assert [h["step"] for h in t["distance_history"]] == list(range(2, t["draw_step"] + 1, 2))
    # The last checkpoint holds the pruned architecture, gates folded away.
    arch = architecture(eb_reference)
    assert arch["num_heads_per_layer"] == [3, 3] and arch["intermediate_size_per_layer"] == t["ffn_per_layer"]
    assert arch["use_gates"] is False
    m = metrics(eb_reference)
    assert [r["step"] for r in m] == list(range(1, TOTAL + 1))
    assert all("gate_penalty" in r for r in m[: t["draw_step"]]) and not any(
        "gate_penalty" in r for r in m[t["draw_step"] :]
    )
    assert m[-1]["loss"] < m[0]["loss"]


def test_continued_pretraining_from_a_hugging_face_checkpoint_draws_and_exports(config, hf_bert, tmp_path):
    """transformers' own checkpoint names its class (BertForMaskedLM) in its config; the run trains the
    pre-training model, and its ticket, checkpoints and model say so (the draw once failed on the name)."""
    from pipeline.model import EarlyBertForPreTraining
    from pipeline.tools.export import load_run_model

    run_dir = tmp_path / "run"
    code, out = finish(deepspeed(config, run_dir, *EARLYBERT, f"model.init_from={hf_bert}"))
    assert code == 0, out
    t = ticket(run_dir)
    assert t["params_after"] < t["params_before"]
    assert architecture(run_dir)["architectures"] == ["EarlyBertForPreTraining"]
    model, _ = load_run_model(run_dir)
    assert type(model) is EarlyBertForPreTraining and model.config.num_heads_per_layer == t["heads_per_layer"]


KILL_POINTS = {  # what fails, and when
    "before the draw": ("pipeline.run.core:prune_engine", "before"),
    "during the rebuild": ("pipeline.engine.rebuild:restore_engine", "before"),
    "just after the draw": ("pipeline.run.rundir:RunDir.write_ticket", "after"),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_around_the_draw_resumes_to_the_same_ticket_and_losses(config, eb_reference, tmp_path, point):
    run_dir = tmp_path / "run"
    code, out = finish(deepspeed(config, run_dir, *EARLYBERT, script=faulty_train(tmp_path, *KILL_POINTS[point])))
    assert code != 0, out
    assert (run_dir / "ticket.json").exists() == (point == "just after the draw")
    code, out = finish(deepspeed(config, run_dir, *EARLYBERT))
    assert code == 0, out
    assert "resumed from" in out and "ticket drawn at step" in out  # the draw happens again, identically
    assert ticket(run_dir)["mask_digest"] == ticket(eb_reference)["mask_digest"]
    assert architecture(run_dir) == architecture(eb_reference)
    assert_same_losses(run_dir, eb_reference)


@pytest.mark.parametrize("stage", [2, 3])
def test_other_zero_stages_draw_the_same_ticket_and_resume_from_the_pruned_checkpoint(
    config, eb_reference, tmp_path, stage
):
    """The whole cycle on ZeRO-2 and ZeRO-3, resumed from the checkpoint that follows the draw."""
    assert_other_stage_resumes_from_the_pruned_checkpoint(config, eb_reference, tmp_path, stage)

"""The warm-up of the pre-training heads a Hugging Face checkpoint lacks (pipeline/pretrain/head_warmup.py): it runs
only when a head is missing, trains the heads alone (every encoder weight bit-identical), is announced, and resumes
exactly after a kill in the middle of it."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import save_hf_bert
from data_prep import ShardDataset
from pipeline.engine import distributed
from pipeline.model import EarlyBertForPreTraining
from pipeline.pretrain import head_warmup
from pipeline.pretrain.config import load_pretrain_config
from pipeline.pretrain.start import model_config_for
from runs import assert_same_losses, deepspeed, faulty_train, finish, metrics

WARMUP = 6  # steps; the test config checkpoints every 3
NO_SIGNAL = SimpleNamespace(signum=0)  # a StopRequest that no signal reached (a real one would take pytest's SIGTERM)


@pytest.fixture(scope="module")
def encoder_only(shards, tmp_path_factory):
    """An encoder-only checkpoint as sentence-transformers ship them: a BertModel, no MLM or NSP head."""
    from transformers import BertModel

    return save_hf_bert(shards, tmp_path_factory.mktemp("encoder_only"), BertModel)


@pytest.fixture(scope="module")
def with_heads(shards, tmp_path_factory):
    """A checkpoint with both pre-training heads (BertForPreTraining)."""
    from transformers import BertForPreTraining

    return save_hf_bert(shards, tmp_path_factory.mktemp("with_heads"), BertForPreTraining)


# ---- the plan and its announcement -------------------------------------------------------------------------


def test_the_warm_up_is_planned_only_for_missing_heads():
    encoder_only = ["cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.seq_relationship.weight"]
    gates = ["bert.encoder.layer.0.attention.self.head_gates", "bert.encoder.layer.0.intermediate.ffn_gates"]
    plan = head_warmup.plan(None, encoder_only + gates)
    assert plan.steps == head_warmup.DEFAULT_STEPS and plan.missing == ["MLM head", "NSP classifier"]
    assert head_warmup.plan(None, gates).steps == 0  # EarlyBERT's gates are not heads
    assert head_warmup.plan(250, gates).steps == 0  # a checkpoint with its heads: none, whatever is configured
    assert head_warmup.plan(0, encoder_only).steps == 0
    assert head_warmup.plan(7, ["bert.pooler.dense.weight"]) == head_warmup.HeadWarmup(7, ["NSP pooler"])
    said = head_warmup.describe(plan, "MiniLM")
    assert (
        "MiniLM has no MLM head, NSP classifier" in said and f"for {plan.steps} steps with the encoder frozen" in said
    )
    assert "untrained heads" in head_warmup.describe(head_warmup.plan(0, encoder_only), "MiniLM")
    assert "no head warm-up" in head_warmup.describe(head_warmup.plan(None, gates), "MiniLM")


# ---- in one process: what the warm-up changes, and its resume --------------------------------------------------


@pytest.fixture
def one_rank():
    """A one-rank gloo process group (the warm-up's all-reduces), without launcher variables."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{distributed.free_port()}", rank=0, world_size=1
    )
    yield distributed.DistInfo(0, 1, 0, torch.device("cpu"), "single")
    torch.distributed.destroy_process_group()


def _warm(config, encoder_only, run_dir, steps, *overrides):
    cfg = load_pretrain_config(
        str(config), [f"run_dir={run_dir}", f"model.init_from={encoder_only}", "earlybert.mode=dense", *overrides]
    )
    data = ShardDataset(cfg.phases[0].shards)
    torch.manual_seed(cfg.seed)
    model, loading = EarlyBertForPreTraining.from_pretrained(
        str(encoder_only), config=model_config_for(cfg, data), output_loading_info=True
    )
    plan = head_warmup.plan(steps, loading["missing_keys"])
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg, data, model, plan


def test_the_warm_up_trains_the_heads_alone(config, encoder_only, tmp_path, one_rank):
    cfg, data, model, plan = _warm(config, encoder_only, tmp_path / "run", 4, "earlybert.mode=earlybert")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    heads = head_warmup.head_parameters(model)
    assert set(heads) >= {"cls.predictions.transform.dense.weight", "cls.seq_relationship.weight"}
    assert head_warmup.run(model, plan, cfg, data, one_rank, NO_SIGNAL)
    for name, p in model.named_parameters():
        if name in heads:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:  # embeddings (the MLM decoder's weight with them), layers, gates
            assert torch.equal(p, before[name]), f"{name} changed during the head warm-up"
    assert all(p.requires_grad for p in model.parameters())  # the run trains all of them after it
    summary = head_warmup.read_summary(cfg.run_dir)
    assert summary["steps"] == 4 and len(summary["losses"]) == 4 and summary["missing"] == plan.missing


def test_the_warm_up_resumes_from_its_state_file_exactly(config, encoder_only, tmp_path, one_rank):
    cfg, data, straight, plan = _warm(config, encoder_only, tmp_path / "straight", 4)
    assert head_warmup.run(straight, plan, cfg, data, one_rank, NO_SIGNAL)
    cfg, data, model, plan = _warm(config, encoder_only, tmp_path / "resumed", 2)
    assert head_warmup.run(model, plan, cfg, data, one_rank, NO_SIGNAL)  # saved at its end, step 2
    cfg, data, model, plan = _warm(config, encoder_only, tmp_path / "resumed", 4)  # fresh heads, then the file's
    assert head_warmup.run(model, plan, cfg, data, one_rank, NO_SIGNAL)
    for (name, p), q in zip(model.named_parameters(), straight.parameters()):
        assert torch.equal(p, q), name
    # Killed after the warm-up, before the run's first checkpoint: the relaunch takes the warmed heads as they were.
    cfg, data, again, plan = _warm(config, encoder_only, tmp_path / "resumed", 4)
    assert head_warmup.run(again, plan, cfg, data, one_rank, NO_SIGNAL)
    for (name, p), q in zip(again.named_parameters(), straight.parameters()):
        assert torch.equal(p, q), name
    assert (
        head_warmup.read_summary(tmp_path / "resumed")["losses"]
        == head_warmup.read_summary(tmp_path / "straight")["losses"]
    )


# ---- launched runs (2 ranks) -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def warm_reference(config, encoder_only, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("warm_reference") / "run"
    code, out = finish(
        deepspeed(config, run_dir, f"model.init_from={encoder_only}", f"model.head_warmup_steps={WARMUP}")
    )
    assert code == 0, out
    return run_dir, out


@pytest.mark.slow
def test_a_run_from_an_encoder_only_checkpoint_announces_and_warms_up_its_heads(warm_reference, encoder_only):
    run_dir, out = warm_reference
    assert f"{encoder_only} has no MLM head, NSP classifier: they start from random weights" in out
    assert f"warming them up for {WARMUP} steps with the encoder frozen" in out
    summary = json.loads((run_dir / head_warmup.SUMMARY_FILE).read_text())
    assert len(summary["losses"]) == WARMUP and summary["losses"][-1] < summary["losses"][0]
    assert metrics(run_dir)[0]["step"] == 1  # the run's own steps and metrics start after it


@pytest.mark.slow
def test_a_kill_in_the_warm_up_resumes_to_the_same_heads_and_losses(config, encoder_only, warm_reference, tmp_path):
    reference, _ = warm_reference
    run_dir = tmp_path / "run"
    overrides = (f"model.init_from={encoder_only}", f"model.head_warmup_steps={WARMUP}")
    # Killed hard before warm-up step 5 (args[5]: seed + steps done): the state file holds step 3.
    script = faulty_train(tmp_path, "pipeline.pretrain.head_warmup:step", condition="args[5] == 7 + 4")
    code, out = finish(deepspeed(config, run_dir, *overrides, script=script))
    assert code != 0 and not (run_dir / "checkpoints").exists(), out
    code, out = finish(deepspeed(config, run_dir, *overrides))
    assert code == 0, out
    assert f"head warm-up resumed from {run_dir / head_warmup.STATE_FILE} at step 3 of {WARMUP}" in out
    summary, expected = (json.loads((r / head_warmup.SUMMARY_FILE).read_text()) for r in (run_dir, reference))
    assert summary["losses"] == pytest.approx(expected["losses"], abs=1e-6)
    assert_same_losses(run_dir, reference)


@pytest.mark.slow
def test_a_checkpoint_with_its_heads_gets_no_warm_up(config, with_heads, tmp_path):
    run_dir = tmp_path / "run"
    code, out = finish(deepspeed(config, run_dir, f"model.init_from={with_heads}", "phases.1.steps=1"))
    assert code == 0, out
    assert f"{with_heads} has the heads pre-training needs: no head warm-up" in out
    assert "warm-up step" not in out and not (run_dir / head_warmup.SUMMARY_FILE).exists()


def test_a_negative_warm_up_is_refused(config):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="model.head_warmup_steps must be >= 0"):
        load_pretrain_config(str(config), ["run_dir=x", "model.head_warmup_steps=-1"])

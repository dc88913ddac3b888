"""ModernBERT pre-training (model.family: modernbert) through the pipeline BERT uses: the family registry
(pipeline/families.py), the run config, the model FLOPs, and, on 2 ranks over gloo (fp32, modernbert-tiny with a
16-token window so that the local layers see less than the global ones at seq 32 and 64), the EarlyBERT cycle:
search, draw, prune, rebuild, train on, on ZeRO 1, 2 and 3; kills before and just after the draw; a run from a
transformers-saved ModernBERT directory.

`mb_reference` is one uninterrupted ZeRO-1 run; the interrupted run must end with its ticket and losses (1e-6);
ZeRO 2 and 3 draw at the same step with the same ticket up to gates tied within rounding, and the same losses to
1e-4 up to the draw (as tests/test_earlybert_runs.py for BERT).
"""

from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import ModernBertConfig, ModernBertModel

from conftest import save_hf_modernbert
from data_prep import ShardDataset
from pipeline import families
from pipeline.config import ConfigError
from pipeline.earlybert.detector import Masks
from pipeline.earlybert.pruner import prune_model
from pipeline.earlybert.search import parameters_of
from pipeline.model import EarlyBertConfig, EarlyBertForSequenceClassification
from pipeline.modernbert import (
    LOCAL,
    EarlyModernBertConfig,
    EarlyModernBertForMaskedLM,
    EarlyModernBertForSequenceClassification,
    local_mask,
    window_pairs,
)
from pipeline.pretrain import head_warmup, loop
from pipeline.pretrain.config import load_pretrain_config
from pipeline.pretrain.start import model_config_for
from pipeline.run.metrics import batch_model_flops, flops_per_sequence, model_flops
from runs import (
    EARLYBERT,
    REPO,
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

MLM_KEYS = ("loss", "mlm_loss", "lr", "samples")  # MLM only: no nsp_loss
# runs.EARLYBERT's detector with other lambdas. From ModernBERT's initialisation (small weights, no biases) the GLU
# gates' task gradients are tiny: under BERT's tests' L1 of 0.01 Adam moves every GLU gate by the same step, and the
# 384 gates end the 6-step search within 2e-6 of each other (2e-5 under 1e-4): a ticket drawn by float rounding (one
# ZeRO-3 run of several kept more than 4 other neurons than ZeRO-1's). With these lambdas no GLU gate lies within 1e-6
# of the cut, and the heads' gates are 1.4e-4 or more apart there.
SEARCH = (*EARLYBERT, "earlybert.lambda_heads=1e-4", "earlybert.lambda_ffn=1e-6")
WINDOW = 16  # local_attention of the runs: |i - j| <= 8


def tiny(**fields) -> EarlyModernBertConfig:
    """modernbert-tiny on a 50-token vocabulary, with the runs' window."""
    return EarlyModernBertConfig.from_preset(
        "modernbert-tiny", **{"vocab_size": 50, "pad_token_id": 0, "local_attention": WINDOW, **fields}
    )


@pytest.fixture(scope="module")
def mb_config(config, tmp_path_factory):
    """conftest's tiny run config (NSP shards at seq 32 and 64: their pairs are read as text) for modernbert-tiny,
    with the runs' window and ModernBERT's 30% masking."""
    fields = yaml.safe_load(config.read_text())
    fields["model"] = {"family": "modernbert", "preset": "modernbert-tiny", "overrides": {"local_attention": WINDOW}}
    fields["data"] = {"mask_prob": 0.3}
    path = tmp_path_factory.mktemp("mb_config") / "modernbert-tiny.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.fixture(scope="module")
def hf_encoder(shards, tmp_path_factory):
    """transformers' ModernBertModel (the encoder alone, no MLM head) saved by save_pretrained: modernbert-tiny's
    shape with the runs' window, the shards' tokenizer and special tokens."""
    return save_hf_modernbert(shards, tmp_path_factory.mktemp("hf_modernbert_encoder"), ModernBertModel, WINDOW)


@pytest.fixture(scope="module")
def mb_reference(mb_config, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mb_reference") / "run"
    code, out = finish(deepspeed(mb_config, run_dir, *SEARCH))
    assert code == 0, out
    return run_dir


# ---- the registry ------------------------------------------------------------------------------------------------


def test_the_registry_finds_the_family_of_configs_config_files_and_names():
    bert, modern = EarlyBertConfig.from_preset("bert-tiny"), EarlyModernBertConfig.from_preset("modernbert-tiny")
    assert families.family_of(bert) is families.BERT and families.family_of("bert") is families.BERT
    assert families.family_of(modern) is families.MODERNBERT and families.family_of("modernbert") is families.MODERNBERT
    assert families.family_of(modern.to_dict()) is families.MODERNBERT  # an architecture.json
    assert families.family_of(ModernBertConfig().to_dict()) is families.MODERNBERT  # transformers' config.json
    with pytest.raises(ValueError, match="'gpt2' is not a model family"):
        families.family_of("gpt2")
    # the class a config names, in its family; none named: the pre-training model
    assert families.model_class(modern) is EarlyModernBertForMaskedLM
    classified = EarlyModernBertConfig.from_preset("modernbert-tiny", architectures=["ModernBertForMaskedLM"])
    with pytest.raises(ValueError, match="not an EarlyBERT modernbert model class"):
        families.model_class(classified)
    classified.architectures = [EarlyModernBertForSequenceClassification.__name__]
    assert families.model_class(classified) is EarlyModernBertForSequenceClassification
    bert.architectures = [EarlyBertForSequenceClassification.__name__]
    assert families.model_class(bert) is EarlyBertForSequenceClassification
    with pytest.raises(ValueError, match="'bert-base' is a bert preset, and model.family is modernbert"):
        families.MODERNBERT.preset("bert-base")


def test_modernbert_flops_count_three_glu_matrices_and_the_windows_pairs():
    """A pruned per-layer structure by hand: Wqkv, Wo, the GLU's Wi (two halves) and Wo; attention products per
    pair, global layers over every pair of a sequence, local layers over the pairs within the window."""
    config = tiny(num_heads_per_layer=[3, 1, 4, 2], intermediate_size_per_layer=[20, 7, 96, 5])
    h, d = 64, 16
    layers = list(zip([3, 1, 4, 2], [20, 7, 96, 5], config.layer_types))
    assert [t == LOCAL for *_, t in layers] == [False, True, True, False]  # global every third layer, from layer 0
    per_token = sum(2 * h * 3 * heads * d + 2 * heads * d * h + 3 * 2 * h * width for heads, width, _ in layers)
    per_pair = {kind: sum(4 * heads * d for heads, _, t in layers if (t == LOCAL) == kind) for kind in (False, True)}
    head = 2 * h * h + 2 * h * 50
    # two sequences of 30 and 5 real tokens, 4 masked; pairs within |i - j| <= 8 counted one by one
    pairs = sum(sum(abs(i - j) <= 8 for i in range(n) for j in range(n)) for n in (30, 5))
    expected = 3 * (35 * per_token + (30**2 + 5**2) * per_pair[False] + pairs * per_pair[True] + 4 * head)
    assert model_flops(config, 35, 30**2 + 5**2, 4, window_pairs=pairs) == pytest.approx(expected)
    with pytest.raises(ValueError, match="window_pairs"):
        model_flops(config, 35, 30**2 + 5**2, 4)
    assert flops_per_sequence(config, 64) == pytest.approx(
        model_flops(config, 64, 64**2, 0.15 * 64, window_pairs(64, 8))
    )
    # ModernBERT-base at 8192 tokens: the local layers' 129-token windows make it far cheaper than all-global
    base = EarlyModernBertConfig.from_preset("modernbert-base")
    all_global = EarlyModernBertConfig.from_preset("modernbert-base", global_attn_every_n_layers=1)
    assert flops_per_sequence(base, 8192) < 0.6 * flops_per_sequence(all_global, 8192)


def test_the_models_window_pairs_are_what_its_local_layers_attend_to():
    """The training log's count (the model's output, summed per micro-batch) equals the pairs the sliding-window
    mask allows, and the benchmarks' count from the batch."""
    config = tiny()
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, 17:], mask[2, :5], mask[2, 20:] = 0, 0, 0
    labels = torch.full((3, 24), -100)
    labels[0, 3], labels[1, 10], labels[2, 7] = 5, 6, 7
    with torch.no_grad():
        out = EarlyModernBertForMaskedLM(config)(torch.randint(5, 50, (3, 24)), mask, labels=labels)
    allowed, _ = local_mask(mask.bool(), torch.arange(24)[None], WINDOW // 2)
    real_pairs = allowed[:, 0] & mask.bool()[:, :, None] & mask.bool()[:, None, :]
    assert int(out.window_pairs) == int(real_pairs.sum()) == int(window_pairs(mask.sum(1), WINDOW // 2).sum())
    stats = loop.pretraining_stats(out)
    totals = {k: float(v) for k, v in stats.items()}
    from_training = model_flops(
        config, totals["tokens"], totals["token_pairs"], totals["mlm_masked"], totals["window_pairs"]
    )
    assert from_training == pytest.approx(batch_model_flops(config, mask, labels))


def test_pruning_and_parameter_counts_go_through_the_family():
    config = tiny()
    model = EarlyModernBertForMaskedLM(config).eval()
    masks = Masks(
        heads=[torch.tensor([True, False, True, True])] * 4,
        ffn=[torch.arange(96) % 3 != 0] * 3 + [torch.arange(96) < 10],
    )
    pruned, plan = prune_model(model, masks, fold_gates=True)
    assert type(pruned) is EarlyModernBertForMaskedLM and not pruned.config.use_gates
    assert pruned.config.num_heads_per_layer == [3] * 4 and pruned.config.intermediate_size_per_layer == [64] * 3 + [10]
    assert parameters_of(pruned.config) == sum(p.numel() for p in pruned.parameters()) < parameters_of(config)
    ids, mask = torch.randint(5, 50, (2, 20)), torch.ones(2, 20, dtype=torch.long)
    with torch.no_grad():
        for gates, keep in zip(model.head_gates() + model.ffn_gates(), masks.heads + masks.ffn):
            gates[~keep] = 0.0
        torch.testing.assert_close(pruned(ids, mask).logits, model(ids, mask).logits, atol=1e-5, rtol=1e-5)


# ---- the run config ----------------------------------------------------------------------------------------------


def test_a_modernbert_run_config_builds_its_family_from_the_shards(mb_config, shards, hf_encoder):
    data = ShardDataset(shards / "seq32")

    def built(*overrides):
        return model_config_for(load_pretrain_config(str(mb_config), list(overrides)), data)

    config = built()
    assert type(config) is EarlyModernBertConfig and config.num_hidden_layers == 4 and config.local_attention == WINDOW
    assert config.vocab_size == data.vocab_size and config.use_gates and not hasattr(config, "use_nsp")
    special = data.special_ids
    assert (config.pad_token_id, config.cls_token_id, config.sep_token_id) == (
        special["pad"], special["cls"], special["sep"],
    )  # fmt: skip
    assert built("model.preset=null", "model.overrides={}").hidden_size == 64  # the family's tiny preset
    with pytest.raises(
        ConfigError, match="'bert-mini' is a bert preset, and model.family is modernbert; set model.family=bert"
    ):
        built("model.preset=bert-mini")
    with pytest.raises(ConfigError, match="fused_qkv are not EarlyModernBertConfig fields"):
        built("model.overrides={fused_qkv: true}")
    from_dir = built(f"model.init_from={hf_encoder}", "model.overrides={}")
    assert from_dir.architectures == ["EarlyModernBertForMaskedLM"] and from_dir.local_attention == WINDOW
    with pytest.raises(ConfigError, match="holds a 'modernbert' model, not a bert one .*; set model.family=modernbert"):
        built("model.family=bert", "model.preset=bert-tiny", f"model.init_from={hf_encoder}", "model.overrides={}")


def test_the_head_warm_up_knows_modernberts_heads(mb_config, shards, hf_encoder):
    """An encoder-only ModernBertModel lacks the MLM head and the decoder's bias (its weight is the embeddings):
    those, and only those, warm up."""
    cfg = load_pretrain_config(str(mb_config), [f"model.init_from={hf_encoder}", "model.overrides={}"])
    config = model_config_for(cfg, ShardDataset(shards / "seq32"))
    model, loading = EarlyModernBertForMaskedLM.from_pretrained(
        str(hf_encoder), config=config, output_loading_info=True
    )
    plan = head_warmup.plan(None, loading["missing_keys"])
    assert plan == head_warmup.HeadWarmup(head_warmup.DEFAULT_STEPS, ["MLM decoder bias", "MLM head"])
    assert set(head_warmup.head_parameters(model)) == {"head.dense.weight", "head.norm.weight", "decoder.bias"}


def test_the_launch_configs_and_the_plan(shards):
    tiny = load_pretrain_config(str(REPO / "launch" / "configs" / "modernbert-tiny.yaml"))
    base = load_pretrain_config(str(REPO / "launch" / "configs" / "modernbert-base.yaml"))
    for cfg in (tiny, base):
        assert cfg.model.family == "modernbert" and cfg.data.mask_prob == 0.3
    assert (tiny.model.preset, base.model.preset) == ("modernbert-tiny", "modernbert-base")
    assert families.MODERNBERT.presets["modernbert-base"] == (22, 768, 12, 1152)
    assert base.deepspeed.endswith("zero1_bf16.json")
    phases = [f"phases.{i}.shards={shards / name}" for i, name in enumerate(("seq32", "seq64"))]
    args = SimpleNamespace(config=str(REPO / "launch" / "configs" / "modernbert-tiny.yaml"), overrides=phases)
    said = "\n".join(loop.plan(loop.prepare(args, world_size=2), world_size=2))
    assert "model      modernbert: 4 layers, hidden 64, heads per layer 4" in said, said


# ---- launched runs (2 ranks) -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_search_draw_prune_rebuild_and_train_on(mb_reference):
    t = ticket(mb_reference)
    assert 4 <= t["draw_step"] <= 6 and t["mode"] == "earlybert"
    assert t["heads_per_layer"] == [3, 3, 3, 3]  # 4 heads per layer, 1/3 pruned layer-wise
    assert sum(t["ffn_per_layer"]) == round(4 * 96 * 0.6)  # 40% of all GLU neurons pruned globally
    assert t["params_after"] < t["params_before"] and t["flops_per_sequence_after"] < t["flops_per_sequence_before"]
    arch = architecture(mb_reference)
    assert families.model_class(EarlyModernBertConfig.from_dict(arch)) is EarlyModernBertForMaskedLM
    assert arch["num_heads_per_layer"] == [3] * 4 and arch["intermediate_size_per_layer"] == t["ffn_per_layer"]
    assert arch["use_gates"] is False and arch["local_attention"] == WINDOW
    m = metrics(mb_reference)
    assert [r["step"] for r in m] == list(range(1, TOTAL + 1)) and not any("nsp_loss" in r for r in m)
    assert all("gate_penalty" in r for r in m[: t["draw_step"]])
    assert not any("gate_penalty" in r for r in m[t["draw_step"] :])
    assert m[-1]["loss"] < m[0]["loss"] and all(r["tflops"] > 0 for r in m)


@pytest.mark.slow
def test_killed_before_and_just_after_the_draw_resumes_to_the_same_ticket_and_losses(mb_config, mb_reference, tmp_path):
    run_dir = tmp_path / "run"
    before = faulty_train(tmp_path, "pipeline.run.core:prune_engine", "before")
    code, out = finish(deepspeed(mb_config, run_dir, *SEARCH, script=before))
    assert code != 0 and not (run_dir / "ticket.json").exists(), out
    just_after = faulty_train(tmp_path, "pipeline.run.rundir:RunDir.write_ticket", "after")
    code, out = finish(deepspeed(mb_config, run_dir, *SEARCH, script=just_after))
    assert code != 0 and "resumed from" in out and (run_dir / "ticket.json").exists(), out
    code, out = finish(deepspeed(mb_config, run_dir, *SEARCH))
    assert code == 0, out
    assert "resumed from" in out and "ticket drawn at step" in out  # the draw happens again, identically
    assert ticket(run_dir)["mask_digest"] == ticket(mb_reference)["mask_digest"]
    assert architecture(run_dir) == architecture(mb_reference)
    assert_same_losses(run_dir, mb_reference, keys=MLM_KEYS)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.slow
def test_other_zero_stages_draw_the_same_ticket_and_resume_from_the_pruned_checkpoint(
    mb_config, mb_reference, tmp_path, stage
):
    """The whole cycle on ZeRO-2 and ZeRO-3, resumed from the checkpoint that follows the draw: the pruned ModernBERT
    is built from architecture.json before DeepSpeed loads its partitions."""
    assert_other_stage_resumes_from_the_pruned_checkpoint(
        mb_config, mb_reference, tmp_path, stage, search=SEARCH, keys=MLM_KEYS
    )


@pytest.mark.slow
def test_continued_pretraining_from_a_transformers_modernbert_directory(mb_config, hf_encoder, tmp_path):
    """model.init_from a ModernBertModel saved by transformers: its encoder loads, the MLM head it lacks warms up on
    the frozen encoder, then the search draws and the pruned model trains on."""
    run_dir = tmp_path / "run"
    init = (f"model.init_from={hf_encoder}", "model.overrides={}", "model.head_warmup_steps=2")
    code, out = finish(deepspeed(mb_config, run_dir, *SEARCH, *init))
    assert code == 0, out
    assert f"{hf_encoder} has no MLM decoder bias, MLM head" in out and "head warm-up step 2/2" in out
    assert head_warmup.read_summary(run_dir)["missing"] == ["MLM decoder bias", "MLM head"]
    arch, t = architecture(run_dir), ticket(run_dir)
    assert (
        arch["architectures"] == ["EarlyModernBertForMaskedLM"] and arch["num_heads_per_layer"] == t["heads_per_layer"]
    )
    assert t["params_after"] < t["params_before"] and len(metrics(run_dir)) == TOTAL

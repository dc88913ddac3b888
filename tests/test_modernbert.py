"""The gated ModernBERT (pipeline/modernbert.py): equality with transformers' ModernBERT on the same weights, padded
and unpadded; physical pruning; the gates' L1 penalty; the presets' shapes. Tiny models, a few seconds in all."""

import pytest
import torch
import transformers
from transformers import (
    ModernBertConfig,
    ModernBertForMaskedLM,
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
    ModernBertModel,
)

from pipeline.model import BatchLayout
from pipeline.modernbert import (
    PRESETS,
    EarlyModernBertConfig,
    EarlyModernBertForMaskedLM,
    EarlyModernBertForQuestionAnswering,
    EarlyModernBertForSequenceClassification,
    EarlyModernBertForTokenClassification,
    EarlyModernBertModel,
    local_mask,
    modernbert_config_dict,
    prune_model,
    prune_tensors,
    register_auto_classes,
)

transformers.logging.set_verbosity_error()

VOCAB = 101
# 4 layers: global, local, local, global. A window of 8 tokens (|i - j| <= 4) on 24-token sequences, so the local
# layers see less than the global ones.
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    local_attention=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    cls_token_id=1,
    sep_token_id=2,
)


def hf_config(attn_implementation="sdpa", **fields) -> ModernBertConfig:
    return ModernBertConfig(**{**TINY, **fields}, attn_implementation=attn_implementation)


def tiny(**overrides) -> EarlyModernBertConfig:
    """The modernbert-tiny preset (4 layers, hidden 64, 4 heads of 16, GLU width 96) on the tiny vocabulary."""
    fields = {k: v for k, v in TINY.items() if k not in ("hidden_size", "intermediate_size", "num_attention_heads")}
    return EarlyModernBertConfig.from_preset("modernbert-tiny", **{**fields, **overrides})


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (norm weights around 1, everything else around 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name else 0.0))


def batch(seed: int = 0, B: int = 3, T: int = 24, left_padding: bool = True):
    """Row 0 full, row 1 right-padded, row 2 padded on both sides (or on the right); MLM labels on real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 17:] = 0
    mask[2, :5] = 0 if left_padding else 1
    mask[2, 20:] = 0
    labels = torch.full_like(ids, -100)
    for b, t in ((0, 1), (0, 22), (1, 3), (1, 16), (2, 6), (2, 19)):
        labels[b, t] = ids[b, t]
    return ids, mask, labels


def close(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    if mask is not None:  # compare the real tokens (outputs at padding are unspecified, zeros when unpadded)
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def saved_hf(tmp_path, model_class, seed: int = 0, **fields):
    hf = model_class(hf_config(**fields)).eval()
    randomize(hf, seed)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("unpad", [False, True])
def test_masked_lm_equals_transformers(tmp_path, attn_implementation, unpad):
    hf = saved_hf(tmp_path, ModernBertForMaskedLM, attn_implementation=attn_implementation)
    ours = EarlyModernBertForMaskedLM.from_pretrained(tmp_path, unpad=unpad).eval()
    assert ours.decoder.weight is ours.model.embeddings.tok_embeddings.weight  # tied, as transformers'
    assert all(bool((g == 1).all()) for g in ours.head_gates() + ours.ffn_gates())  # gates start at 1
    ids, mask, labels = batch()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, labels=labels)
        out = ours(ids, attention_mask=mask, labels=labels)
        sparse = ours(ids, attention_mask=mask, labels=labels, masked_logits_only=True)
        full = ours(ids)  # no padding at all
    close(out.logits, theirs.logits, mask)
    close(out.mlm_loss, theirs.loss)
    close(sparse.mlm_loss, theirs.loss)
    close(sparse.logits, theirs.logits[labels != -100])
    close(full.logits, hf(ids).logits)
    assert int(out.mlm_count) == 6 and out.nsp_loss is None
    assert int(out.token_count) == int(mask.sum()) and int(out.token_pairs) == int((mask.sum(1) ** 2).sum())
    assert int(out.mlm_correct) == int((theirs.logits.argmax(-1)[labels != -100] == labels[labels != -100]).sum())


@pytest.mark.parametrize("unpad", [False, True])
def test_base_model_equals_transformers(tmp_path, unpad):
    hf = saved_hf(tmp_path, ModernBertModel, seed=1)
    ids, mask, _ = batch(seed=1)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).last_hidden_state
        ours = EarlyModernBertModel.from_pretrained(tmp_path, unpad=unpad).eval()
        close(ours(ids, attention_mask=mask).last_hidden_state, theirs, mask)
        # an encoder checkpoint under the MLM model: the encoder loads, the head is new
        mlm = EarlyModernBertForMaskedLM.from_pretrained(tmp_path, unpad=unpad).eval()
        close(mlm.model(ids, attention_mask=mask).last_hidden_state, theirs, mask)


def test_sliding_window_and_rotary_thetas_matter(tmp_path):
    """The local layers' window and both thetas change the outputs: the equality tests above test them."""
    saved_hf(tmp_path, ModernBertModel, seed=2)
    ids, mask, _ = batch(seed=2)
    outputs = []
    for fields in ({}, {"local_attention": 64}, {"global_rope_theta": 1000.0}, {"local_rope_theta": 1000.0}):
        model = EarlyModernBertModel.from_pretrained(tmp_path, **fields).eval()
        with torch.no_grad():
            outputs.append(model(ids, attention_mask=mask).last_hidden_state[mask.bool()])
    for other in outputs[1:]:
        assert (other - outputs[0]).abs().max() > 1e-3
    # no query row is ever empty (NaN in some kernels); those without a real key in the window are zeroed by `keep`
    real = mask.bool()
    local, keep = local_mask(real, torch.arange(real.shape[1])[None], 4)
    assert bool(local.any(-1).all())
    has_real_key = torch.tensor([[bool(real[b, max(t - 4, 0) : t + 5].any()) for t in range(24)] for b in range(3)])
    assert not bool(has_real_key.all()) and torch.equal(keep[:, 0, :, 0], has_real_key)


@pytest.mark.parametrize(
    "hf_class, our_class, fields",
    [
        (ModernBertForSequenceClassification, EarlyModernBertForSequenceClassification, {"num_labels": 3}),
        (
            ModernBertForSequenceClassification,
            EarlyModernBertForSequenceClassification,
            {"num_labels": 3, "classifier_pooling": "mean"},
        ),
        (ModernBertForTokenClassification, EarlyModernBertForTokenClassification, {"num_labels": 5}),
        (ModernBertForQuestionAnswering, EarlyModernBertForQuestionAnswering, {}),
    ],
)
def test_task_heads_equal_transformers(tmp_path, hf_class, our_class, fields):
    hf = saved_hf(tmp_path, hf_class, seed=3, **fields)
    ours = our_class.from_pretrained(tmp_path).eval()
    # transformers' sequence classification takes [:, 0], padding on the left; ours the first real token
    ids, mask, token_labels = batch(seed=3, left_padding=our_class is not EarlyModernBertForSequenceClassification)
    if our_class is EarlyModernBertForQuestionAnswering:
        kwargs = dict(start_positions=torch.tensor([2, 5, 30]), end_positions=torch.tensor([4, 9, 7]))
        names = ("start_logits", "end_logits")
    else:
        labels = torch.tensor([0, 2, 1]) if our_class is EarlyModernBertForSequenceClassification else token_labels
        kwargs = dict(labels=labels % fields["num_labels"] if labels.ndim == 2 else labels)
        kwargs["labels"] = kwargs["labels"].masked_fill(labels == -100, -100)
        names = ("logits",)
    with torch.no_grad():
        theirs, out = hf(ids, attention_mask=mask, **kwargs), ours(ids, attention_mask=mask, **kwargs)
    per_token = our_class is not EarlyModernBertForSequenceClassification
    for name in names:
        close(getattr(out, name), getattr(theirs, name), mask if per_token else None)
    close(out.loss, theirs.loss)
    assert out.task_loss is out.loss and out.gate_penalty is None and len(out.gate_l1) == 2


def test_unpadded_equals_padded_with_the_loaders_layout():
    """Unpadded (with model.py's BatchLayout from the data loader, or without) equals padded: outputs and gradients."""
    config = tiny()
    padded = EarlyModernBertForMaskedLM(EarlyModernBertConfig(**{**config.to_dict(), "unpad": False}))
    randomize(padded, seed=4)
    unpadded = EarlyModernBertForMaskedLM(config)
    unpadded.load_state_dict(padded.state_dict())
    ids, mask, labels = batch(seed=4)
    layout = BatchLayout.of(mask, labels)
    runs = [
        padded(ids, mask, labels=labels),
        unpadded(ids, mask, labels=labels),
        unpadded(ids, mask, labels=labels, layout=layout, masked_logits_only=True),
    ]
    grads = []
    for model, out in zip((padded, unpadded, unpadded), runs):
        model.zero_grad()
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for out, grad in zip(runs[1:], grads[1:]):
        close(out.loss, runs[0].loss)
        for name, g in grad.items():
            close(g, grads[0][name])
    close(runs[1].logits, runs[0].logits, mask)


def spread_gates(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.head_gates() + model.ffn_gates():
            gate.copy_(torch.randn(gate.shape, generator=g))


KEPT_HEADS = [[0, 2, 3], [1], [0, 1, 2, 3], [3, 0]]
KEPT_NEURONS = [list(range(0, 96, 2)), [5, 17, 60, 95], list(range(96)), list(range(30, 90))]


@pytest.mark.parametrize("fold_gates", [True, False])
def test_pruned_model_equals_gated_dense_model(tmp_path, fold_gates):
    config = tiny()
    dense = EarlyModernBertForMaskedLM(config).eval()
    randomize(dense, seed=5)
    spread_gates(dense, seed=5)
    with torch.no_grad():  # the removed units' gates at 0
        for gate, kept in zip(dense.head_gates() + dense.ffn_gates(), KEPT_HEADS + KEPT_NEURONS):
            gate[[i for i in range(gate.numel()) if i not in kept]] = 0.0
    pruned, plan = prune_model(dense, KEPT_HEADS, [sorted(n) for n in KEPT_NEURONS], fold_gates=fold_gates)
    assert pruned.config.num_heads_per_layer == [3, 1, 4, 2]
    assert pruned.config.intermediate_size_per_layer == [48, 4, 96, 60]
    assert bool(pruned.head_gates()) != fold_gates and pruned.config.use_gates != fold_gates
    layer = pruned.model.layers[1]
    assert layer.attn.Wqkv.weight.shape == (3 * 16, 64) and layer.attn.Wo.weight.shape == (64, 16)
    assert layer.mlp.Wi.weight.shape == (2 * 4, 64) and layer.mlp.Wo.weight.shape == (64, 4)
    ids, mask, labels = batch(seed=5)
    with torch.no_grad():
        want, got = dense(ids, mask, labels=labels), pruned(ids, mask, labels=labels)
    close(got.logits, want.logits, mask)
    close(got.mlm_loss, want.mlm_loss)
    # the pruned structure is a plain config: it saves and loads as such
    pruned.save_pretrained(tmp_path)
    again = EarlyModernBertForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        close(again(ids, mask).logits, got.logits)


def test_pruning_folds_gates_into_wo_columns_and_moments():
    """Folding scales Wo's columns by the gates (exact), both GLU halves lose the same neurons, and optimizer moments
    scale as Adam sees the folded weight (power -1: m / c)."""
    config = tiny()
    model = EarlyModernBertForMaskedLM(config)
    spread_gates(model, seed=6)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    gates = {k: v for k, v in state.items() if k.endswith(("head_gates", "ffn_gates"))}
    plan = prune_model(model, KEPT_HEADS, KEPT_NEURONS)[1]
    for power in (1, -1):
        out = prune_tensors(state, plan, gates, power=power)
        assert not any(k.endswith(("head_gates", "ffn_gates")) for k in out)
        c = gates["model.layers.1.attn.head_gates"][1]
        close(out["model.layers.1.attn.Wo.weight"], state["model.layers.1.attn.Wo.weight"][:, 16:32] * c**power)
        c = gates["model.layers.1.mlp.ffn_gates"][[5, 17, 60, 95]]
        close(out["model.layers.1.mlp.Wo.weight"], state["model.layers.1.mlp.Wo.weight"][:, [5, 17, 60, 95]] * c**power)
    wi = state["model.layers.1.mlp.Wi.weight"]
    close(out["model.layers.1.mlp.Wi.weight"], wi[[5, 17, 60, 95, 101, 113, 156, 191]])
    wqkv = state["model.layers.3.attn.Wqkv.weight"]  # heads 0 and 3 of q, k and v (64 rows each)
    rows = [b * 64 + h * 16 + j for b in range(3) for h in (0, 3) for j in range(16)]
    close(out["model.layers.3.attn.Wqkv.weight"], wqkv[rows])


def test_gate_l1_penalty_and_gradients():
    config = tiny()
    model = EarlyModernBertForMaskedLM(config)
    spread_gates(model, seed=7)
    ids, mask, labels = batch(seed=7)
    out = model(ids, mask, labels=labels, gate_lambdas=(1e-2, 1e-4))
    l1_heads = sum(g.abs().sum() for g in model.head_gates())
    l1_ffn = sum(g.abs().sum() for g in model.ffn_gates())
    close(out.gate_l1[0], l1_heads)
    close(out.gate_l1[1], l1_ffn)
    close(out.gate_penalty, 1e-2 * l1_heads + 1e-4 * l1_ffn)
    close(out.gate_penalty, model.gate_penalty(1e-2, 1e-4))
    close(out.loss, out.task_loss + out.gate_penalty)
    out.loss.backward()
    for gate in model.head_gates() + model.ffn_gates():
        assert gate.grad is not None and bool((gate.grad != 0).all())
    # without lambdas the loss is the task's; without gates there are none, as plain ModernBERT
    assert model(ids, mask, labels=labels).gate_penalty is None
    plain = EarlyModernBertForMaskedLM(EarlyModernBertConfig(**{**config.to_dict(), "use_gates": False}))
    plain_out = plain(ids, mask, labels=labels, gate_lambdas=(1e-2, 1e-4))
    assert plain_out.gate_l1 is None and plain_out.gate_penalty is None and plain_out.loss is plain_out.task_loss
    assert not plain.head_gates() and not any("gates" in n for n, _ in plain.named_parameters())


@pytest.mark.parametrize("preset, millions", [("modernbert-base", 149), ("modernbert-large", 395)])
def test_presets_have_the_published_shapes(preset, millions):
    """Parameter counts (on the meta device, no weights) equal transformers' ModernBERT of the same shapes (the
    encoder: the published 149M and 395M), plus one gate per head and per GLU neuron; the same tensor shapes."""
    layers, hidden, heads, width = PRESETS[preset]
    shape = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=width)
    count = lambda m: sum(p.numel() for p in m.parameters())
    gates = layers * (heads + width)
    with torch.device("meta"):
        for hf_class, our_class in ((ModernBertModel, EarlyModernBertModel),
                                    (ModernBertForMaskedLM, EarlyModernBertForMaskedLM)):  # fmt: skip
            theirs = hf_class(ModernBertConfig(**shape))
            ours = our_class(EarlyModernBertConfig.from_preset(preset))
            plain = our_class(EarlyModernBertConfig.from_preset(preset, use_gates=False))
            assert count(plain) == count(theirs) and count(ours) == count(theirs) + gates
            ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if "gates" not in k}
            assert ours_shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
            if hf_class is ModernBertModel:
                assert round(count(theirs) / 1e6) == millions
    assert ours.config.vocab_size == 50368 and ours.config.layer_types == theirs.config.layer_types
    assert (ours.config.rope_theta("full_attention"), ours.config.rope_theta("sliding_attention")) == (1.6e5, 1e4)


def test_fresh_model_initialisation_and_auto_classes(tmp_path):
    """ModernBERT's initialisation (truncated normals by role, norms at 1, decoder bias 0), gates at 1, the decoder
    tied; the Auto classes build ours from a saved model_type "earlymodernbert"."""
    model = EarlyModernBertForMaskedLM(tiny())
    assert all(bool((g == 1).all()) for g in model.head_gates() + model.ffn_gates())
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight and not model.decoder.bias.any()
    layer = model.model.layers[1]
    wqkv, wo = layer.attn.Wqkv.weight.detach(), layer.mlp.Wo.weight.detach()
    assert 0.01 < float(wqkv.std()) < 0.02 and float(wqkv.abs().max()) <= 0.04  # std 0.02, cut at 2 std
    assert 0.004 < float(wo.std()) < 0.0072  # 0.02 / sqrt(2 * layers)
    assert bool((layer.mlp_norm.weight == 1).all())
    register_auto_classes()
    model.save_pretrained(tmp_path)
    assert type(transformers.AutoModelForMaskedLM.from_pretrained(tmp_path)) is EarlyModernBertForMaskedLM


def test_config_reads_transformers_configs():
    old = {"model_type": "modernbert", "global_rope_theta": 5e4, "local_rope_theta": None, "num_hidden_layers": 6}
    config = EarlyModernBertConfig(**modernbert_config_dict(old))
    assert config.rope_theta("sliding_attention") == 5e4  # transformers 4.x: local None = the global theta
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"] * 2
    new = hf_config(rope_parameters=None).to_dict()
    config = EarlyModernBertConfig(**modernbert_config_dict(new))
    assert (config.rope_theta("full_attention"), config.rope_theta("sliding_attention")) == (1.6e5, 1e4)
    with pytest.raises(ValueError, match="rotary"):
        modernbert_config_dict({**new, "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0}}})
    with pytest.raises(ValueError, match="num_heads_per_layer"):
        EarlyModernBertConfig.from_preset("modernbert-tiny", num_heads_per_layer=[4, 4])

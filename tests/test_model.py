"""The gated BERT: equality with transformers' BERT, per-layer structures, gates and their L1 penalty."""

import pytest
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)

from pipeline import EarlyBertConfig, EarlyBertForPreTraining, EarlyBertModel
from pipeline.model import (
    PRESETS,
    EarlyBertForMaskedLM,
    EarlyBertForQuestionAnswering,
    EarlyBertForSequenceClassification,
    EarlyBertForTokenClassification,
)
from pipeline.run.metrics import flops_per_sequence
from tiny import NO_DROPOUT, per_layer_config, spread_gates

transformers.logging.set_verbosity_error()

HF_CONFIGS = [
    dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=80, hidden_act="gelu_new"),
    dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=128, type_vocab_size=3),
]


def hf_config(attn_implementation="sdpa", **fields) -> BertConfig:
    return BertConfig(
        vocab_size=97,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn_implementation,
        **fields,
    )


def batch(vocab: int, padded: bool, seed: int = 0, B: int = 3, T: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:
        mask[1, 7:] = 0
        mask[2, 4:] = 0
    types = torch.zeros_like(ids)
    types[:, T // 2 :] = 1
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    labels[0, 5] = 3
    labels[2, 2] = 4
    nsp = torch.tensor([0, 1, 0])[:B]
    return ids, mask, types, labels, nsp


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere (also LayerNorm and biases, which BERT initialises to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] < 10 else 0.0))


@pytest.mark.parametrize("fields", HF_CONFIGS)
@pytest.mark.parametrize("padded", [False, True])
def test_pretraining_outputs_equal_transformers(tmp_path, fields, padded):
    hf = BertForPreTraining(hf_config(**fields)).eval()
    randomize(hf, seed=len(fields))
    hf.save_pretrained(tmp_path)
    ours = EarlyBertForPreTraining.from_pretrained(tmp_path).eval()
    assert ours.config.use_gates and all(bool((g == 1).all()) for g in ours.head_gates() + ours.ffn_gates())

    ids, mask, types, labels, nsp = batch(97, padded)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
        full = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
        masked = ours(
            ids,
            attention_mask=mask,
            token_type_ids=types,
            labels=labels,
            next_sentence_label=nsp,
            masked_logits_only=True,
        )
    valid = mask.bool()  # padded positions are garbage in both models
    assert full.prediction_logits.shape == ref.prediction_logits.shape
    assert (ref.prediction_logits[valid] - full.prediction_logits[valid]).abs().max() <= 1e-5
    assert (ref.seq_relationship_logits - full.seq_relationship_logits).abs().max() <= 1e-5
    # The masked-only decoder (the training loop's) computes the same logits and the same loss as the full one.
    assert (ref.prediction_logits[labels != -100] - masked.prediction_logits).abs().max() <= 1e-5
    for out in (full, masked):
        assert abs(ref.loss.item() - out.loss.item()) <= 1e-5 and out.task_loss.item() == out.loss.item()
        assert out.mlm_count.item() == int((labels != -100).sum())
    assert full.mlm_correct.item() == masked.mlm_correct.item()


@pytest.mark.parametrize("fields", HF_CONFIGS[:2])
@pytest.mark.parametrize("padded", [False, True])
def test_base_model_equals_transformers_bert_model(tmp_path, fields, padded):
    hf = BertModel(hf_config(**fields)).eval()
    randomize(hf, seed=7)
    # The legacy pytorch_model.bin format (transformers 5 only writes safetensors itself).
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = EarlyBertModel.from_pretrained(tmp_path).eval()
    ids, mask, types, *_ = batch(97, padded)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types)
        out = ours(ids, attention_mask=mask, token_type_ids=types)
    valid = mask.bool()
    assert (ref.last_hidden_state[valid] - out.last_hidden_state[valid]).abs().max() <= 1e-5
    assert (ref.pooler_output - out.pooler_output).abs().max() <= 1e-5


def test_masked_lm_checkpoint_loads_into_pretraining_model(tmp_path):
    hf = BertForMaskedLM(hf_config(**HF_CONFIGS[0])).eval()
    randomize(hf, seed=3)
    hf.save_pretrained(tmp_path)
    ours = EarlyBertForPreTraining.from_pretrained(tmp_path).eval()
    ids, mask, types, *_ = batch(97, padded=True)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, token_type_ids=types).logits
        out = ours(ids, attention_mask=mask, token_type_ids=types).prediction_logits
    assert (ref[mask.bool()] - out[mask.bool()]).abs().max() <= 1e-5


def test_an_encoder_only_checkpoint_gets_fresh_pretraining_heads(tmp_path):
    """A BertModel (sentence encoders ship so, e.g. all-MiniLM-L6-v2) has no MLM head: continued pre-training
    starts it fresh, the MLM bias at zero and tied into the decoder, nothing left on the meta device."""
    hf = BertModel(hf_config(**HF_CONFIGS[0])).eval()
    randomize(hf, seed=4)
    hf.save_pretrained(tmp_path)
    ours = EarlyBertForPreTraining.from_pretrained(tmp_path)
    assert not [n for n, p in ours.named_parameters() if p.device.type == "meta"]
    head = ours.cls.predictions
    assert torch.equal(head.bias, torch.zeros_like(head.bias)) and head.decoder.bias is head.bias
    assert torch.equal(ours.bert.embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight)


def test_per_layer_structure_builds_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = EarlyBertForPreTraining(per_layer_config())
    layers = model.bert.encoder.layer
    assert [layer.attention.self.query.out_features for layer in layers] == [18, 6, 24]
    assert [layer.attention.output.dense.in_features for layer in layers] == [18, 6, 24]
    assert [layer.intermediate.dense.out_features for layer in layers] == [20, 7, 16]
    assert [g.shape[0] for g in model.head_gates()] == [3, 1, 4]
    assert [g.shape[0] for g in model.ffn_gates()] == [20, 7, 16]

    ids, mask, types, labels, nsp = batch(61, padded=True)
    out = model(ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    (out.loss + model.gate_penalty(1e-4, 1e-4)).backward()
    for gate in model.head_gates() + model.ffn_gates():
        assert gate.grad is not None and gate.grad.abs().sum() > 0, "gates must receive gradients"

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = EarlyBertForPreTraining.from_pretrained(tmp_path).eval()
    assert loaded.config.num_heads_per_layer == [3, 1, 4]
    assert loaded.config.intermediate_size_per_layer == [20, 7, 16]
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, token_type_ids=types).prediction_logits
        b = loaded(ids, attention_mask=mask, token_type_ids=types).prediction_logits
    assert torch.equal(a, b)


def test_mismatched_weights_fail_naming_the_tensor(tmp_path):
    EarlyBertForPreTraining(per_layer_config()).save_pretrained(tmp_path)
    uniform = per_layer_config(num_heads_per_layer=None, intermediate_size_per_layer=None, intermediate_size=16)
    expected = r"bert\.encoder\.layer\.1\.attention\.self\.query\.weight: checkpoint \(6, 24\), config \(24, 24\)"
    with pytest.raises(ValueError, match=expected):
        EarlyBertForPreTraining.from_pretrained(tmp_path, config=uniform)
    with pytest.raises(ValueError, match="ignore_mismatched_sizes"):
        EarlyBertForPreTraining.from_pretrained(tmp_path, ignore_mismatched_sizes=True)


def test_gate_penalty_value_and_gradient():
    torch.manual_seed(0)
    model = EarlyBertForPreTraining(per_layer_config())
    spread_gates(model)
    heads, ffn = model.head_gates(), model.ffn_gates()
    lam_h, lam_f = 3e-3, 5e-4
    penalty = model.gate_penalty(lam_h, lam_f)
    expected = lam_h * sum(g.abs().sum() for g in heads) + lam_f * sum(g.abs().sum() for g in ffn)
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-6)
    flat = lam_h * torch.cat(heads).abs().sum().item() + lam_f * torch.cat(ffn).abs().sum().item()
    assert penalty.item() == pytest.approx(flat, rel=1e-6)
    # The forward computes the same penalty inside the gated modules (the only place ZeRO-3 can).
    ids, mask, types, labels, nsp = batch(61, padded=True)
    out = model(ids, attention_mask=mask, labels=labels, next_sentence_label=nsp, gate_lambdas=(lam_h, lam_f))
    assert out.gate_penalty.item() == pytest.approx(penalty.item(), rel=1e-6)
    assert out.task_loss.item() == pytest.approx((out.mlm_loss + out.nsp_loss).item(), rel=1e-6)
    assert out.loss.item() == pytest.approx((out.task_loss + out.gate_penalty).item(), rel=1e-6)
    penalty.backward()
    for g in heads:
        assert torch.allclose(g.grad, lam_h * g.detach().sign())
    for g in ffn:
        assert torch.allclose(g.grad, lam_f * g.detach().sign())
    # The weights get no gradient from the penalty.
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad is None


def test_gates_scale_head_outputs_and_neurons():
    """A zero head gate removes exactly that head's contribution; a zero FFN gate that neuron's."""
    torch.manual_seed(0)
    config = per_layer_config(**NO_DROPOUT)
    model = EarlyBertForPreTraining(config).eval()
    ids, mask, types, *_ = batch(61, padded=True)
    layer = model.bert.encoder.layer[0]
    with torch.no_grad():
        layer.attention.self.head_gates[1] = 0.0
        layer.intermediate.ffn_gates[[2, 5]] = 0.0
        gated = model(ids, attention_mask=mask, token_type_ids=types).prediction_logits
        layer.attention.self.head_gates[1] = 1.0
        layer.intermediate.ffn_gates[[2, 5]] = 1.0
        cols = slice(6, 12)  # head 1's context columns in W_O
        layer.attention.output.dense.weight[:, cols] = 0.0
        layer.output.dense.weight[:, [2, 5]] = 0.0
        zeroed = model(ids, attention_mask=mask, token_type_ids=types).prediction_logits
    assert (gated - zeroed).abs().max() <= 1e-5


def test_plain_bert_switch_removes_gates(tmp_path):
    torch.manual_seed(0)
    gated = EarlyBertForPreTraining(per_layer_config(**NO_DROPOUT)).eval()
    plain = EarlyBertForPreTraining(per_layer_config(use_gates=False, **NO_DROPOUT)).eval()
    assert plain.head_gates() == [] and plain.ffn_gates() == []
    assert not any("gates" in n for n, _ in plain.named_parameters())
    assert plain.gate_penalty(1e-4, 1e-4).item() == 0.0
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if "gates" not in k})
    ids, mask, types, *_ = batch(61, padded=True)
    with torch.no_grad():
        a, b = gated(ids, attention_mask=mask), plain(ids, attention_mask=mask)
    assert torch.allclose(a.prediction_logits, b.prediction_logits, atol=1e-6)


def test_no_nsp_head_and_no_masked_tokens():
    model = EarlyBertForPreTraining(per_layer_config(use_nsp=False)).eval()
    assert model.bert.pooler is None and model.cls.seq_relationship is None
    ids, mask, types, labels, nsp = batch(61, padded=False)
    out = model(ids, attention_mask=mask, labels=torch.full_like(ids, -100), next_sentence_label=nsp)
    assert out.loss.item() == 0.0 and out.nsp_loss is None and out.mlm_count.item() == 0


def test_presets_and_auto_classes(tmp_path):
    large = EarlyBertConfig.from_preset("bert-large")
    structure = (
        large.num_hidden_layers,
        large.hidden_size,
        large.num_heads_per_layer[0],
        large.intermediate_size_per_layer[-1],
    )
    assert structure == (24, 1024, 16, 4096)
    assert set(PRESETS) >= {"bert-large", "bert-base", "bert-tiny"}
    with pytest.raises(ValueError, match="unknown model preset"):
        EarlyBertConfig.from_preset("bert-huge")
    with pytest.raises(ValueError, match="num_heads_per_layer"):
        per_layer_config(num_heads_per_layer=[3, 0, 4])
    tiny = EarlyBertConfig.from_preset("bert-tiny", vocab_size=61)
    assert isinstance(AutoConfig.for_model("earlybert"), EarlyBertConfig)
    assert isinstance(AutoModelForPreTraining.from_config(tiny), EarlyBertForPreTraining)
    assert isinstance(AutoModelForSequenceClassification.from_config(tiny), EarlyBertForSequenceClassification)
    assert isinstance(AutoModelForQuestionAnswering.from_config(tiny), EarlyBertForQuestionAnswering)
    EarlyBertForPreTraining(per_layer_config()).save_pretrained(tmp_path)
    assert isinstance(AutoModel.from_pretrained(tmp_path), EarlyBertModel)


def test_flops_count_matches_hand_count():
    config = EarlyBertConfig.from_preset("bert-base", vocab_size=30522)
    T, h, V = 128, 768, 30522
    per_layer = 2 * 4 * h * h + 2 * 2 * T * h + 2 * 2 * h * 3072
    expected = 3 * T * (12 * per_layer + 0.15 * (2 * h * h + 2 * h * V))
    assert flops_per_sequence(config, T) == pytest.approx(expected)
    pruned = per_layer_config()
    assert flops_per_sequence(pruned, 32) < flops_per_sequence(per_layer_config(num_heads_per_layer=[4, 4, 4]), 32)


# transformers' class, ours, config fields and labels of one batch (B=3, T=12) for each task head.
def _labels(kind: str, ids: torch.Tensor, mask_lm_labels: torch.Tensor) -> dict:
    B, T = ids.shape
    g = torch.Generator().manual_seed(1)
    if kind == "single":
        return {"labels": torch.tensor([2, 0, 1])}
    if kind == "regression":
        return {"labels": torch.tensor([0.5, -1.0, 2.0])}
    if kind == "multi":
        return {"labels": torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])}
    if kind == "tokens":
        labels = torch.randint(0, 3, (B, T), generator=g)
        labels[:, 0] = -100
        return {"labels": labels}
    if kind == "qa":  # the last start is past the sequence: clamped and ignored
        return {"start_positions": torch.tensor([1, 3, 40]), "end_positions": torch.tensor([[2], [5], [6]])}
    return {"labels": mask_lm_labels}


HEADS = {
    "single": (BertForSequenceClassification, EarlyBertForSequenceClassification, dict(num_labels=3)),
    "regression": (BertForSequenceClassification, EarlyBertForSequenceClassification, dict(num_labels=1)),
    "multi": (
        BertForSequenceClassification,
        EarlyBertForSequenceClassification,
        dict(num_labels=3, problem_type="multi_label_classification", classifier_dropout=0.0),
    ),
    "tokens": (BertForTokenClassification, EarlyBertForTokenClassification, dict(num_labels=3)),
    "qa": (BertForQuestionAnswering, EarlyBertForQuestionAnswering, {}),
    "mlm": (BertForMaskedLM, EarlyBertForMaskedLM, {}),
}
LOGITS = {"qa": ("start_logits", "end_logits")}


@pytest.mark.parametrize("kind", HEADS)
@pytest.mark.parametrize("padded", [False, True])
def test_task_heads_equal_transformers(tmp_path, kind, padded):
    """Logits, loss, every gradient, hidden states and attention probabilities, with explicit position_ids."""
    hf_class, our_class, fields = HEADS[kind]
    hf = hf_class(hf_config("eager", **HF_CONFIGS[1], **fields)).eval()
    randomize(hf, seed=11)
    hf.save_pretrained(tmp_path)
    ours = our_class.from_pretrained(tmp_path).eval()
    assert isinstance(ours, our_class) and ours.config.use_gates

    ids, mask, types, mlm_labels, _ = batch(97, padded)
    positions = torch.arange(12).flip(0)[None].expand(3, -1)  # not the default 0..T-1
    inputs = dict(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=types,
        position_ids=positions,
        output_hidden_states=True,
        output_attentions=True,
        **_labels(kind, ids, mlm_labels),
    )
    ref, out = hf(**inputs), ours(**inputs)
    valid = mask.bool()
    for name in LOGITS.get(kind, ("logits",)):
        a, b = getattr(ref, name), getattr(out, name)
        assert a.shape == b.shape
        assert ((a - b)[valid] if a.ndim >= 2 and a.shape[:2] == valid.shape else a - b).abs().max() <= 1e-5
    assert abs(ref.loss.item() - out.loss.item()) <= 1e-5 and out.task_loss.item() == out.loss.item()
    assert len(out.hidden_states) == len(ref.hidden_states) == 4 and len(out.attentions) == 3
    for a, b in zip(ref.hidden_states, out.hidden_states, strict=True):
        assert (a[valid] - b[valid]).abs().max() <= 1e-5
    for a, b in zip(ref.attentions, out.attentions, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5

    ref.loss.backward()
    out.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        if "gates" in name:
            assert p.grad is not None, "gates must receive gradients"
            continue
        assert (hf_params[name].grad - p.grad).abs().max() <= 1e-5, name


def test_position_ids_and_flags_are_honoured():
    torch.manual_seed(0)
    model = EarlyBertForSequenceClassification(per_layer_config(hidden_dropout_prob=0.0)).eval()
    ids, mask, types, *_ = batch(61, padded=True)
    with torch.no_grad():
        default = model(ids, attention_mask=mask, token_type_ids=types)
        same = model(ids, attention_mask=mask, token_type_ids=types, position_ids=torch.arange(12)[None])
        shifted = model(ids, attention_mask=mask, token_type_ids=types, position_ids=torch.arange(12)[None] + 3)
        probs = model(ids, attention_mask=mask, token_type_ids=types, output_attentions=True)
    assert torch.equal(default.logits, same.logits) and not torch.allclose(default.logits, shifted.logits)
    # Attention probabilities computed explicitly give the same result as SDPA, and rows sum to 1 over real tokens.
    assert (probs.logits - default.logits).abs().max() <= 1e-5
    assert [a.shape for a in probs.attentions] == [(3, h, 12, 12) for h in (3, 1, 4)]
    assert torch.allclose(probs.attentions[0].sum(-1), torch.ones(3, 3, 12), atol=1e-5)
    assert probs.attentions[0][2, :, :, 4:].abs().max() == 0  # row 2 has 4 real tokens
    model.config.output_hidden_states = True
    assert len(model(ids).hidden_states) == 4


PRETRAINING_EXTRAS = [
    "task_loss",
    "mlm_loss",
    "nsp_loss",
    "gate_penalty",
    "gate_l1",
    "mlm_correct",
    "mlm_count",
    "token_count",
    "token_pairs",
]


@pytest.mark.parametrize("kind", ["pretraining", "mlm", "single", "tokens", "qa"])
def test_pruned_heads_outputs_are_well_formed(kind):
    """A non-uniform structure with gates: transformers' fields first, EarlyBERT's last, the penalty in the loss,
    gradients on the gates; without gates no gate_l1, so the tuples are transformers' tuples."""
    torch.manual_seed(0)
    ids, mask, types, mlm_labels, nsp = batch(61, padded=True)
    our_class = EarlyBertForPreTraining if kind == "pretraining" else HEADS[kind][1]
    labels = _labels(kind, ids, mlm_labels)
    logits, extras = LOGITS.get(kind, ("logits",)), ["task_loss", "gate_penalty", "gate_l1"]
    if kind == "pretraining":
        labels["next_sentence_label"] = nsp
        logits, extras = ("prediction_logits", "seq_relationship_logits"), PRETRAINING_EXTRAS
    num_labels = 2 if kind == "qa" else 3
    model = our_class(per_layer_config(num_labels=num_labels)).eval()
    out = model(ids, attention_mask=mask, token_type_ids=types, gate_lambdas=(1e-2, 1e-3), **labels)
    assert list(out.keys()) == ["loss", *logits, *extras]
    assert out.loss.item() == pytest.approx((out.task_loss + out.gate_penalty).item(), rel=1e-6)
    assert (out.gate_l1[0].item(), out.gate_l1[1].item()) == (3 + 1 + 4, 20 + 7 + 16)  # every gate at 1
    out.loss.backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in model.head_gates() + model.ffn_gates())
    with torch.no_grad():
        as_tuple = model(ids, attention_mask=mask, token_type_ids=types, return_dict=False, **labels)
    assert len(as_tuple) == len(out) - 1  # no gate_penalty without gate_lambdas
    assert as_tuple[0].item() == pytest.approx(out.task_loss.item(), rel=1e-6)
    expected_shape = {
        "pretraining": (3, 12, 61),
        "mlm": (3, 12, 61),
        "single": (3, 3),
        "tokens": (3, 12, 3),
        "qa": (3, 12),
    }[kind]
    assert as_tuple[1].shape == expected_shape

    plain = our_class(per_layer_config(use_gates=False, num_labels=num_labels)).eval()
    with torch.no_grad():
        named = plain(ids, attention_mask=mask, token_type_ids=types, gate_lambdas=(1e-2, 1e-3))
        bare = plain(ids, attention_mask=mask, token_type_ids=types, return_dict=False)
    assert named.gate_l1 is None and named.gate_penalty is None and list(named.keys()) == list(logits)
    assert len(bare) == len(logits) and all(torch.equal(a, named[k]) for a, k in zip(bare, logits, strict=True))

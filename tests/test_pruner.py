"""Physical pruning: the pruned model computes what the dense one computes with removed gates at 0."""

import pytest
import torch

from pipeline import EarlyBertConfig, EarlyBertForPreTraining
from pipeline.earlybert.detector import DetectorConfig, masks_from_gates
from pipeline.earlybert.pruner import PrunePlan, gate_values, prune_model, prune_tensors
from pipeline.model import parameter_count
from pipeline.run.metrics import flops_per_sequence
from tiny import NO_DROPOUT, spread_gates


def dense_model(seed: int = 0) -> EarlyBertForPreTraining:
    torch.manual_seed(seed)
    config = EarlyBertConfig(
        vocab_size=71,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=6,
        intermediate_size=40,
        **NO_DROPOUT,
    )
    model = EarlyBertForPreTraining(config).eval()
    spread_gates(model)
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 71, (4, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    return dict(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=torch.zeros_like(ids),
        labels=labels,
        next_sentence_label=torch.tensor([0, 1, 1, 0]),
    )


@pytest.mark.parametrize("fold_gates", [True, False])
def test_pruned_equals_dense_with_removed_gates_at_zero(fold_gates):
    dense = dense_model()
    masks = masks_from_gates(dense.head_gates(), dense.ffn_gates(), DetectorConfig())
    pruned, plan = prune_model(dense, masks, fold_gates=fold_gates)
    assert pruned.config.num_heads_per_layer == [4, 4, 4]
    assert sum(pruned.config.intermediate_size_per_layer) == round(120 * 0.6)
    assert pruned.config.use_gates is (not fold_gates)
    with torch.no_grad():
        for g, m in zip(dense.head_gates() + dense.ffn_gates(), masks.heads + masks.ffn):
            g[~m] = 0.0
        ref = dense(**inputs())
        out = pruned.eval()(**inputs())
    assert (ref.prediction_logits - out.prediction_logits).abs().max() <= 1e-5
    assert (ref.seq_relationship_logits - out.seq_relationship_logits).abs().max() <= 1e-5
    assert abs(ref.loss.item() - out.loss.item()) <= 1e-5
    assert parameter_count(pruned) < parameter_count(dense)
    assert flops_per_sequence(pruned.config, 128) < flops_per_sequence(dense.config, 128)


def test_pruned_slices_record_original_ids_and_keep_shapes_nonzero():
    dense = dense_model(seed=3)
    masks = masks_from_gates(dense.head_gates(), dense.ffn_gates(), DetectorConfig(ffn_prune_ratio=0.95))
    pruned, plan = prune_model(dense, masks, fold_gates=False)
    assert plan.kept_heads == masks.kept_heads() and plan.kept_neurons == masks.kept_neurons()
    assert all(p.numel() > 0 for p in pruned.parameters())
    layer, old = pruned.bert.encoder.layer[1], dense.bert.encoder.layer[1]
    h = plan.kept_heads[1][0]
    assert torch.equal(layer.attention.self.query.weight[:8], old.attention.self.query.weight[h * 8 : (h + 1) * 8])
    assert torch.equal(layer.attention.self.head_gates, old.attention.self.head_gates[plan.kept_heads[1]])


def test_optimizer_moments_follow_the_folded_weights():
    """With folding, W' = c W; Adam's moments of W' are m / c and v / c^2, column by column."""
    dense = dense_model(seed=5)
    masks = masks_from_gates(dense.head_gates(), dense.ffn_gates(), DetectorConfig())
    plan = PrunePlan.from_masks(masks, dense.config.head_size, fold_gates=True)
    state = dense.state_dict()
    gates = gate_values(state)
    name = "bert.encoder.layer.0.output.dense.weight"
    moment = {name: torch.ones_like(state[name])}
    m1 = prune_tensors(moment, plan, gates, power=-1)[name]
    m2 = prune_tensors(moment, plan, gates, power=-2)[name]
    c = gates["bert.encoder.layer.0.intermediate.ffn_gates"][plan.kept_neurons[0]]
    assert torch.allclose(m1[0], 1 / c) and torch.allclose(m2[0], 1 / c**2)


class IndexOnTensorsDevice(torch.overrides.TorchFunctionMode):
    """Refuses index_select with an index on another device than the tensor, as CUDA does (on the CPU
    and the meta device torch lets it pass)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.index_select, torch.Tensor.index_select):
            tensor, index = args[0], kwargs.get("index", args[2] if len(args) > 2 else None)
            if index.device != tensor.device:
                raise RuntimeError(f"index on {index.device}, tensor on {tensor.device}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("fold_gates", [True, False])
def test_pruning_tensors_on_another_device_indexes_them_there(fold_gates):
    """The meta device stands in for a GPU: every index tensor is made where the weight it indexes lives."""
    dense = dense_model(seed=7)
    masks = masks_from_gates(dense.head_gates(), dense.ffn_gates(), DetectorConfig())
    plan = PrunePlan.from_masks(masks, dense.config.head_size, fold_gates)
    state = {k: v.detach() for k, v in dense.state_dict().items()}
    on_cpu = prune_tensors(state, plan, gate_values(state))
    meta = {k: v.to("meta") for k, v in state.items()}
    with IndexOnTensorsDevice():
        on_meta = prune_tensors(meta, plan, gate_values(meta))
    assert sorted(on_meta) == sorted(on_cpu)
    assert all(on_meta[k].device.type == "meta" and on_meta[k].shape == on_cpu[k].shape for k in on_cpu)

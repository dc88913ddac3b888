"""Physical pruning of a gated BERT to its early-bird ticket (ModernBERT's, for its fused weights, is in
pipeline/modernbert.py; pipeline/families.py gives each model its family's; `prune_model` prunes either).

For each layer, with kept heads H and kept FFN neurons N (original ids):
  query/key/value  rows of the kept heads (weight and bias)
  attention W_O    columns of the kept heads
  intermediate W_1 rows of the kept neurons (weight and bias)
  output W_2       columns of the kept neurons
  gates            the kept entries, or folded into W_O / W_2 (exact: W_O[:, cols(h)] *= c_h,
                   W_2[:, j] *= c_j) and removed
Everything else (embeddings, LayerNorms, biases of W_O and W_2, the heads) is unchanged.

The slicing works on name -> tensor dicts, so the same function prunes the model's weights, the
fp32 master weights and each optimizer moment (`prune_tensors`); moments of folded columns are
rescaled the way Adam would have seen them (m / c, v / c^2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pipeline.earlybert.detector import Masks
from pipeline.model import EarlyBertConfig

GATES = ("head_gates", "ffn_gates")  # how the gates' parameter names end
LAYER_PARAM = re.compile(r"^(?P<prefix>.*?)encoder\.layer\.(?P<layer>\d+)\.(?P<rest>.+)$")


@dataclass
class PrunePlan:
    """Which original units survive, per layer, and whether the gates are folded."""

    kept_heads: list[list[int]]
    kept_neurons: list[list[int]]
    head_size: int
    fold_gates: bool

    @classmethod
    def from_masks(cls, masks: Masks, head_size: int, fold_gates: bool) -> "PrunePlan":
        return cls(masks.kept_heads(), masks.kept_neurons(), head_size, fold_gates)

    # Index tensors are made on the device of the tensor they index: index_select on a CUDA tensor refuses
    # CPU indices.
    def head_rows(self, layer: int, device: torch.device | None = None) -> torch.Tensor:
        d = self.head_size
        rows = [h * d + j for h in self.kept_heads[layer] for j in range(d)]
        return torch.tensor(rows, dtype=torch.long, device=device)

    def heads(self, layer: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.tensor(self.kept_heads[layer], dtype=torch.long, device=device)

    def neurons(self, layer: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.tensor(self.kept_neurons[layer], dtype=torch.long, device=device)


def pruned_config(config: EarlyBertConfig, plan: PrunePlan) -> EarlyBertConfig:
    """The config of the pruned model: per-layer sizes from the plan; no gates if they are folded."""
    fields = config.to_dict()
    fields.update(
        num_heads_per_layer=[len(h) for h in plan.kept_heads],
        intermediate_size_per_layer=[len(n) for n in plan.kept_neurons],
        use_gates=config.use_gates and not plan.fold_gates,
    )
    return EarlyBertConfig.from_dict(fields)  # architectures (the task head) and label maps carry over


def prune_tensors(
    tensors: dict[str, torch.Tensor],
    plan: PrunePlan,
    gates: dict[str, torch.Tensor],
    power: int = 1,
) -> dict[str, torch.Tensor]:
    """Slice a name -> tensor dict (weights, or an optimizer moment of each weight) to the plan.

    gates: parameter name -> value of every gate, used to fold them (ignored unless plan.fold_gates).
    power: how a folded column scales: 1 for weights, -1 for first moments, -2 for second moments
    (if W' = c W then dL/dW' = g / c).
    """
    out = {}
    for name, t in tensors.items():
        match = LAYER_PARAM.match(name)
        if match is None:
            out[name] = t
            continue
        prefix, layer, rest = match["prefix"], int(match["layer"]), match["rest"]
        rows, neurons = plan.head_rows(layer, t.device), plan.neurons(layer, t.device)
        gate_key = lambda kind, prefix=prefix, layer=layer: f"{prefix}encoder.layer.{layer}.{kind}"
        if rest.startswith(("attention.self.query.", "attention.self.key.", "attention.self.value.")):
            out[name] = t.index_select(0, rows)
        elif rest == "attention.output.dense.weight":
            w = t.index_select(1, rows)
            if plan.fold_gates and gate_key("attention.self.head_gates") in gates:
                gate = gates[gate_key("attention.self.head_gates")]
                c = gate.index_select(0, plan.heads(layer, gate.device))
                w = w * c.repeat_interleave(plan.head_size).to(w.device, w.dtype)[None, :] ** power
            out[name] = w
        elif rest == "attention.self.head_gates":
            if not plan.fold_gates:
                out[name] = t.index_select(0, plan.heads(layer, t.device))
        elif rest in ("intermediate.dense.weight", "intermediate.dense.bias"):
            out[name] = t.index_select(0, neurons)
        elif rest == "output.dense.weight":
            w = t.index_select(1, neurons)
            if plan.fold_gates and gate_key("intermediate.ffn_gates") in gates:
                gate = gates[gate_key("intermediate.ffn_gates")]
                c = gate.index_select(0, plan.neurons(layer, gate.device))
                w = w * c.to(w.device, w.dtype)[None, :] ** power
            out[name] = w
        elif rest == "intermediate.ffn_gates":
            if not plan.fold_gates:
                out[name] = t.index_select(0, neurons)
        else:
            out[name] = t
    return out


def gate_values(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in tensors.items() if k.endswith(GATES)}


def prune_model(model, masks: Masks, fold_gates: bool = True):
    """A new, smaller model of the same class computing what `model` computes with the removed units' gates at 0,
    with its family's pruning (a BERT or a ModernBERT model: pipeline/families.py)."""
    from pipeline.families import family_of  # the registry holds this module's functions: imported at call time

    family = family_of(model.config)
    plan = PrunePlan.from_masks(masks, model.config.head_size, fold_gates)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    new_state = family.prune_tensors(state, plan, gate_values(state))
    new_model = type(model)(family.pruned_config(model.config, plan))
    new_model.load_state_dict(new_state, strict=True)
    return new_model.to(next(model.parameters()).device), plan

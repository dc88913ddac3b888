"""Tiny models for the tests: a structure as pruning leaves it, and gates as a search leaves them."""

import torch

from pipeline import EarlyBertConfig

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def per_layer_config(**overrides) -> EarlyBertConfig:
    """Per-layer head counts and FFN widths, and a head size that is not hidden / heads."""
    fields = dict(
        vocab_size=61,
        hidden_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        head_size=6,
        num_heads_per_layer=[3, 1, 4],
        intermediate_size_per_layer=[20, 7, 16],
    )
    return EarlyBertConfig(**{**fields, **overrides})


def spread_gates(model: torch.nn.Module, seed: int | None = None) -> None:
    """Head and FFN gates spread out, some negative, as after a search (torch's global generator by default)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in model.head_gates() + model.ffn_gates():
            gate.copy_(torch.randn(gate.shape, generator=generator))

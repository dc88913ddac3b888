"""EarlyBERT's search stage inside the training loop: when to look at the gates, and the draw.

    every `detector.interval` steps    all ranks read the fp32 gates (a collective under ZeRO),
                                       rank 0 runs the detector, broadcasts its decision and masks
    on a draw                          every rank checks it holds the same masks, rank 0 writes
                                       RUN/ticket.json, the engine is rebuilt around the pruned model
                                       (pipeline/rebuild.py) and training goes on

Modes (`earlybert.mode`), all in the same command so that baselines differ in one key only:
    earlybert   detect the early-bird ticket (draw when the masks stop changing)
    fixed       draw the gates' ticket at `earlybert.draw_step`, whatever the masks do
    random      at `earlybert.draw_step`, prune random units at the same ratios (the paper's baseline)
    dense       no gates, no draw: plain BERT

The run state keeps the detector state (`extra["detector"]`) and, after the draw, the ticket
(`extra["ticket"]`), so a resumed search continues where it stopped and a resumed pruned run knows
its ticket.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from data_prep.shards import atomic_write
from pipeline.detector import (
    Decision, DetectorConfig, DetectorState, Masks, broadcast_decision, check_same_masks, keep_mask, masks_from_gates,
    observe,
)
from pipeline.model import EarlyBertConfig, EarlyBertForPreTraining, flops_per_sequence, parameter_count
from pipeline.rebuild import full_fp32

TICKET = "ticket.json"


def read_gates(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """fp32 masters of the gates (not their bf16 copies, whose rounding makes ties); every rank calls it."""
    return [full_fp32(g) for g in model.head_gates()], [full_fp32(g) for g in model.ffn_gates()]


def random_masks(config: EarlyBertConfig, detector: DetectorConfig, seed: int) -> Masks:
    """Random units at the detector's ratios and scopes: the same rule applied to random scores."""
    g = torch.Generator().manual_seed(seed)
    heads = keep_mask([torch.rand(n, generator=g) for n in config.num_heads_per_layer], detector.head_prune_ratio, detector.head_scope)
    ffn = keep_mask([torch.rand(n, generator=g) for n in config.intermediate_size_per_layer], detector.ffn_prune_ratio, detector.ffn_scope)
    return Masks(heads=heads, ffn=ffn)


def search_step(model, mode: str, detector: DetectorConfig, draw_step: int | None, seed: int, step: int,
                state_json: dict | None, is_main: bool) -> tuple[Decision | None, dict | None]:
    """After optimizer step `step`: (the broadcast decision, the new detector state) or (None, state)
    when this step is not a detector step. Every rank calls it with the same arguments."""
    if mode == "earlybert":
        if step % detector.interval != 0 and step < detector.max_search_steps:
            return None, state_json
    elif step != draw_step:
        return None, state_json
    config = model.config
    heads, ffn = read_gates(model)  # collective: outside the rank-0 branch
    state = DetectorState.from_json(state_json) if state_json else DetectorState()
    decision = None
    if is_main:
        if mode == "earlybert":
            decision = observe(state, step, masks_from_gates(heads, ffn, detector), detector)
        elif mode == "fixed":
            decision = Decision(True, step, masks_from_gates(heads, ffn, detector), reason=f"fixed draw_step={draw_step}")
        else:
            decision = Decision(True, step, random_masks(config, detector, seed), reason=f"random masks at draw_step={draw_step}")
        state.drawn_step = step if decision.draw else state.drawn_step
    decision = broadcast_decision(decision, (config.num_heads_per_layer, config.intermediate_size_per_layer))
    if decision.draw:
        check_same_masks(decision.masks)
    return decision, state.to_json() if is_main else state_json


def parameters_of(config: EarlyBertConfig) -> int:
    """Parameter count of the model a config describes (built on the meta device: no memory, no init;
    the engine's own parameters are partitioned under ZeRO-3)."""
    with torch.device("meta"):
        return parameter_count(EarlyBertForPreTraining(config))


def ticket_record(decision: Decision, mode: str, detector_state: dict | None, before: EarlyBertConfig,
                  after: EarlyBertConfig, seq_len: int) -> dict:
    """The content of RUN/ticket.json."""
    return {
        "mode": mode,
        "draw_step": decision.step,
        "forced": decision.forced,
        "reason": decision.reason,
        "kept_heads": decision.masks.kept_heads(),
        "heads_per_layer": [len(h) for h in decision.masks.kept_heads()],
        "ffn_per_layer": [len(n) for n in decision.masks.kept_neurons()],
        "kept_neurons": decision.masks.kept_neurons(),
        "mask_digest": decision.masks.digest(),
        "distance_history": (detector_state or {}).get("history", []),
        "params_before": parameters_of(before),
        "params_after": parameters_of(after),
        "seq_len": seq_len,
        "flops_per_sequence_before": flops_per_sequence(before, seq_len),
        "flops_per_sequence_after": flops_per_sequence(after, seq_len),
    }


def write_ticket(run_dir: Path, record: dict) -> Path:
    path = Path(run_dir) / TICKET
    # One key per line, each value on its line: readable, and the id lists stay compact.
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path

"""One rank of the engine-rebuild check (tests/test_rebuild.py starts two).

Trains a tiny gated BERT a few steps under the given ZeRO stage, draws masks from its gates, rebuilds
the engine around the pruned model, and writes what rank 0 saw as JSON: the new engine's fp32
masters and Adam moments against the sliced old ones, counters, lr, and a loss after the rebuild.
"""

import json
import os
import sys

import deepspeed
import torch

from pipeline import EarlyBertConfig, EarlyBertForPreTraining
from pipeline.earlybert.detector import Decision, DetectorConfig, broadcast_decision, check_same_masks, masks_from_gates
from pipeline.earlybert.pruner import PrunePlan, gate_values, prune_tensors
from pipeline.engine import distributed
from pipeline.engine.deepspeed_engine import EngineSlot
from pipeline.engine.rebuild import MOMENTS, rebuild_engine, snapshot_engine
from tiny import NO_DROPOUT, spread_gates  # tests/ is on PYTHONPATH (test_rebuild.run_two_ranks)

stage, dtype, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
rank = distributed.setup().rank

ds_config = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
    "scheduler": {
        "type": "WarmupDecayLR",
        "params": {"warmup_num_steps": 2, "total_num_steps": 20, "warmup_max_lr": 1e-3},
    },
    "zero_optimization": {"stage": stage},
    "bf16": {"enabled": dtype == "bf16"},
    "steps_per_print": 1000,
}


def build(model):
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    return engine


def train_steps(engine, n, seed):
    g = torch.Generator().manual_seed(seed * 10 + rank)
    losses = []
    for _ in range(n):
        ids = torch.randint(5, 100, (4, 16), generator=g)
        labels = torch.where(torch.rand(4, 16, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        out = engine(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            labels=labels,
            next_sentence_label=torch.zeros(4, dtype=torch.long),
            gate_lambdas=(1e-2, 1e-2),
        )
        loss = out.loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


torch.manual_seed(0)
# 6 heads of size 4 (hidden 24): keeping 4 heads gives 16-row Q/K/V, and FFN widths not divisible by 2.
config = EarlyBertConfig(
    vocab_size=100,
    hidden_size=24,
    num_hidden_layers=2,
    num_attention_heads=6,
    intermediate_size=23,
    **NO_DROPOUT,
)
model = EarlyBertForPreTraining(config)
spread_gates(model)
engine = build(model)
train_steps(engine, 3, seed=1)

before = snapshot_engine(engine)  # collective
gates = gate_values(before.weights)
layers = engine.module.bert.encoder.layer
heads = [gates[f"bert.encoder.layer.{i}.attention.self.head_gates"] for i in range(len(layers))]
ffn = [gates[f"bert.encoder.layer.{i}.intermediate.ffn_gates"] for i in range(len(layers))]
decision = None
if rank == 0:
    decision = Decision(True, 3, masks_from_gates(heads, ffn, DetectorConfig(ffn_prune_ratio=0.5)))
decision = broadcast_decision(decision, (config.num_heads_per_layer, config.intermediate_size_per_layer))
digest = check_same_masks(decision.masks)

plan = PrunePlan.from_masks(decision.masks, config.head_size, fold_gates=True)
expected_w = prune_tensors(before.weights, plan, gates)
expected_m = {k: prune_tensors(v, plan, gates, power=MOMENTS[k]) for k, v in before.moments.items()}

slot = EngineSlot(engine)
del engine, model  # the slot holds the only reference, as the run does
plan = rebuild_engine(slot, decision.masks, build, fold_gates=True, carry_moments=True)
engine = slot.engine
after = snapshot_engine(engine)
losses = train_steps(engine, 2, seed=2)

if rank == 0:
    diff = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in b)  # noqa: E731
    result = {
        "digest": digest,
        "heads": engine.module.config.num_heads_per_layer,
        "ffn": engine.module.config.intermediate_size_per_layer,
        "same_names": sorted(after.weights) == sorted(expected_w),
        "max_weight_diff": diff(after.weights, expected_w),
        "max_moment_diff": {k: diff(after.moments[k], expected_m[k]) for k in expected_m},
        "moment_keys": sorted(after.moments),
        "counters_before": before.counters,
        "counters_after": after.counters,
        "lr_before": before.group_lrs,
        "lr_after": after.group_lrs,
        "opt_step_before": before.optimizer_step,
        "opt_step_after": after.optimizer_step,
        "losses_after": losses,
        "has_gates": any("gates" in k for k in after.weights),
        "zero_size": [k for k, v in after.weights.items() if v.numel() == 0],
    }
    with open(out_path, "w") as f:
        json.dump(result, f)
engine.destroy()  # as the product ends a run: ZeRO-3's hooks and buffers before the process group
distributed.teardown(clean=True)
if os.environ.get("REBUILD_CHECK_EXIT") != "interpreter":  # bench/zero3_exit_loop.py's 'before' counts
    distributed.end_rank_process(0)  # as a rank of `earlybert train` ends

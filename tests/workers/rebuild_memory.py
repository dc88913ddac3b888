"""One rank of the rebuild memory check (tests/test_rebuild.py starts two).

Trains a gated BERT large enough for its engine to outweigh the process's own memory (about 27M parameters)
a few steps under the given ZeRO stage, rebuilds the engine around the default ticket through the product's
path (deepspeed_engine.prune_engine) and writes what rank 0 measured as JSON: the rebuild's peak host memory
against the dense engine's steady state (bench.bench_prune.measure_rebuild), the size of the state it carries
over, and how many of the dense engine's objects (the engine, its parameters) were still alive when the pruned
engine was built.
"""

import json
import sys
import weakref

import torch

from bench.bench_prune import measure_rebuild
from pipeline import EarlyBertConfig, EarlyBertForPreTraining
from pipeline.config import OptimConfig
from pipeline.earlybert.detector import DetectorConfig, masks_from_gates
from pipeline.engine import deepspeed_engine as engine_module
from pipeline.engine import distributed
from pipeline.engine.deepspeed_engine import EngineSlot, EngineSpec, build_engine, train_step
from pipeline.model import parameter_count
from tiny import NO_DROPOUT, spread_gates  # tests/ is on PYTHONPATH (test_rebuild.run_two_ranks)

stage, dtype, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist = distributed.setup()

ds_config = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": True}},
    "zero_optimization": {"stage": stage},
    "bf16": {"enabled": dtype == "bf16"},
    "steps_per_print": 10**9,
}
spec = EngineSpec(ds_config, OptimConfig(lr=1e-4), total_steps=100)
torch.manual_seed(0)
config = EarlyBertConfig(
    vocab_size=4000,
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    intermediate_size=2048,
    **NO_DROPOUT,
)
model = EarlyBertForPreTraining(config)
spread_gates(model, seed=1)  # the same gates, hence the same masks, on every rank
slot = EngineSlot(build_engine(model, spec))
del model  # the slot holds the only reference, as the run does


def steps(n: int) -> list[float]:
    g = torch.Generator().manual_seed(dist.rank)
    losses = []
    for _ in range(n):
        ids = torch.randint(5, config.vocab_size, (2, 32), generator=g)
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, next_sentence_label=ids[:, 0] % 2)
        losses.append(float(train_step(slot.engine, [batch], dist.device, lambda out: {"loss": out.loss})["loss"]))
    return losses


steps(2)  # the optimizer state exists from the first step on: the dense engine at its steady state
masks = masks_from_gates(slot.engine.module.head_gates(), slot.engine.module.ffn_gates(), DetectorConfig())

# Weak references to the dense engine and its parameters, counted when the pruned engine is built.
dense = [weakref.ref(slot.engine), *(weakref.ref(p) for p in slot.engine.module.parameters())]
alive_at_build = []


def counting_build(model, spec):
    alive_at_build.append(sum(ref() is not None for ref in dense))
    return build_engine(model, spec)


engine_module.build_engine = counting_build  # prune_engine builds through this module attribute
result = measure_rebuild(slot, spec, masks)
result.update(
    # What the rebuild carries over on the host: the fp32 master and two Adam moments of each kept weight.
    carried_mb=12 * parameter_count(slot.engine.module) / 2**20,
    alive_at_build=alive_at_build,
    dense_objects=len(dense),
    heads=slot.engine.module.config.num_heads_per_layer,
    losses_after=steps(1),
)
if dist.rank == 0:
    with open(out_path, "w") as f:
        json.dump(result, f)
slot.engine.destroy()  # as the product ends a run: ZeRO-3's hooks and buffers before the process group
distributed.teardown(clean=True)
distributed.end_rank_process(0)  # as a rank of `earlybert train` ends

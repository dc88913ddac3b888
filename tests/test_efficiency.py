"""Training-efficiency options: unpadded batches, activation checkpointing, fused QKV, torch.compile (an engine
option) and DeepSpeed's fused Adam with its fallback. Each must leave the losses and gradients as they are.

Run as a script (`test_efficiency.py worker STAGE OPTIONS OUT`), this file is one rank of the 2-rank check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForPreTraining

from pipeline import EarlyBertConfig, EarlyBertForPreTraining
from pipeline.earlybert.detector import DetectorConfig, masks_from_gates
from pipeline.earlybert.pruner import PrunePlan, prune_model, pruned_config
from pipeline.model import (
    EarlyBertForQuestionAnswering,
    EarlyBertForSequenceClassification,
    EarlyBertForTokenClassification,
    Unpadded,
)
from runs import run_env
from tiny import NO_DROPOUT, per_layer_config, spread_gates

ROOT = Path(__file__).resolve().parent.parent


def config(**fields) -> EarlyBertConfig:
    """A pruned-looking structure without dropout."""
    return per_layer_config(**{**NO_DROPOUT, **fields})


UNIFORM = dict(num_heads_per_layer=None, intermediate_size_per_layer=None, head_size=None, intermediate_size=32)


def padded_batch(seed: int = 0, B: int = 4, T: int = 16, left_pad_row: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 61, (B, T), generator=g)
    lengths = [T, 11, 5, 9][:B]
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    if left_pad_row:  # padding before the tokens too: attention must not care where the padding is
        mask[3] = mask[3].roll(4)
    types = (torch.arange(T)[None] >= torch.tensor(lengths)[:, None] // 2).long() * mask
    labels = torch.where((torch.rand(B, T, generator=g) < 0.3) & mask.bool(), ids, torch.full_like(ids, -100))
    return dict(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=types,
        labels=labels,
        next_sentence_label=torch.tensor([0, 1, 1, 0][:B]),
    )


def same_model(model_class, cfg: EarlyBertConfig, reference: torch.nn.Module, **options) -> torch.nn.Module:
    model = model_class(EarlyBertConfig(**{**cfg.to_dict(), **options}))
    model.load_state_dict(reference.state_dict())
    return model


def loss_and_grads(model: torch.nn.Module, inputs: dict, seed: int = 0):
    torch.manual_seed(seed)  # the same dropout masks where the options keep the random stream
    out = model(**inputs, gate_lambdas=(1e-2, 1e-3))
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol: float = 1e-5):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert abs(out_a.loss.item() - out_b.loss.item()) <= tol
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert (grads_a[name] - grads_b[name]).abs().max() <= tol, name


HEADS = {
    "pretraining": (EarlyBertForPreTraining, {}),
    "sequence": (EarlyBertForSequenceClassification, {"num_labels": 3}),
    "tokens": (EarlyBertForTokenClassification, {"num_labels": 3}),
    "qa": (EarlyBertForQuestionAnswering, {}),
}


def head_inputs(kind: str, batch: dict) -> dict:
    base = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    if kind == "pretraining":
        return {
            **base,
            "labels": batch["labels"],
            "next_sentence_label": batch["next_sentence_label"],
            "masked_logits_only": True,
        }
    if kind == "sequence":
        return {**base, "labels": torch.tensor([2, 0, 1, 1])}
    if kind == "tokens":
        return {**base, "labels": torch.where(batch["attention_mask"].bool(), batch["input_ids"] % 3, -100)}
    return {**base, "start_positions": torch.tensor([1, 3, 2, 0]), "end_positions": torch.tensor([2, 5, 4, 6])}


@pytest.mark.parametrize("structure", ["pruned", "uniform"])
@pytest.mark.parametrize("kind", HEADS)
def test_unpadded_equals_padded(kind, structure):
    """Loss and every gradient of the unpadded model equal the padded model's (fp32, 1e-5), also for a non-uniform
    (pruned) structure and with the other options on."""
    model_class, fields = HEADS[kind]
    cfg = config(**fields, **(UNIFORM if structure == "uniform" else {}))
    torch.manual_seed(0)
    padded = model_class(cfg).train()
    spread_gates(padded, seed=3)
    inputs = head_inputs(kind, padded_batch())
    reference = loss_and_grads(padded, inputs)
    for options in ({"unpad": True}, {"unpad": True, "fused_qkv": True, "activation_checkpointing": True}):
        assert_same(reference, loss_and_grads(same_model(model_class, cfg, padded, **options).train(), inputs))


def test_unpadded_hidden_states_and_attention_per_sequence():
    cfg = config()
    torch.manual_seed(0)
    padded = EarlyBertForPreTraining(cfg).eval()
    unpadded = same_model(EarlyBertForPreTraining, cfg, padded, unpad=True).eval()
    batch = padded_batch(left_pad_row=True)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        a = padded.bert(**inputs, output_hidden_states=True)
        b = unpadded.bert(**inputs, output_hidden_states=True)
    real = batch["attention_mask"].bool()
    assert len(a.hidden_states) == len(b.hidden_states) == 4
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        assert (x - y)[real].abs().max() <= 1e-5
        assert y[~real].abs().max() == 0  # the padding comes back as zeros
    # The packed attention equals SDPA on each sequence alone, cut by cu_seqlens (what the varlen kernel reads).
    layout = Unpadded(batch["attention_mask"])
    assert layout.cu_seqlens.tolist() == [0, 16, 27, 32, 41] and layout.max_seqlen == 16
    q, k, v = torch.randn(3, 41, 2, 5).unbind(0)  # (N, H, d)
    per_sequence = [
        torch.nn.functional.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        for s, e in zip(layout.cu_seqlens[:-1].tolist(), layout.cu_seqlens[1:].tolist(), strict=True)
    ]
    assert (layout.attention(q, k, v, 0.0) - torch.cat(per_sequence)).abs().max() <= 1e-6


def test_unpad_is_skipped_without_padding_and_for_attention_probabilities():
    cfg = config()
    torch.manual_seed(0)
    model = EarlyBertForSequenceClassification(EarlyBertConfig(**{**cfg.to_dict(), "unpad": True})).eval()
    batch = padded_batch()
    full = torch.ones_like(batch["attention_mask"])
    with torch.no_grad():
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
        model.config.unpad = False
        ref = model(batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
        model.config.unpad = True
        plain = model(batch["input_ids"], attention_mask=full)
        model.config.unpad = False
        plain_ref = model(batch["input_ids"], attention_mask=full)
    assert [a.shape for a in out.attentions] == [(4, h, 16, 16) for h in (3, 1, 4)]
    assert all(torch.equal(x, y) for x, y in zip(out.attentions, ref.attentions, strict=True))
    assert torch.equal(plain.logits, plain_ref.logits)


def test_activation_checkpointing_equal_with_dropout_and_survives_pruning(tmp_path):
    cfg = config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = EarlyBertForPreTraining(cfg).train()
    spread_gates(model, seed=3)
    inputs = head_inputs("pretraining", padded_batch())
    reference = loss_and_grads(model, inputs)
    model.zero_grad()
    with pytest.warns(FutureWarning):  # transformers' old name still works
        model.gradient_checkpointing_enable()
    layers = model.bert.encoder.layer
    assert model.config.activation_checkpointing and all(layer.gradient_checkpointing for layer in layers)
    assert_same(reference, loss_and_grads(model, inputs))  # recomputation replays the same dropout masks

    # The option is a config field: it goes through pruning (the engine rebuild builds from pruned_config on the
    # meta device), save_pretrained and from_pretrained.
    masks = masks_from_gates(model.head_gates(), model.ffn_gates(), DetectorConfig())
    pruned, plan = prune_model(model, masks)
    assert all(layer.gradient_checkpointing for layer in pruned.bert.encoder.layer)
    with torch.device("meta"):
        rebuilt = EarlyBertForPreTraining(pruned_config(model.config, PrunePlan.from_masks(masks, 6, True)))
    assert all(layer.gradient_checkpointing for layer in rebuilt.bert.encoder.layer)
    pruned.save_pretrained(tmp_path)
    loaded = EarlyBertForPreTraining.from_pretrained(tmp_path)
    assert loaded.config.activation_checkpointing and all(x.gradient_checkpointing for x in loaded.bert.encoder.layer)
    loaded.activation_checkpointing_disable()
    assert not loaded.config.activation_checkpointing
    assert not any(layer.gradient_checkpointing for layer in loaded.bert.encoder.layer)


def test_fused_qkv_keeps_transformers_names_loads_hf_and_prunes(tmp_path):
    hf_cfg = dict(
        vocab_size=61,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    from transformers import BertConfig

    torch.manual_seed(0)
    hf = BertForPreTraining(BertConfig(**hf_cfg)).eval()
    hf.save_pretrained(tmp_path)
    fused = EarlyBertForPreTraining.from_pretrained(tmp_path, fused_qkv=True).eval()
    plain = EarlyBertForPreTraining.from_pretrained(tmp_path).eval()
    assert fused.config.fused_qkv and fused.state_dict().keys() == plain.state_dict().keys()
    assert "bert.encoder.layer.0.attention.self.query.weight" in fused.state_dict()
    inputs = head_inputs("pretraining", padded_batch())
    with torch.no_grad():
        ref = hf(**{k: v for k, v in inputs.items() if k != "masked_logits_only"})
        out = fused(**inputs)
    assert abs(ref.loss.item() - out.loss.item()) <= 1e-5
    fused.save_pretrained(tmp_path / "fused")  # saves transformers' keys: a plain BERT reads them back
    assert BertForPreTraining.from_pretrained(tmp_path / "fused").state_dict().keys() == hf.state_dict().keys()

    # The pruner slices query/key/value by name: the pruned fused model equals the pruned plain one.
    spread_gates(fused, seed=3)
    spread_gates(plain, seed=3)
    masks = masks_from_gates(fused.head_gates(), fused.ffn_gates(), DetectorConfig())
    (fused_pruned, _), (plain_pruned, _) = prune_model(fused, masks), prune_model(plain, masks)
    assert fused_pruned.config.fused_qkv and fused_pruned.config.num_heads_per_layer == [3, 3]
    with torch.no_grad():
        a, b = fused_pruned.eval()(**inputs), plain_pruned.eval()(**inputs)
    assert (a.prediction_logits - b.prediction_logits).abs().max() <= 1e-5


def test_fused_adam_falls_back_to_torch_fused_adamw(monkeypatch, capsys):
    from deepspeed.ops.op_builder import FusedAdamBuilder

    from pipeline.engine import deepspeed_engine as engine

    ds = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}}

    def failed_build(self, verbose=True):
        raise RuntimeError("Error building extension 'fused_adam': nvcc not found")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(FusedAdamBuilder, "load", failed_build)
    engine.fused_adam_unavailable.cache_clear()
    resolved = engine.with_available_adam(ds)
    assert resolved["optimizer"] == {"type": "AdamW", "params": {"eps": 1e-6, "torch_adam": True, "fused": True}}
    assert ds["optimizer"]["params"] == {"eps": 1e-6}  # the spec's config is left alone
    err = capsys.readouterr().err
    assert "nvcc not found" in err and "training with torch's fused AdamW" in err
    engine.with_available_adam(ds)
    assert capsys.readouterr().err == ""  # said once per process

    monkeypatch.setattr(FusedAdamBuilder, "load", lambda self, verbose=True: object())
    engine.fused_adam_unavailable.cache_clear()
    assert engine.with_available_adam(ds) is ds  # the extension loads: DeepSpeed's fused Adam
    offload = {**ds, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    torch_adam = {**ds, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
    engine.fused_adam_unavailable.cache_clear()
    monkeypatch.setattr(FusedAdamBuilder, "load", failed_build)
    assert engine.with_available_adam(offload) is offload and engine.with_available_adam(torch_adam) is torch_adam
    engine.fused_adam_unavailable.cache_clear()


def test_gpu_configs_ask_for_deepspeed_fused_adam():
    for name in ("zero1_bf16", "zero2_bf16", "zero3_bf16", "zero2_fp16"):
        params = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())["optimizer"]["params"]
        assert "torch_adam" not in params, name


def test_gpu_benchmark_refuses_on_cpu_and_dry_runs(capsys):
    from bench import bench_gpu

    cases = bench_gpu.cases()
    assert {(c.seq_len, c.pruned) for c in cases} == {(128, False), (128, True), (512, False), (512, True)}
    assert {c.option for c in cases} == {None, *bench_gpu.OPTIONS} and len(cases) == 4 * (1 + len(bench_gpu.OPTIONS))
    assert bench_gpu.main([]) == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    # Every case on a tiny model on the CPU, in a process of its own: it builds DeepSpeed engines, whose process
    # group would set RANK, WORLD_SIZE and MASTER_PORT in this process's environment, which later tests' launches
    # inherit (mpirun and srun ranks then read as the deepspeed launcher's, fixed ports collide).
    dry = subprocess.run(
        [sys.executable, "-m", "bench.bench_gpu", "--dry-run"],
        env=run_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    lines = dry.stdout.splitlines()
    assert sum(line.startswith(tuple(c.name + " |" for c in cases)) for line in lines) == len(cases)


# ---- 2 ranks, ZeRO 1/2/3, through the engine rebuild -----------------------------------------------------------


def worker(stage: int, options: dict, out_path: str) -> None:
    """Train a gated tiny BERT 3 steps on padded batches, draw, rebuild the engine, train 3 more; rank 0 writes
    the losses and whether the options are still on after the rebuild."""
    from pipeline.config import OptimConfig
    from pipeline.engine import distributed
    from pipeline.engine.deepspeed_engine import EngineSlot, EngineSpec, build_engine, prune_engine

    rank = distributed.setup().rank
    ds = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
    }
    spec = EngineSpec(
        ds, OptimConfig(lr=1e-3, schedule="constant"), total_steps=100, compile=options.pop("compile", False)
    )
    torch.manual_seed(0)
    model = EarlyBertForPreTraining(
        config(
            vocab_size=61,
            num_heads_per_layer=None,
            intermediate_size_per_layer=None,
            head_size=None,
            num_attention_heads=6,
            intermediate_size=23,
            **options,
        )
    )
    spread_gates(model, seed=3)
    masks = masks_from_gates(model.head_gates(), model.ffn_gates(), DetectorConfig())
    engine = build_engine(model, spec)
    losses = []

    def train(n: int, seed: int):
        for i in range(n):
            batch = padded_batch(seed=seed * 10 + i + 100 * rank)
            out = engine(**batch, gate_lambdas=(1e-2, 1e-2), masked_logits_only=True)
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())

    train(3, seed=1)
    engine = prune_engine(EngineSlot(engine), spec, masks, fold_gates=True, carry_moments=True)
    train(3, seed=2)
    layers = engine.module.bert.encoder.layer
    if rank == 0:
        Path(out_path).write_text(
            json.dumps(
                {
                    "losses": losses,
                    "heads": engine.module.config.num_heads_per_layer,
                    "checkpointing": [layer.gradient_checkpointing for layer in layers],
                    "config": {
                        k: getattr(engine.module.config, k) for k in ("unpad", "activation_checkpointing", "fused_qkv")
                    },
                    "compiled": engine.is_compiled,
                }
            )
        )
    # As the product ends a run (pipeline/pretrain/loop.py): ZeRO-3's hooks and buffers go before the process group,
    # else the exit can abort in C++ teardown ("terminate called without an active exception").
    engine.destroy()
    distributed.teardown(clean=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_options_under_zero_and_across_the_rebuild(tmp_path, stage):
    from test_rebuild import run_two_ranks

    options = {"unpad": True, "activation_checkpointing": True, "fused_qkv": True, "compile": stage == 2}
    results = {}
    for name, opts in (("plain", {}), ("options", options)):
        out = tmp_path / f"{name}.json"
        run_two_ranks(Path(__file__), ["worker", str(stage), json.dumps(opts), str(out)], timeout=600)
        results[name] = json.loads(out.read_text())
    plain, on = results["plain"], results["options"]
    assert on["heads"] == plain["heads"] == [4, 4, 4]
    assert on["checkpointing"] == [True] * 3 and plain["checkpointing"] == [False] * 3
    assert on["config"] == {"unpad": True, "activation_checkpointing": True, "fused_qkv": True}
    assert on["compiled"] == (stage == 2) and not plain["compiled"]
    assert max(abs(a - b) for a, b in zip(on["losses"], plain["losses"], strict=True)) <= 1e-5


if __name__ == "__main__" and sys.argv[1] == "worker":
    from pipeline.engine import distributed

    worker(int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4])
    distributed.end_rank_process(0)  # as a rank of `earlybert train` ends

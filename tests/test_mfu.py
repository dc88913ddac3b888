"""Issue 19 item 12: one definition of model FLOPs and MFU (pipeline/run/metrics.py) over real tokens, used alike by
the training log (pipeline/pretrain/loop.py step_record) and the benchmarks (bench/bench_gpu.py)."""

from types import SimpleNamespace

import pytest

from bench.bench_model import make_batch
from pipeline.model import EarlyBertConfig, EarlyBertForPreTraining
from pipeline.pretrain.loop import pretraining_record, pretraining_stats
from pipeline.run.core import Step
from pipeline.run.metrics import batch_model_flops, flops_per_sequence, mfu, model_flops
from pipeline.tools.report import model_rate
from tiny import NO_DROPOUT, per_layer_config


def test_model_flops_count_real_tokens_their_own_sequence_and_the_masked_head():
    config = per_layer_config()  # heads [3, 1, 4] of size 6, FFN [20, 7, 16], hidden 24, vocabulary 61
    h, V = 24, 61
    linear = sum(2 * 4 * h * (heads * 6) + 4 * h * ffn for heads, ffn in ((3, 20), (1, 7), (4, 16)))
    pairs = sum(4 * heads * 6 for heads in (3, 1, 4))
    head = 2 * h * h + 2 * h * V
    # two sequences of 10 and 4 real tokens (padded to any length), 3 masked
    assert model_flops(config, 14, 10**2 + 4**2, 3) == pytest.approx(3 * (14 * linear + 116 * pairs + 3 * head))
    # a full sequence: the planning figure of tickets
    assert flops_per_sequence(config, 32) == pytest.approx(model_flops(config, 32, 32**2, 0.15 * 32))
    assert mfu(2e12, 2.0, 10.0, devices=2) == pytest.approx(0.05) and mfu(1.0, 1.0, None) is None


def test_the_training_count_and_the_benchmark_count_agree():
    """The model's own token counts (what the training log sums over micro-batches) give the FLOPs the benchmarks
    compute from the batch; padding is not counted."""
    config = EarlyBertConfig.from_preset("bert-tiny", vocab_size=97, **NO_DROPOUT)
    batch = make_batch(config, 6, 24, "cpu", pad_fraction=0.2)
    out = EarlyBertForPreTraining(config)(**batch, masked_logits_only=True)
    stats = pretraining_stats(out)
    from_training = model_flops(config, stats["tokens"].item(), stats["token_pairs"].item(), stats["mlm_masked"].item())
    assert from_training == pytest.approx(batch_model_flops(config, batch["attention_mask"], batch["labels"]))
    assert stats["tokens"].item() == batch["attention_mask"].sum().item() < 6 * 24


def fake_run(config, world_size):
    engine = SimpleNamespace(
        module=SimpleNamespace(config=config),
        skipped_steps=0,
        get_global_grad_norm=lambda: 1.0,
        fp16_enabled=lambda: False,
    )
    return SimpleNamespace(
        engine=engine,
        cfg=SimpleNamespace(global_batch_size=8),
        state=SimpleNamespace(step=5, samples=40, nonfinite_skipped=0),
        dist=SimpleNamespace(world_size=world_size),
    )


def test_the_training_log_counts_real_tokens_only():
    config = EarlyBertConfig.from_preset("bert-base", vocab_size=30522)
    sums = dict(
        loss=8.0,
        gate_penalty=0.0,
        mlm_loss=8.0,
        mlm_correct=10.0,
        mlm_masked=130.0,
        micro_batches=2.0,
        tokens=900.0,  # of 8 x 128 = 1024 positions
        token_pairs=110_000.0,
        nsp_loss=0.0,
        gate_l1=0.0,
    )
    step = Step({**sums, "stop": 0.0}, lr=1e-4, seconds=0.5, searching=False)
    r = pretraining_record(fake_run(config, world_size=2), step, phase=0, seq_len=128, data_wait=0.0, peak_tflops=100.0)
    flops = model_flops(config, 900, 110_000, 130)
    assert r["tokens_per_s"] == pytest.approx(900 / 0.5)
    assert r["tflops"] == pytest.approx(flops / 0.5 / 1e12)
    assert r["mfu"] == pytest.approx(mfu(flops, 0.5, 100.0, devices=2))
    assert r["tflops"] < flops_per_sequence(config, 128) * 8 / 0.5 / 1e12  # the padding is not counted


def test_the_report_gives_the_logs_model_rate():
    records = [{"step": 1, "tflops": 1.0, "mfu": 0.01}] + [
        {"step": s, "tflops": 100.0 + s, "mfu": 0.5 + s / 100} for s in (2, 3, 4)
    ]
    assert model_rate(records) == "103 (53.0%)"  # medians, the first step (start-up) left out
    assert model_rate([{"step": 1, "tflops": 2.0}, {"step": 2, "tflops": 4.0}]) == "4"  # peak unknown: no MFU

"""What pruning buys and what the draw costs, on one DeepSpeed engine (ZeRO-2, one rank):

- step time of the dense gated model against the pruned one at the default ratios (heads 1/3 per
  layer, FFN 0.4 globally), compared with the FLOPs ratio (target: speed-up >= 90% of it);
- the detector's cost (read the gates, build the masks, update the FIFO) as a share of the
  search stage at the default interval (target < 1%);
- the engine rebuild in dense steps (target <= 10);
- the rebuild's peak memory against the dense engine's steady state (target <= 1.10x): host RSS, and on a
  GPU the device's max_memory_allocated (measure_rebuild); host memory (RSS) after the rebuild;
- the training-efficiency options (unpad, activation_checkpointing, fused_qkv, compile), each on
  alone against all off, dense and pruned: step time (interleaved repetitions, medians) and the
  peak host memory of a step above the RSS before it.

  python -m bench.bench_prune                       # CPU default: bert-base, seq 128, batch 8, fp32
  python -m bench.bench_prune --preset bert-large --batch 64 --dtype bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import psutil
import torch

from bench.bench_model import OPTIONS, PAD_FRACTION, make_batch, peak_rss_mb
from bench.common import median_time, write_results
from pipeline import EarlyBertConfig, EarlyBertForPreTraining
from pipeline.config import OptimConfig
from pipeline.earlybert.detector import DetectorConfig, DetectorState, masks_from_gates, observe
from pipeline.engine import distributed
from pipeline.engine.deepspeed_engine import EngineSlot, EngineSpec, build_engine, prune_engine
from pipeline.model import EarlyBertSelfAttention, parameter_count
from pipeline.run.metrics import flops_per_sequence


def switch_options(model: EarlyBertForPreTraining, option: str | None) -> None:
    """`option` on in the model, the other config options off (compile is a separate callable)."""
    model.config.unpad = option == "unpad"
    model.config.fused_qkv = option == "fused_qkv"
    for module in model.modules():
        if isinstance(module, EarlyBertSelfAttention):
            module.fused_qkv = model.config.fused_qkv
    if option == "activation_checkpointing":
        model.activation_checkpointing_enable()
    else:
        model.activation_checkpointing_disable()


def measure_options(engine, batch: dict, reps: int) -> dict[str, dict]:
    """Each option alone and none, interleaved: median step seconds, and peak host memory of a step above the
    RSS before it (MB). compile: torch.compile of the engine's module, called in place of the engine."""
    torch._dynamo.reset()
    compiled = torch.compile(engine.module)
    variants = ["none", *OPTIONS]

    def step(option: str):
        switch_options(engine.module, None if option in ("none", "compile") else option)
        out = (compiled if option == "compile" else engine)(**batch, gate_lambdas=(1e-4, 1e-4))
        engine.backward(out.loss)
        engine.step()

    for option in variants:  # warm-up (and compilation)
        step(option), step(option)
    samples = {option: [] for option in variants}
    for _ in range(reps):
        for option in variants:
            samples[option].append(median_time(lambda option=option: step(option), 1)[0])
    result = {}
    for option in variants:
        before, peak = peak_rss_mb(lambda option=option: step(option))
        result[option] = {
            "step_s": statistics.median(samples[option]),
            "step_samples": samples[option],
            "step_excess_mb": peak - before,
        }
    switch_options(engine.module, None)
    return result


def measure_rebuild(slot: EngineSlot, spec: EngineSpec, masks) -> dict:
    """Rebuild `slot.engine` around `masks` (prune_engine, moments carried; the slot holds the only reference) and
    measure it: seconds, and the peak memory of the rebuild against the dense engine's steady state just before:
    host RSS (VmHWM, reset to the RSS before) and, on a GPU, max_memory_allocated against memory_allocated."""
    gc.collect()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        device_before = torch.cuda.memory_allocated()
    seconds = []

    def rebuild():
        start = time.perf_counter()
        prune_engine(slot, spec, masks, fold_gates=True, carry_moments=True)
        if on_gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)

    rss_before, rss_peak = peak_rss_mb(rebuild)
    result = dict(rebuild_s=seconds[0], dense_rss_mb=rss_before, peak_rss_mb=rss_peak)
    result["peak_rss_ratio"] = rss_peak / rss_before
    if on_gpu:
        peak = torch.cuda.max_memory_allocated()
        result.update(
            dense_device_mb=device_before / 2**20, peak_device_mb=peak / 2**20, peak_device_ratio=peak / device_before
        )
    return result


def main(argv=None) -> int:

    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_preset = "bert-large" if on_gpu else "bert-base"
    parser.add_argument("--preset", default=default_preset)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64 if on_gpu else 8)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if on_gpu else "fp32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--interval", type=int, default=DetectorConfig().interval, help="detector interval the share is computed for"
    )
    parser.add_argument("--pad-fraction", type=float, default=PAD_FRACTION, help="share of padding in the batch")
    parser.add_argument("--no-options", action="store_true", help="skip the training-efficiency options")
    args = parser.parse_args(argv)

    distributed.setup()  # a world of one
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": not on_gpu}},
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": args.dtype == "bf16"},
        "steps_per_print": 10**9,
    }

    spec = EngineSpec(ds_config, OptimConfig(lr=1e-4, schedule="constant"), total_steps=10**6)

    torch.manual_seed(0)
    config = EarlyBertConfig.from_preset(args.preset, vocab_size=30522)
    model = EarlyBertForPreTraining(config)
    with torch.no_grad():  # gates as a search leaves them: spread out, so the masks are not trivial
        for gate in model.head_gates() + model.ffn_gates():
            gate.copy_(1.0 + 0.3 * torch.randn(gate.shape))
    engine = build_engine(model, spec)
    del model
    batch = make_batch(config, args.batch, args.seq_len, engine.device, pad_fraction=args.pad_fraction)

    def step():
        out = engine(**batch, gate_lambdas=(1e-4, 1e-4))
        engine.backward(out.loss)
        engine.step()

    step(), step()  # warm-up
    dense_t, dense_samples = median_time(step, args.reps)
    options = {"dense": {} if args.no_options else measure_options(engine, batch, args.reps)}

    detector_cfg = DetectorConfig(interval=args.interval)
    state = DetectorState()

    def detect():
        masks = masks_from_gates(engine.module.head_gates(), engine.module.ffn_gates(), detector_cfg)
        observe(state, len(state.history) * detector_cfg.interval, masks, detector_cfg)
        return masks

    detect_t, _ = median_time(detect, args.reps)
    masks = detect()

    dense_params, dense_flops = parameter_count(engine.module), flops_per_sequence(config, args.seq_len)
    slot = EngineSlot(engine)
    del engine  # the slot holds the only reference, as the run does
    rebuild = measure_rebuild(slot, spec, masks)
    engine, rebuild_t = slot.engine, rebuild["rebuild_s"]
    rss_after_rebuild = psutil.Process().memory_info().rss

    step(), step()
    pruned_t, pruned_samples = median_time(step, args.reps)
    rss_after_steps = psutil.Process().memory_info().rss
    options["pruned"] = {} if args.no_options else measure_options(engine, batch, args.reps)
    pruned_cfg = engine.module.config
    pruned_flops = flops_per_sequence(pruned_cfg, args.seq_len)

    flops_ratio = pruned_flops / dense_flops
    speedup, ideal = dense_t / pruned_t, dense_flops / pruned_flops
    results = dict(
        preset=args.preset,
        seq_len=args.seq_len,
        batch=args.batch,
        dtype=args.dtype,
        reps=args.reps,
        heads_per_layer=pruned_cfg.num_heads_per_layer,
        ffn_per_layer=pruned_cfg.intermediate_size_per_layer,
        params_dense=dense_params,
        params_pruned=parameter_count(engine.module),
        flops_per_sequence_dense=dense_flops,
        flops_per_sequence_pruned=pruned_flops,
        flops_ratio=flops_ratio,
        dense_step_s=dense_t,
        pruned_step_s=pruned_t,
        dense_step_samples=dense_samples,
        pruned_step_samples=pruned_samples,
        speedup=speedup,
        speedup_share_of_flops_ideal=speedup / ideal,
        detector_s=detect_t,
        detector_share_of_search=detect_t / (args.interval * dense_t),
        detector_interval=args.interval,
        rebuild_s=rebuild_t,
        rebuild_in_dense_steps=rebuild_t / dense_t,
        rebuild_memory=rebuild,
        rss_after_rebuild_mb=rss_after_rebuild / 2**20,
        rss_after_pruned_steps_mb=rss_after_steps / 2**20,
        pad_fraction=args.pad_fraction,
        options=options,
    )
    rows = [
        ["step time, dense gated (s)", f"{dense_t:.3f}", ""],
        ["step time, pruned (s)", f"{pruned_t:.3f}", ""],
        ["FLOPs ratio pruned / dense", f"{flops_ratio:.3f}", ""],
        ["speed-up / FLOPs ideal", f"{speedup:.3f} / {ideal:.3f} = {speedup / ideal:.2f}", ">= 0.90"],
        [
            f"detector share of search (interval {args.interval})",
            f"{100 * detect_t / (args.interval * dense_t):.4f}%",
            "< 1%",
        ],
        ["rebuild (dense steps)", f"{rebuild_t / dense_t:.2f} ({rebuild_t:.2f} s)", "<= 10"],
        [
            "rebuild peak host RSS / dense engine's (MB)",
            f"{rebuild['peak_rss_mb']:.0f} / {rebuild['dense_rss_mb']:.0f} = {rebuild['peak_rss_ratio']:.2f}x",
            "<= 1.10x",
        ],
        [
            "host RSS after rebuild / after steps (MB)",
            f"{rss_after_rebuild / 2**20:.0f} / {rss_after_steps / 2**20:.0f}",
            "",
        ],
    ]
    if "peak_device_mb" in rebuild:
        rows.append(
            [
                "rebuild peak GPU memory allocated / dense engine's (MB)",
                f"{rebuild['peak_device_mb']:.0f} / {rebuild['dense_device_mb']:.0f} = "
                f"{rebuild['peak_device_ratio']:.2f}x",
                "<= 1.10x",
            ]
        )
    for structure, measured in options.items():
        for option, m in measured.items():
            ratio = m["step_s"] / measured["none"]["step_s"]
            rows.append(
                [
                    f"{structure}, {option}: step s (x all off), step memory MB",
                    f"{m['step_s']:.3f} ({ratio:.3f}x), {m['step_excess_mb']:.0f}",
                    "",
                ]
            )
    # Another preset than the machine's default gets its own result files (prune_bert-large.md, ...).
    name = "prune" if args.preset == default_preset else f"prune_{args.preset}"
    path = write_results(
        name,
        results,
        ["measure", "value", "target"],
        rows,
        notes=f"{args.preset}, seq {args.seq_len}, batch {args.batch} ({args.pad_fraction:.0%} padding), "
        f"{args.dtype}, ZeRO-2 on one rank, "
        f"median of {args.reps} steps each; kept heads {pruned_cfg.num_heads_per_layer}, "
        f"FFN widths {pruned_cfg.intermediate_size_per_layer}.",
    )
    print(path.read_text())
    engine.destroy()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

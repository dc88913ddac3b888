"""bert-large on one GPU, bf16, through the DeepSpeed engine training runs use: tokens/s, MFU and peak memory of a
training step at seq 128 and 512, dense and pruned (the default ticket: 1/3 of the heads per layer, 40% of the FFN
neurons globally, FFN widths in multiples of the shipped bert-large config's `ffn_multiple_of`), with each
training-efficiency option on and off, and the time of the engine rebuild at the draw:

    unpad, activation_checkpointing, fused_qkv   EarlyBertConfig fields
    compile                                      torch.compile of the model (EngineSpec.compile)

    python -m bench.bench_gpu              # needs a CUDA GPU; writes bench/results/gpu-<device>.md and .json
    python -m bench.bench_gpu --core       # seq 128, dense and pruned, no options (what `make gpu-check` runs)
    python -m bench.bench_gpu --dry-run    # every case on a tiny model on the CPU in fp32 (compile cases
                                           # uncompiled): checks the script, no figures, nothing written

Each step is what `earlybert train` runs: train_step (pipeline/engine/deepspeed_engine.py) on the loader's
micro-batch (with its BatchLayout), the MLM head on the masked positions only, DeepSpeed ZeRO-1 with
ds_configs/zero1_bf16.json's optimizer (DeepSpeed's fused Adam where it builds, else torch's fused AdamW). The
pruned baseline is the dense engine pruned in place (deepspeed_engine.prune_engine, timed: "rebuild"). Batches are
right-padded like the shards (--pad-fraction per sequence length). tokens/s counts real tokens; MFU is
pipeline.run.metrics.mfu of pipeline.run.metrics.model_flops, the training log's definition."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass

import torch
import transformers

from bench.bench_model import make_batch, with_option
from bench.common import ROOT, median_time, write_results
from pipeline import EarlyBertConfig, EarlyBertForPreTraining
from pipeline.config import OptimConfig
from pipeline.earlybert.detector import DetectorConfig, masks_from_gates
from pipeline.earlybert.pruner import prune_model
from pipeline.engine import distributed
from pipeline.engine.deepspeed_engine import (
    EngineSlot,
    EngineSpec,
    build_engine,
    fused_adam_unavailable,
    prune_engine,
    train_step,
)
from pipeline.model import BatchLayout
from pipeline.pretrain.config import load_pretrain_config
from pipeline.run.metrics import batch_model_flops, device_peak_tflops, mfu

transformers.logging.set_verbosity_error()

OPTIONS = ("unpad", "activation_checkpointing", "fused_qkv", "compile")
# seq_len -> (micro-batch, share of padding). Seq-128 NSP shards pad 12-14%; seq-512 ones more.
SHAPES = {128: (64, 0.13), 512: (16, 0.25)}
DRY_RUN_SHAPES = {128: (4, 0.13), 512: (2, 0.25)}
# The FFN rounding of the shipped bert-large run config: the bench prunes as training would.
FFN_MULTIPLE_OF = load_pretrain_config(str(ROOT / "launch/configs/bert-large.yaml")).earlybert.detector.ffn_multiple_of


@dataclass(frozen=True)
class Case:
    seq_len: int
    pruned: bool
    option: str | None  # None: every option off

    @property
    def name(self) -> str:
        return f"seq {self.seq_len}, {'pruned' if self.pruned else 'dense'}, {self.option or 'baseline'}"


def cases(core: bool = False) -> list[Case]:
    if core:
        return [Case(128, False, None), Case(128, True, None)]
    return [
        Case(seq_len, pruned, option) for seq_len in SHAPES for pruned in (False, True) for option in (None, *OPTIONS)
    ]


def dense_model(dry_run: bool) -> EarlyBertForPreTraining:
    """The dense gated bert-large, gates spread as a search leaves them (so the ticket is not trivial)."""
    torch.manual_seed(0)
    preset, vocab = ("bert-tiny", 1000) if dry_run else ("bert-large", 30522)
    model = EarlyBertForPreTraining(EarlyBertConfig.from_preset(preset, vocab_size=vocab))
    with torch.no_grad():
        for gate in model.head_gates() + model.ffn_gates():
            gate.copy_(1.0 + 0.3 * torch.randn(gate.shape))
    return model


def engine_spec(batch: int, dry_run: bool, compile: bool) -> EngineSpec:
    """ZeRO-1 with the shipped bf16 config's optimizer (fp32 and torch's AdamW for the CPU dry run)."""
    ds = json.loads((ROOT / "ds_configs" / ("zero1.json" if dry_run else "zero1_bf16.json")).read_text())
    ds.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=1, steps_per_print=2**31 - 1)
    ds["optimizer"]["params"]["lr"] = 1e-4
    return EngineSpec(ds, OptimConfig(lr=1e-4, schedule="constant"), total_steps=10**6, compile=compile)


def micro_batch(config: EarlyBertConfig, batch: int, seq_len: int, pad_fraction: float, device: str) -> dict:
    """A right-padded micro-batch as the loader hands it over: CPU tensors with their BatchLayout, pinned for a GPU."""
    b = make_batch(config, batch, seq_len, "cpu", pad_fraction=pad_fraction)
    b["layout"] = BatchLayout.of(b["attention_mask"], b["labels"])
    return {k: v.pin_memory() for k, v in b.items()} if device == "cuda" else b


def measure(engine, case: Case, batch: dict, device: str, dry_run: bool, steps: int) -> dict:
    def step():
        train_step(engine, [batch], engine.device, lambda out: {}, masked_logits_only=True)

    for _ in range(1 if dry_run else 3):  # warm-up (and compilation)
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step_s, times = median_time(step, steps)
    mask = batch["attention_mask"]
    real = int(mask.sum())
    flops = batch_model_flops(engine.module.config, mask, batch["labels"])
    return dict(
        case=case.name,
        seq_len=mask.shape[1],
        pruned=case.pruned,
        option=case.option or "baseline",
        batch=mask.shape[0],
        pad_fraction=1 - real / mask.numel(),
        model_flops_per_step=flops,
        step_s=step_s,
        step_samples=times,
        tokens_per_s=real / step_s,
        mfu=mfu(flops, step_s, device_peak_tflops(torch.device(device), "bf16")),
        peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    )


def run_cases(selected: list[Case], device: str, dry_run: bool, steps: int) -> tuple[list[dict], dict]:
    """Every case on its own engine, but the pruned baseline: the dense baseline's engine pruned in place."""
    dense = dense_model(dry_run)
    masks = masks_from_gates(dense.head_gates(), dense.ffn_gates(), DetectorConfig(ffn_multiple_of=FFN_MULTIPLE_OF))
    rows, rebuilds = [], {}
    for case in selected:
        if case.pruned and case.option is None:
            continue  # measured right after its dense baseline, on the same engine
        size, pad_fraction = (DRY_RUN_SHAPES if dry_run else SHAPES)[case.seq_len]
        seq_len = case.seq_len // 8 if dry_run else case.seq_len
        model = EarlyBertForPreTraining(with_option(dense.config, case.option))
        model.load_state_dict(dense.state_dict())
        if case.pruned:
            model = prune_model(model, masks, fold_gates=True)[0]
        spec = engine_spec(size, dry_run, compile=case.option == "compile" and not dry_run)
        engine = build_engine(model.train(), spec)
        batch = micro_batch(model.config, size, seq_len, pad_fraction, device)
        rows.append(measure(engine, case, batch, device, dry_run, steps))
        print(rows[-1]["case"], f"{rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
        pruned_baseline = Case(case.seq_len, True, None)
        if case.option is None and pruned_baseline in selected:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            engine = prune_engine(EngineSlot(engine), spec, masks, fold_gates=True, carry_moments=True)
            if device == "cuda":
                torch.cuda.synchronize()
            rebuilds[seq_len] = time.perf_counter() - start
            rows.append(measure(engine, pruned_baseline, batch, device, dry_run, steps))
            print(rows[-1]["case"], f"{rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
        engine.destroy()
        del engine, model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, rebuilds


def summary(rows: list[dict], rebuilds: dict) -> dict:
    """Per sequence length: the pruned baseline's speed-up over the dense one against its FLOPs ratio (1.0 = the
    step time fell as much as its FLOPs), and the rebuild in dense steps."""
    base = {(r["seq_len"], r["pruned"]): r for r in rows if r["option"] == "baseline"}
    out = {}
    for seq_len in sorted({s for s, _ in base}):
        dense, pruned = base.get((seq_len, False)), base.get((seq_len, True))
        if dense is None or pruned is None:
            continue
        ideal = dense["model_flops_per_step"] / pruned["model_flops_per_step"]
        speedup = dense["step_s"] / pruned["step_s"]
        rebuild = rebuilds[seq_len]
        out[str(seq_len)] = dict(
            flops_ratio=1 / ideal,
            speedup=speedup,
            speedup_share_of_flops_ideal=speedup / ideal,
            rebuild_s=rebuild,
            rebuild_in_dense_steps=rebuild / dense["step_s"],
        )
    return out


def table(rows: list[dict]) -> list[list]:
    base = {(r["seq_len"], r["pruned"]): r["tokens_per_s"] for r in rows if r["option"] == "baseline"}
    fmt = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731
    return [
        [
            r["case"],
            f"{r['tokens_per_s']:.0f}",
            f"{r['tokens_per_s'] / base[r['seq_len'], r['pruned']]:.3f}",
            fmt(r["mfu"], ".1%"),
            fmt(r["peak_memory_gb"], ".1f"),
        ]
        for r in rows
    ]


HEADER = ["case", "tokens/s", "vs baseline", "MFU", "peak memory (GiB)"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, nothing written")
    parser.add_argument("--core", action="store_true", help="seq 128 dense and pruned baselines only")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (median)")
    parser.add_argument("--name", help="results file name (default gpu-<device>, gpu-core-<device> with --core)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "bench_gpu needs a CUDA GPU (none is visible here); `--dry-run` checks the script on the CPU",
            file=sys.stderr,
        )
        return 2
    device = "cpu" if args.dry_run else "cuda"
    distributed.setup()  # a world of one
    rows, rebuilds = run_cases(cases(args.core), device, args.dry_run, 1 if args.dry_run else args.steps)
    results = {"cases": rows, "pruned_vs_dense": summary(rows, rebuilds)}
    if args.dry_run:
        print("\n".join(" | ".join(map(str, row)) for row in [HEADER, *table(rows)]))
        print(json.dumps(results["pruned_vs_dense"]))
        return 0
    device_name = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    optimizer = "torch fused AdamW" if fused_adam_unavailable() else "DeepSpeed FusedAdam"
    path = write_results(
        args.name or f"gpu-{'core-' if args.core else ''}{slug}",
        results,
        HEADER,
        table(rows),
        notes=f"bert-large, DeepSpeed ZeRO-1 bf16, {optimizer}, one GPU; batch/padding per seq len {SHAPES}; "
        f"median of {args.steps} steps after 3 warm-up steps; pruned to FFN widths in multiples of "
        f"{FFN_MULTIPLE_OF}. Pruned vs dense: {json.dumps(results['pruned_vs_dense'])}",
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""bert-large on one GPU, bf16 autocast: tokens/s, MFU and peak memory of a training step (forward, backward,
optimizer) at seq 128 and 512, dense and pruned (the default ticket: 1/3 of the heads per layer, 40% of the
FFN neurons globally), with each training-efficiency option on and off:

    unpad, activation_checkpointing, fused_qkv   EarlyBertConfig fields
    compile                                      torch.compile of the model (EngineSpec.compile)
    deepspeed_fused_adam                         DeepSpeed's FusedAdam instead of torch's fused AdamW

    python -m bench.bench_gpu              # needs a CUDA GPU; writes bench/results/gpu-<device>.md and .json
    python -m bench.bench_gpu --dry-run    # every case on a tiny model on the CPU (compile cases uncompiled):
                                           # checks the script, no figures, nothing written

Batches are right-padded like the shards (--pad-fraction per sequence length). tokens/s counts real tokens;
MFU = the FLOPs of the real tokens (flops_per_sequence x real share) per second / the device's bf16 peak.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import transformers

from bench.bench_model import make_batch, train_step_fn, with_option
from bench.common import write_results
from pipeline import EarlyBertConfig, EarlyBertForPreTraining
from pipeline.detector import DetectorConfig, masks_from_gates
from pipeline.engine import fused_adam_unavailable
from pipeline.metrics import device_peak_tflops
from pipeline.model import flops_per_sequence
from pipeline.pruner import prune_model

transformers.logging.set_verbosity_error()

OPTIONS = ("unpad", "activation_checkpointing", "fused_qkv", "compile", "deepspeed_fused_adam")
# seq_len -> (micro-batch, share of padding). Seq-128 NSP shards pad 12-14%; seq-512 ones more.
SHAPES = {128: (64, 0.13), 512: (16, 0.25)}
DRY_RUN_SHAPES = {128: (4, 0.13), 512: (2, 0.25)}


@dataclass(frozen=True)
class Case:
    seq_len: int
    pruned: bool
    option: str | None  # None: every option off

    @property
    def name(self) -> str:
        return f"seq {self.seq_len}, {'pruned' if self.pruned else 'dense'}, {self.option or 'baseline'}"


def cases() -> list[Case]:
    return [
        Case(seq_len, pruned, option) for seq_len in SHAPES for pruned in (False, True) for option in (None, *OPTIONS)
    ]


def structures(dry_run: bool) -> dict[bool, EarlyBertForPreTraining]:
    """The dense gated bert-large (gates spread as a search leaves them) and its pruned ticket, on the CPU."""
    torch.manual_seed(0)
    config = (
        EarlyBertConfig.from_preset("bert-tiny", vocab_size=1000)
        if dry_run
        else EarlyBertConfig.from_preset("bert-large", vocab_size=30522)
    )
    dense = EarlyBertForPreTraining(config)
    with torch.no_grad():
        for gate in dense.head_gates() + dense.ffn_gates():
            gate.copy_(1.0 + 0.3 * torch.randn(gate.shape))
    masks = masks_from_gates(dense.head_gates(), dense.ffn_gates(), DetectorConfig())
    return {False: dense, True: prune_model(dense, masks, fold_gates=True)[0]}


def optimizer(model: torch.nn.Module, option: str | None, device: str) -> tuple[torch.optim.Optimizer, str]:
    if option == "deepspeed_fused_adam":
        reason = fused_adam_unavailable()
        if reason is None:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(model.parameters(), lr=1e-4, adam_w_mode=True), "deepspeed FusedAdam"
        note = f"fallback: {reason}"
    else:
        note = "torch fused AdamW"
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), note if device == "cuda" else "torch AdamW"


def measure(case: Case, source: EarlyBertForPreTraining, device: str, dry_run: bool, steps: int) -> dict:
    batch_size, pad_fraction = (DRY_RUN_SHAPES if dry_run else SHAPES)[case.seq_len]
    seq_len = case.seq_len // 8 if dry_run else case.seq_len
    config = with_option(source.config, case.option)
    model = EarlyBertForPreTraining(config)
    model.load_state_dict(source.state_dict())
    model = model.to(device).train()
    if case.option == "compile" and not dry_run:
        torch._dynamo.reset()
        model.compile()
    opt, opt_note = optimizer(model, case.option, device)
    batch = make_batch(config, batch_size, seq_len, device, pad_fraction=pad_fraction)
    step = train_step_fn(model, opt, batch, torch.float32 if dry_run else torch.bfloat16)
    for _ in range(1 if dry_run else 3):  # warm-up (and compilation)
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    real = int(batch["attention_mask"].sum())
    useful_flops = flops_per_sequence(config, seq_len) * real / seq_len  # per step
    peak = device_peak_tflops(torch.device(device), "bf16")
    row = dict(
        case=case.name,
        seq_len=seq_len,
        pruned=case.pruned,
        option=case.option or "baseline",
        batch=batch_size,
        pad_fraction=1 - real / batch["attention_mask"].numel(),
        optimizer=opt_note,
        step_s=step_s,
        step_samples=times,
        tokens_per_s=real / step_s,
        mfu=useful_flops / step_s / (peak * 1e12) if peak else None,
        peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    )
    del model, opt, step
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


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
            r["optimizer"],
        ]
        for r in rows
    ]


HEADER = ["case", "tokens/s", "vs baseline", "MFU", "peak memory (GiB)", "optimizer"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, nothing written")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (median)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "bench_gpu needs a CUDA GPU (none is visible here); `--dry-run` checks the script on the CPU",
            file=sys.stderr,
        )
        return 2
    device = "cpu" if args.dry_run else "cuda"
    models = structures(args.dry_run)
    rows = []
    for case in cases():
        rows.append(measure(case, models[case.pruned], device, args.dry_run, 1 if args.dry_run else args.steps))
        print(rows[-1]["case"], f"{rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    if args.dry_run:
        print("\n".join(" | ".join(map(str, row)) for row in [HEADER, *table(rows)]))
        return 0
    device_name = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    path = write_results(
        f"gpu-{slug}",
        {"cases": rows},
        HEADER,
        table(rows),
        notes=f"bert-large, bf16 autocast (fp32 weights), one GPU; batch/padding per seq len {SHAPES}; median of "
        f"{args.steps} steps after 3 warm-up steps; torch fused AdamW unless the case says otherwise.",
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
